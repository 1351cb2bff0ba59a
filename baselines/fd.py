"""FD, Federated Distillation (Jeong et al., 2018), in the HtFLlib form with a probability target (spec C.5).

Algorithm (per round; z_bar_c the global mean logit vector of class c, T the temperature):
    client k (selected), given z_bar (none before the first aggregation):
        E epochs over its data:
            L = CE(f(x), y) + lam * KL( softmax(z_bar_y / T) || softmax(f(x) / T) )
            a sample whose class has no global logit contributes 0 to the KL term
        z_{k,c} = mean of the logits f(x) over the samples of class c, accumulated over all batches of
            all local epochs during training (HtFLlib)
        upload {c: z_{k,c}} for the seen classes (seen x K floats, seen class ids in the smallest
            integer type that holds K: uint8, 1 byte each, for K <= 256)
    server:
        z_bar_c = unweighted mean over the participants holding c of z_{k,c} (HtFLlib)
        broadcast {c: z_bar_c} (at most K x K floats and K class ids)
    inference: the local model f.

Do: the distillation target is a probability distribution, softmax(z_bar_y / T) (spec C.5, T a flag,
default 1) -- not raw averaged logits fed to a cross-entropy as "probabilities", which HtFLlib does
since a 2025-11 change. The KL form has the gradient of CE against softmax(z_bar_y / T); it is not
multiplied by T^2 (the spec's formula; at the default T = 1 the two agree).

--fd-exclude-self [reconstruction; whether the paper excludes a device's own contribution is
unverified]: client k distils towards the mean of the *other* clients' logits. The engine sends one
broadcast to all participants, so the server sends per-class sums and counts instead of means
(m x K floats + m int64 counts + m class ids) and each client removes its own last upload when that upload
went into the sums (it did iff the client took part in the previous round). A class held only by the
client itself has no target.

Client by client under ``--client-batching``: its loss adds the distillation term to CE and it
collects per-label logits during training, so it is not ``StandardTraining`` (not ``batchable``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from baselines.fedproto import ClassMeans, dense
from fedbench.hparams import hparam
from fedbench.metering.comm import class_id_dtype
from fedbench.methods.base import Method


def fd_loss(logits: torch.Tensor, y: torch.Tensor, global_logits: torch.Tensor | None,
            has_global: torch.Tensor | None, lam: float, temperature: float = 1.0) -> torch.Tensor:
    """CE(f(x), y) + lam * mean over the batch of KL(softmax(z_bar_y / T) || softmax(f(x) / T)).

    ``global_logits`` is a (K, K) table, ``has_global`` its (K,) row mask; samples whose class has no
    row contribute 0 (the batch mean still counts them, as HtFLlib's self-target does).
    """
    loss = F.cross_entropy(logits, y)
    if global_logits is None:
        return loss
    target = F.softmax(global_logits[y] / temperature, dim=1)
    kl = F.kl_div(F.log_softmax(logits / temperature, dim=1), target, reduction="none").sum(1)
    kl = torch.where(has_global[y], kl, torch.zeros_like(kl))
    return loss + lam * kl.mean()


def aggregate_logits(uploads: list[dict], num_classes: int, sums_only: bool = False) -> dict[str, torch.Tensor]:
    """Per-class unweighted mean over the uploads holding the class (or the sums and counts)."""
    first = uploads[0]["logits"]
    sums = torch.zeros(num_classes, first.shape[1], dtype=first.dtype, device=first.device)
    count = torch.zeros(num_classes, dtype=torch.int64, device=first.device)
    for u in uploads:
        ids = u["classes"].long()
        sums[ids] += u["logits"]
        count[ids] += 1
    present = count.nonzero().squeeze(1)
    ids = present.to(class_id_dtype(num_classes))
    if sums_only:
        return {"classes": ids, "sums": sums[present], "counts": count[present]}
    return {"classes": ids, "logits": sums[present] / count[present, None].to(first.dtype)}


class FD(Method):
    code = "TsingZ0/HtFLlib (the form implemented)"
    paper = ("Jeong et al., Communication-Efficient On-Device Machine Learning: Federated Distillation and "
             "Augmentation under Non-IID Private Data, NeurIPS-W 2018")
    heterogeneous = True
    push = "selected"

    @dataclass
    class Params:
        lam: float = hparam(1.0, "weight lambda of the distillation term (HtFLlib parser and tuned script: 1)",
                            low=0.0, marker="code: TsingZ0/HtFLlib")
        temperature: float = hparam(1.0, "temperature T of the soft target softmax(z_bar_y / T) and of the "
                                         "student softmax", low=0.0, low_open=True, marker="reconstruction")
        fd_exclude_self: bool = hparam(False, "distil towards the other clients' mean logits only (server "
                                              "sends per-class sums and counts)", marker="reconstruction")

    @classmethod
    def label(cls, p) -> str:
        return f"FD (lam={p.lam}, T={p.temperature}{', exclude-self' if p.fd_exclude_self else ''})"

    def __init__(self, params, run) -> None:
        super().__init__(params, run)
        self.last_up: dict[int, tuple[int, dict]] = {}  # client -> (round, its last upload)

    def targets(self, client, broadcast) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The (K, K) table of distillation targets this client uses this round, and its row mask."""
        K = self.run.num_classes
        if broadcast is None:
            return None, None
        if not self.hp.fd_exclude_self:
            return dense(broadcast["classes"], broadcast["logits"], K)
        sums, _ = dense(broadcast["classes"], broadcast["sums"], K)
        counts = torch.zeros(K, dtype=torch.int64, device=sums.device)
        counts[broadcast["classes"].long()] = broadcast["counts"]
        last = self.last_up.get(client.id)
        if last is not None and last[0] == client.round - 1:  # my upload is inside these sums
            mine = last[1]["classes"].long()
            sums[mine] -= last[1]["logits"]
            counts[mine] -= 1
        has = counts > 0
        return sums / counts.clamp(min=1)[:, None].to(sums.dtype), has

    def client_update(self, client, broadcast):
        K, hp = self.run.num_classes, self.hp
        model = client.module("model")
        z_bar, has = self.targets(client, broadcast)
        opt = client.optimizer(model.parameters())
        acc = ClassMeans(K, K, client.device)
        for x, y in client.batches(self.run.epochs):
            logits, _ = model(x)
            client.step(opt, fd_loss(logits, y, z_bar, has, hp.lam, hp.temperature))
            acc.add(logits, y)  # per-label logits of the drifting model, as HtFLlib
        classes, means = acc.result()
        up = {"classes": classes.to(class_id_dtype(K)), "logits": means}
        if hp.fd_exclude_self:
            self.last_up[client.id] = (client.round, up)
        return up

    def server_update(self, server, uploads):
        return aggregate_logits([u.payload for u in uploads], self.run.num_classes,
                                sums_only=self.hp.fd_exclude_self)
