"""FedGH (Yi et al., ACM MM'23): a global header trained on the server from class prototypes (spec C.9).

Algorithm (per round; W the global header, fc3-shaped 500 -> K):
    client k (selected):
        train the whole local model for E epochs with CE
        one extra forward pass (no gradient) over its training data:
            P_{k,c} = mean of h = fc2 output over the samples of class c
        upload {c: P_{k,c}} for the seen classes (seen x 500 floats, seen class ids in the smallest
            integer type that holds K: uint8, 1 byte each, for K <= 256)
    server:
        train W with CE on the uploaded (P_{k,c}, c) pairs: server_epochs epochs, shuffled batches of
        the client batch size, a dedicated SGD with lr server_lr created each round
        broadcast W to **every** client (``push = "all"``, as HtFLlib); W replaces the client's fc3
    inference: the client's model (local body, global header).

The initial W (seeded, owned by the server) is sent to all clients before round 1, as HtFLlib sends its
first head at the start of round 0.

Do: use a separate server optimiser, not the client's optimiser object, which the author's code reuses
in its server loop (spec C.9, C.10). The server SGD takes the run's momentum, weight decay and
gradient clip with its own lr; HtFLlib uses plain SGD. With one server epoch and at most one batch of
prototypes a round (the common case) it is a single step from fresh optimiser state, where momentum
does not act.

server_epochs defaults to 1: HtFLlib's tuned script and the author's code (one pass over the
prototypes per round) use 1; HtFLlib's argument parser default is 100.

The prototype pass reads the clean training images (no augmentation, fixed order) [reconstruction].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from baselines.fedproto import ClassMeans
from fedbench.hparams import hparam
from fedbench.metering.comm import class_id_dtype
from fedbench.methods.base import load, snapshot
from fedbench.methods.standard import StandardTraining
from fedbench.models.cnn import REP_DIM, linear_spec
from fedbench.seeding import torch_generator


class FedGH(StandardTraining):
    code = "LipingYi/FedGH; TsingZ0/HtFLlib"
    paper = ("Yi et al., FedGH: Heterogeneous Federated Learning with Generalized Global Header, "
             "ACM MM 2023 (arXiv 2303.13137)")
    heterogeneous = True
    push = "all"

    @dataclass
    class Params:
        server_epochs: int = hparam(1, "epochs of global-header training on the server per round "
                                       "(HtFLlib tuned script 1; HtFLlib parser 100)", low=1,
                                    marker="code: TsingZ0/HtFLlib")
        server_lr: float = hparam(0.01, "learning rate of the server's header SGD", low=0.0, low_open=True,
                                  marker="code: TsingZ0/HtFLlib")

    @classmethod
    def label(cls, p) -> str:
        return f"FedGH (server epochs={p.server_epochs}, server lr={p.server_lr})"

    def server_init(self, server):
        return snapshot(server.own("header", linear_spec(REP_DIM, self.run.num_classes)))

    # local training: the standard one (StandardTraining); push = "all": the header is in fc3 already
    def upload(self, client):
        model = client.module("model")
        acc = ClassMeans(self.run.num_classes, REP_DIM, client.device)
        with torch.no_grad():  # prototype collection: forward only, metered as client training cost
            for x, y in client.batches(1, augment=False, shuffle=False, count=False):
                acc.add(model.features(x), y)
        classes, protos = acc.result()
        return {"classes": classes.to(class_id_dtype(self.run.num_classes)), "protos": protos}

    def server_update(self, server, uploads):
        header = server.module("header")
        protos = torch.cat([u.payload["protos"] for u in uploads])
        labels = torch.cat([u.payload["classes"] for u in uploads]).long()
        train_header(server, header, protos, labels, self.hp.server_epochs, self.hp.server_lr,
                     self.run.batch_size,
                     torch_generator(protos.device, self.run.seed, "fedgh-header", server.round))
        return snapshot(header)

    def receive(self, client, header):
        load(client.module("model").fc3, header)


def train_header(server, header, protos, labels, epochs: int, lr: float, batch_size: int,
                 g: torch.Generator) -> None:
    """CE training of the header on (prototype, label) pairs with a fresh server SGD."""
    opt = server.optimizer(header.parameters(), lr=lr)
    n = len(labels)
    for _ in range(epochs):
        order = torch.randperm(n, generator=g, device=protos.device)
        for s in range(0, n, batch_size):
            b = order[s:s + batch_size]
            server.step(opt, F.cross_entropy(header(protos[b]), labels[b]))
