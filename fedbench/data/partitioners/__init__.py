"""The core partitioners, one module each (registered when the partitioner registry is first listed)."""
