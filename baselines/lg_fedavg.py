"""LG-FedAvg (Liang et al., 2020) in the HtFLlib form: local bodies, a global head (spec C.4).

The original keeps lower layers local and averages the top layers with FedAvg. With heterogeneous
CNN-1..5 the only shared-shape part is the head fc3 (500 -> K), so (HtFLlib):

    server, before round 1: head = client 0's initial fc3, written into **every** client's fc3
    client k (selected): train the whole model (body and head) for E epochs with CE; upload fc3
    server: head = sum_k w_k fc3_k over the participants (w_k = n_k / sum n, --agg-weight)
            and write it into **every** client's fc3 (``push = "all"``, bytes counted for all clients)
    inference: the client's model, i.e. the global head on the local body, without re-tuning

As HtFLlib, the server's head starts as a copy of client 0's initial head and is sent to all clients
before the first round, so every client starts round 1 from the same head (fc3, 500 K + K numbers
down to every client at round 1, counted like any download). Evaluation is the protocol's: under
``pfllib`` and ``round-end`` after the round's head has been written (HtFLlib evaluates at the start of
the next round, after its ``send_parameters``), under ``yi`` with the head as the client trained it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedbench.methods.base import load, snapshot, weighted_mean
from fedbench.methods.standard import StandardTraining


class LGFedAvg(StandardTraining):
    code = "pliang279/LG-FedAvg; the form implemented is TsingZ0/HtFLlib's"
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

    def setup(self, server, clients):
        self.first_client = clients[0]

    def server_init(self, server):
        # called after every client_init: the initial global head is client 0's (HtFLlib)
        return snapshot(self.first_client.module("model").fc3)

    # local training: the standard one (StandardTraining); push = "all": the global head was written into
    # fc3 by receive(), nothing to install
    def upload(self, client):
        return snapshot(client.module("model").fc3)  # weight (K, 500) and bias (K,)

    def server_update(self, server, uploads):
        return weighted_mean(uploads)

    def receive(self, client, head):
        load(client.module("model").fc3, head)
