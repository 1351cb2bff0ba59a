"""A throw-away fedbench plugin package: one method, one partitioner and one backbone, each one file,
registered through entry points only (tests/test_plugins.py installs it)."""
