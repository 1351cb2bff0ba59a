"""fedbench: benchmarking model-heterogeneous personalized federated learning.

Exact communication (bytes of the payload tensors), computation (fvcore-based FLOP meter) and
accuracy (per client, per round), stored so that every table can be traced to the run that made it.
"""

__version__ = "0.1.0"
