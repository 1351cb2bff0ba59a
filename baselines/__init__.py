"""Baseline methods, one file each, registered as plugins through the ``fedbench.methods`` entry points."""
