"""FML: Federated Mutual Learning (Shen et al., 2020), as specified in spec C.7.

Each client k holds its private heterogeneous model f_k and a copy m of the shared homogeneous
**meme** model (CNN-5 by default). Per round:

    receive the global meme m
    for E epochs, on every batch (x, y), both models step together:
        L_local = a CE(f_k(x), y) + (1 - a) KL(softmax(m(x)) || softmax(f_k(x)))
        L_meme  = b CE(m(x), y)   + (1 - b) KL(softmax(f_k(x)) || softmax(m(x)))
    upload m
server:
    m = (1/|S|) sum_k m_k          (unweighted mean, as HtFLlib and the original code)
evaluation: f_k alone (the default predict of Method: the client's "model").

In each KL the first argument is the *other* model's output, used as a detached target, and the KL
is averaged per sample ("batchmean"), as the original code (ZJU-DAI/Federated-Mutual-Learning) does;
not HtFLlib's element-wise mean. a = b = 0.5 (HtFLlib's tuned script), not its parser default 1.0,
which switches mutual distillation off.

The meme goes only to the clients selected in a round (``push = "selected"``): a client overwrites
its meme with the global one at the start of its round and evaluates with f_k alone, so a copy sent
to a client that does not train would never be used (spec A.6 lists no broadcast-to-all for FML).

Client by client under ``--client-batching``: it trains two models (f_k and the meme) together,
so it is not ``StandardTraining`` (not ``batchable``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedbench.hparams import hparam
from fedbench.methods.base import Method, load, mean, snapshot
from fedbench.models.cnn import CNN_WIDTHS, cnn_spec

SHARED_MODELS = tuple(CNN_WIDTHS)


def kl_batchmean(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(target) || softmax(logits)), summed over classes, averaged over the batch."""
    return F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(target_logits, dim=1),
                    reduction="batchmean", log_target=True)


def fml_losses(logits_local: torch.Tensor, logits_meme: torch.Tensor, y: torch.Tensor,
               alpha: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_local, L_meme) of one batch; each KL uses the other model's detached output as target,
    so L_local only reaches f_k's parameters and L_meme only the meme's."""
    l_local = alpha * F.cross_entropy(logits_local, y) + (1 - alpha) * kl_batchmean(logits_meme.detach(), logits_local)
    l_meme = beta * F.cross_entropy(logits_meme, y) + (1 - beta) * kl_batchmean(logits_local.detach(), logits_meme)
    return l_local, l_meme


class FML(Method):
    paper = "Shen et al., Federated Mutual Learning, arXiv 2006.16765 (2020)"
    heterogeneous = True
    push = "selected"

    @dataclass
    class Params:
        # named fml_alpha / fml_beta because the core already owns --alpha (Dirichlet concentration)
        fml_alpha: float = hparam(0.5, "FML: weight a of CE in the private model's loss (1 - a on its KL to the meme)",
                                  low=0.0, high=1.0, marker="code: HtFLlib tuned script")
        fml_beta: float = hparam(0.5, "FML: weight b of CE in the meme's loss (1 - b on its KL to the private model)",
                                 low=0.0, high=1.0, marker="code: HtFLlib tuned script")
        shared_model: str = hparam("cnn5", "architecture of the shared model (FML meme, FedKD mentee), the same "
                                           "for every client", choices=SHARED_MODELS)

    @classmethod
    def label(cls, p) -> str:
        return f"FML (meme={p.shared_model}, alpha={p.fml_alpha}, beta={p.fml_beta}, KL batchmean)"

    def meme_spec(self):
        return cnn_spec(self.hp.shared_model, self.run.num_classes)

    # --- algorithm ----------------------------------------------------------------------------
    def client_init(self, client):
        client.own("model", client.model_spec)
        client.own("meme", self.meme_spec())

    def server_init(self, server):
        return snapshot(server.own("meme", self.meme_spec()))

    def client_update(self, client, meme_global):
        model, meme = client.module("model"), client.module("meme")
        load(meme, meme_global)
        # two optimisers, so that each model's gradient is clipped on its own (as HtFLlib does)
        opt_f = client.optimizer(model.parameters())
        opt_m = client.optimizer(meme.parameters())
        for x, y in client.batches(self.run.epochs):
            logits_f, _ = model(x)
            logits_m, _ = meme(x)
            l_local, l_meme = fml_losses(logits_f, logits_m, y, self.hp.fml_alpha, self.hp.fml_beta)
            # the targets are detached, so the two backward passes touch disjoint parameters and
            # both steps use the outputs of the same forward pass (simultaneous update)
            client.step(opt_f, l_local)
            client.step(opt_m, l_meme)
        return snapshot(meme)

    def server_update(self, server, uploads):
        m = mean([u.payload for u in uploads])  # unweighted (spec C.7)
        load(server.module("meme"), m)
        return m
