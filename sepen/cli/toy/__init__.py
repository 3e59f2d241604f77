"""The `sepen toy` commands."""
