"""LG-FedAvg (Liang et al., 2020) in the HtFLlib form: local bodies, a global head (spec C.4).

The original keeps lower layers local and averages the top layers with FedAvg. With heterogeneous
CNN-1..5 the only shared-shape part is the head fc3 (500 -> K), so (HtFLlib):

    client k (selected): train the whole model (body and head) for E epochs with CE; upload fc3
    server: head = sum_k w_k fc3_k over the participants (w_k = n_k / sum n, --agg-weight)
            and write it into **every** client's fc3 (``push = "all"``, bytes counted for all clients)
    inference: the client's model, i.e. the global head on the local body, without re-tuning

Evaluation follows the engine: after the head has been written, as HtFLlib evaluates at the start of
the next round. There is no initial head: in round 1 each client starts from its own fc3 (HtFLlib
sends the first head after the first aggregation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from fedbench.methods.base import Method, load, snapshot, weighted_mean


class LGFedAvg(Method):
    paper = ("Liang et al., Think Locally, Act Globally: Federated Learning with Local and Global "
             "Representations, arXiv 2001.01523")
    heterogeneous = True
    push = "all"

    @dataclass
    class Params:
        pass

    @classmethod
    def label(cls, params) -> str:
        return "LG-FedAvg (global head fc3)"

    def client_update(self, client, broadcast):
        model = client.module("model")
        opt = client.optimizer(model.parameters())
        for x, y in client.batches(self.run.epochs):
            client.step(opt, F.cross_entropy(model(x)[0], y))
        return snapshot(model.fc3)  # weight (K, 500) and bias (K,)

    def server_update(self, server, uploads):
        return weighted_mean(uploads)

    def receive(self, client, head):
        load(client.module("model").fc3, head)
