"""The `sepen` commands, one module each. A command module is a leaf: it parses its options
(`build_parser()`), checks its input and calls the library; no module imports a command."""
