"""FedProto (Tan et al., AAAI'22) in the HtFLlib form (spec C.6).

Algorithm (per round; P_bar the global prototypes, h = fc2 output, 500-d):
    client k (selected), with the P_bar it holds (none before the first aggregation):
        E epochs over its data:  L = CE(fc3(h), y) + lam * MSE(h, P_bar_y)
            a sample whose class has no global prototype contributes 0 to the MSE term
            (HtFLlib puts the sample's own detached h there; the mean still runs over the batch)
        P_{k,c} = mean of h over the samples of class c
            during: accumulated over all batches of all local epochs (HtFLlib; a drifting model)
            after:  one extra forward pass over the local training data once training is done
        upload {c: P_{k,c}} for the seen classes: seen x 500 floats and seen class ids in the smallest
            integer type that holds K (uint8 for K <= 256: 1 byte each)
    server:
        P_bar_c = mean over the participants holding c of P_{k,c}
            uniform (HtFLlib) or weighted by the class sample counts n_{k,c} (count)
        broadcast {c: P_bar_c} for the classes some participant holds this round (m classes:
            m x 500 floats + m class ids) to **every** client (``push = "all"``); each client replaces
            the prototypes it holds with them
    inference:
        nearest-proto: the class of the nearest prototype the client holds, i.e. the latest global
            ones (squared distance; HtFLlib's MSE gives the same argmin), the head ignored
        head: fc3(h), the local model

As HtFLlib, the server sends the new prototypes to all clients after each aggregation and evaluation
uses them, so after round t every client (selected or not) predicts with round t's aggregate and
trains with it when next selected; the download bytes are counted for every client each round. Before
the first aggregation there are no prototypes: nearest-proto prediction is "undefined" (HtFLlib
reports 0 % there; fedbench stores undefined, spec A.5), which only an evaluation before round 1's
aggregation (``--eval-initial``) can see.

Defaults: lam = 1.0 is HtFLlib's parser default; HtFLlib's tuned example script uses lam = 10.

Client by client under ``--client-batching``: its loss adds the prototype term to CE (and it
collects prototypes during training), so it is not ``StandardTraining`` (not ``batchable``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedbench.hparams import hparam
from fedbench.metering.comm import class_id_dtype
from fedbench.methods.base import Method
from fedbench.models.cnn import REP_DIM


class ClassMeans:
    """Per-class running sums of vectors (h or logits), for prototypes and per-label logits.

    Sums use a one-hot matrix product rather than ``index_add_`` so that they are deterministic on GPU.
    """

    def __init__(self, num_classes: int, dim: int, device: torch.device) -> None:
        self.K = num_classes
        self.sums = torch.zeros(num_classes, dim, device=device)
        self.counts = torch.zeros(num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def add(self, v: torch.Tensor, y: torch.Tensor) -> None:
        onehot = F.one_hot(y, self.K)
        self.sums += onehot.to(v.dtype).T @ v.detach()
        self.counts += onehot.sum(0)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(class ids int64, per-class means) over the classes seen (ids go on the wire as
        :func:`fedbench.metering.comm.class_id_dtype`)."""
        seen = self.counts.nonzero().squeeze(1)
        return seen, self.sums[seen] / self.counts[seen, None].to(self.sums.dtype)


