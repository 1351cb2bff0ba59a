"""Standalone ("Local"): every client trains its own model on its own data; nothing is exchanged.

Only the clients sampled in a round train, so its compute is comparable with the federated methods
(spec C.2, reconstruction).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from fedbench.methods.base import Method


class Standalone(Method):
    code = "none (local training only)"
    paper = "local training without federation (the MHPFL papers' 'Standalone' baseline)"
    heterogeneous = True

    @dataclass
    class Params:
        pass

    def client_update(self, client, broadcast):
        model = client.module("model")
        opt = client.optimizer(model.parameters())
        for x, y in client.batches(self.run.epochs):
            client.step(opt, F.cross_entropy(model(x)[0], y))
        return None
