"""Standalone ("Local"): every client trains its own model on its own data; nothing is exchanged.

Only the clients sampled in a round train, so its compute is comparable with the federated methods
(spec C.2, reconstruction).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedbench.methods.standard import StandardTraining


class Standalone(StandardTraining):
    code = "none (local training only)"
    paper = "local training without federation (the MHPFL papers' 'Standalone' baseline)"
    heterogeneous = True

    @dataclass
    class Params:
        pass
    # local training: the standard one (StandardTraining), nothing installed, nothing uploaded
