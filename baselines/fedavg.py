"""FedAvg (McMahan et al., AISTATS 2017), for model-homogeneous runs only (spec C.3).

    server broadcasts w; each selected client k runs E epochs of CE-SGD from w -> w_k
    server: w = sum_k (n_k / n) w_k over the participants
Evaluation uses the global model w (what a client would receive next round); that download is an
evaluation device of the simulation and is not counted as communication.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedbench.methods.base import load, snapshot, weighted_mean
from fedbench.methods.standard import StandardTraining
from fedbench.models.cnn import cnn_spec


class FedAvg(StandardTraining):
    code = "TsingZ0/HtFLlib (the form implemented)"
    paper = "McMahan et al., Communication-Efficient Learning of Deep Networks from Decentralized Data, AISTATS 2017"
    heterogeneous = False

    @dataclass
    class Params:
        pass

    def server_init(self, server):
        self.server = server
        # one architecture for all clients (checked by the engine through `heterogeneous = False`)
        return snapshot(server.own("model", cnn_spec(self.run.models, self.run.num_classes)))

    # local training: the standard one (StandardTraining) from the received w
    def install(self, client, w):
        load(client.module("model"), w)

    def upload(self, client):
        return snapshot(client.module("model"))

    def server_update(self, server, uploads):
        w = weighted_mean(uploads)
        load(server.module("model"), w)
        return w

    def predict(self, client, x):
        return self.server.module("model")(x)[0]
