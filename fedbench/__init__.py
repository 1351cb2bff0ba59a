"""fedbench: benchmarking model-heterogeneous personalized federated learning.

Exact communication (bytes of the payload tensors), computation (fvcore-based FLOP meter) and
accuracy (per client, per round), stored so that every table can be traced to the run that made it.

From Python, :mod:`fedbench.api` (``import fedbench.api as fb``: ``fb.run``, ``fb.sweep``,
``fb.open_results``, ``fb.report``, ``fb.export``). ``fedbench.run``, ``fedbench.open_results``,
``fedbench.export`` and ``fedbench.ConfigError`` are the same objects, loaded on first use so that
``import fedbench`` stays light.
"""

from fedbench._version import __version__ as __version__

# not sweep and report: fedbench.sweep and fedbench.report are modules
_FROM_API = ("ConfigError", "export", "open_results", "run")


def __getattr__(name: str):
    if name in _FROM_API:
        from fedbench import api
        return getattr(api, name)
    raise AttributeError(f"module 'fedbench' has no attribute {name!r}")