def dense(classes: torch.Tensor, rows: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (K, d) table and a (K,) mask from class ids (any integer dtype) and their rows."""
    classes = classes.long()
    table = torch.zeros(num_classes, rows.shape[1], dtype=rows.dtype, device=rows.device)
    mask = torch.zeros(num_classes, dtype=torch.bool, device=rows.device)
    table[classes] = rows
    mask[classes] = True
    return table, mask


def fedproto_loss(logits: torch.Tensor, h: torch.Tensor, y: torch.Tensor, protos: torch.Tensor | None,
                  has_proto: torch.Tensor | None, lam: float) -> torch.Tensor:
    """CE(fc3(h), y) + lam * MSE(h, P_bar_y); MSE is the mean over batch x 500, and samples without a
    global prototype get their own detached h as target (0 loss, 0 gradient), as in HtFLlib."""
    loss = F.cross_entropy(logits, y)
    if protos is None:
        return loss
    target = torch.where(has_proto[y][:, None], protos[y], h.detach())
    return loss + lam * F.mse_loss(h, target)


def aggregate_protos(uploads: list[dict], num_classes: int, weight: str) -> dict[str, torch.Tensor]:
    """Per-class mean over the uploads holding the class: unweighted (uniform) or by class counts (count)."""
    first = uploads[0]["protos"]
    sums = torch.zeros(num_classes, first.shape[1], dtype=first.dtype, device=first.device)
    norm = torch.zeros(num_classes, dtype=first.dtype, device=first.device)
    for u in uploads:
        ids = u["classes"].long()
        w = u["counts"].to(first.dtype) if weight == "count" else torch.ones_like(ids, dtype=first.dtype)
        sums[ids] += w[:, None] * u["protos"]
        norm[ids] += w
    present = norm.nonzero().squeeze(1)
    return {"classes": present.to(class_id_dtype(num_classes)), "protos": sums[present] / norm[present, None]}


class FedProto(Method):
    code = "yuetan031/FedProto; TsingZ0/HtFLlib"
    paper = "Tan et al., FedProto: Federated Prototype Learning across Heterogeneous Clients, AAAI 2022"
    heterogeneous = True
    push = "all"

    @dataclass
    class Params:
        lam: float = hparam(1.0, "weight lambda of the prototype MSE term (HtFLlib parser 1.0; its tuned "
                                 "script uses 10)", low=0.0, marker="code: TsingZ0/HtFLlib")
        proto_collect: str = hparam("during", "local prototypes: accumulated during training over all "
                                              "batches and epochs (HtFLlib), or one extra forward pass after",
                                    choices=("during", "after"), marker="reconstruction")
        proto_weight: str = hparam("uniform", "server: unweighted mean over clients holding the class "
                                              "(HtFLlib), or weighted by class sample counts (paper, unverified)",
                                   choices=("uniform", "count"), marker="code: TsingZ0/HtFLlib")
        proto_infer: str = hparam("nearest-proto", "inference: class of the nearest global prototype "
                                                   "(HtFLlib) or the local head fc3",
                                  choices=("nearest-proto", "head"), marker="reconstruction")

    @classmethod
    def label(cls, p) -> str:
        return (f"FedProto (lam={p.lam}, collect={p.proto_collect}, weight={p.proto_weight}, "
                f"infer={p.proto_infer})")

    def __init__(self, params, run) -> None:
        super().__init__(params, run)
        self.held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # client -> last (P_bar, mask) received

    def receive(self, client, broadcast):
        """Every client, after each aggregation: the prototypes it holds become the latest global ones."""
        self.held[client.id] = dense(broadcast["classes"], broadcast["protos"], self.run.num_classes)

    def client_update(self, client, broadcast):
        # push = "all": the latest prototypes were installed by receive() (none before the first aggregation)
        K, hp = self.run.num_classes, self.hp
        model = client.module("model")
        protos, has_proto = self.held.get(client.id, (None, None))

        opt = client.optimizer(model.parameters())
        acc = ClassMeans(K, REP_DIM, client.device)
        for x, y in client.batches(self.run.epochs):
            logits, h = model(x)
            client.step(opt, fedproto_loss(logits, h, y, protos, has_proto, hp.lam))
            if hp.proto_collect == "during":
                acc.add(h, y)
        if hp.proto_collect == "after":  # extra forward-only pass of the trained model (clean images)
            with torch.no_grad():
                for x, y in client.batches(1, augment=False, shuffle=False, count=False):
                    acc.add(model.features(x), y)

        classes, means = acc.result()
        up = {"classes": classes.to(class_id_dtype(K)), "protos": means}
        if hp.proto_weight == "count":  # the server needs n_{k,c}: the client's training samples of class c
            up["counts"] = client.label_counts[classes.cpu()].to(client.device)
        return up

    def server_update(self, server, uploads):
        return aggregate_protos([u.payload for u in uploads], self.run.num_classes, self.hp.proto_weight)

    def predict(self, client, x):
        model = client.module("model")
        if self.hp.proto_infer == "head":
            return model(x)[0]
        if client.id not in self.held:
            return None  # no global prototype yet: accuracy undefined, not 0
        protos, mask = self.held[client.id]
        h = model.features(x)
        # -||h - P_c||^2 = 2 h.P_c - ||P_c||^2 - ||h||^2; the h.P products are B x m x 500 multiply-adds
        m = int(mask.sum())
        client.count_macs(h.shape[0] * m * h.shape[1])
        score = 2 * h @ protos.T - (protos * protos).sum(1) - (h * h).sum(1, keepdim=True)
        return score.masked_fill(~mask, float("-inf"))
