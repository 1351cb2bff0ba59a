"""The package version (its own module: the run records import it without importing the package API)."""

__version__ = "0.1.0"
