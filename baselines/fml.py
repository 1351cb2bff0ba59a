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
is summed over classes and averaged over the batch ("batchmean"): the paper's rule (Deep Mutual
Learning's KL between the two models' predictions, each model's loss a function of its own parameters
with the other's prediction as its target) and the authors' code (ZJU-DAI/Federated-Mutual-Learning:
``KLDivLoss(reduction='batchmean')`` on ``softmax(other.detach())``, one backward per model).

``--fml-kl htfllib`` trains as TsingZ0/HtFLlib's clientFML instead, for a cross-library check on one
split: ``nn.KLDivLoss()`` with its default element-wise mean (the KL divided by the batch *and* the
class count: 1/K of the paper's KL weight, 1/10 on CIFAR-10), and the other model's output not
detached, so each model also gets the gradient of the other's KL term (HtFLlib backpropagates both
losses before stepping either model). An identical-split CIFAR-10 comparison (a = b = 0.5, 10 rounds)
found HtFLlib's FML 2.4 points above fedbench's and traced it to these two differences (to feed both
the same batches as well: ``--data-order fixed``). The label names the form.

a = b = 0.5 (HtFLlib's tuned script), not its parser default 1.0, which switches mutual distillation off.

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


def kl_elementwise_mean(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(target) || softmax(logits)) with torch's "mean" reduction, as ``nn.KLDivLoss()`` in both
    reference codes (HtFLlib's FML and FedKD): the sum over batch and classes divided by batch x classes.
    Gradients flow into both arguments."""
    total = F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(target_logits, dim=1), reduction="sum",
                     log_target=True)
    return total / logits.numel()  # written out: torch warns that its "mean" will become "batchmean"


KL_FORMS = ("original", "htfllib")


def fml_losses(logits_local: torch.Tensor, logits_meme: torch.Tensor, y: torch.Tensor,
               alpha: float, beta: float, kl: str = "original") -> tuple[torch.Tensor, torch.Tensor]:
    """(L_local, L_meme) of one batch. ``original``: each KL uses the other model's detached output as
    target, so L_local only reaches f_k's parameters and L_meme only the meme's; ``htfllib``: the
    element-wise mean KL, not detached (each loss reaches both models)."""
    if kl == "htfllib":
        return (alpha * F.cross_entropy(logits_local, y) + (1 - alpha) * kl_elementwise_mean(logits_meme, logits_local),
                beta * F.cross_entropy(logits_meme, y) + (1 - beta) * kl_elementwise_mean(logits_local, logits_meme))
    l_local = alpha * F.cross_entropy(logits_local, y) + (1 - alpha) * kl_batchmean(logits_meme.detach(), logits_local)
    l_meme = beta * F.cross_entropy(logits_meme, y) + (1 - beta) * kl_batchmean(logits_local.detach(), logits_meme)
    return l_local, l_meme


class FML(Method):
    code = "ZJU-DAI/Federated-Mutual-Learning; TsingZ0/HtFLlib"
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
        fml_kl: str = hparam("original", "FML: the mutual KL terms: original (the paper and authors' code: KL "
                                         "summed over classes, mean over the batch, the other model's output "
                                         "detached) or htfllib (HtFLlib: element-wise mean, 1/K of it, not "
                                         "detached; for cross-library checks)", choices=KL_FORMS,
                             marker="code: ZJU-DAI/Federated-Mutual-Learning", late=True)

    @classmethod
    def label(cls, p) -> str:
        kl = "KL batchmean" if p.fml_kl == "original" else "KL element-wise mean, not detached: HtFLlib"
        return f"FML (meme={p.shared_model}, alpha={p.fml_alpha}, beta={p.fml_beta}, {kl})"

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
            l_local, l_meme = fml_losses(logits_f, logits_m, y, self.hp.fml_alpha, self.hp.fml_beta, self.hp.fml_kl)
            if self.hp.fml_kl == "htfllib":  # both losses reach both models: one backward of their sum, then
                client.step((opt_f, opt_m), l_local + l_meme)  # each model clipped and stepped on its own
                continue
            # the targets are detached, so the two backward passes touch disjoint parameters and
            # both steps use the outputs of the same forward pass (simultaneous update)
            client.step(opt_f, l_local)
            client.step(opt_m, l_meme)
        return snapshot(meme)

    def server_update(self, server, uploads):
        m = mean([u.payload for u in uploads])  # unweighted (spec C.7)
        load(server.module("meme"), m)
        return m
