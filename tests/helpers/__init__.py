"""Shared helpers of the test suite (imported as `helpers.<module>`; `tests/` is on pytest's
pythonpath). Test modules import these, never each other or conftest."""
