"""Data sources, partitioners and on-device batch transforms."""
