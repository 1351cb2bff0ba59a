"""FedRot-LoRA, rotation-aligned factor averaging (Zhang, Kim, Cha, Vikalo, ICML 2026; spec §3.10).

    client k: load the global (A_ref, B_ref) broadcast at the start of the round; train A_k, B_k;
              align with an orthogonal Procrustes rotation R (r x r, det +1) to the reference factor:
                on A: M = A_k A_ref^T,   on B: M = B_k^T B_ref;   U, S, V^T = svd(M),  R = U V^T
                (if det R < 0 the sign of the last row of V^T is flipped: the best proper rotation)
                soft (``--fedrot-lambda`` λ < 1): R <- polar((1 - λ) I + λ R)
              send A_k <- R^T A_k, B_k <- B_k R    (the product B_k A_k is unchanged)     P(r) up
    server:   A <- sum_k p_k A_k,  B <- sum_k p_k B_k   (FedAvg of the rotated factors)     P(r) down
Which factor is aligned: the official code (haoran-zh/FedRot-LoRA, ``federatedscope/core/workers/
client.py``, FederatedScope rounds ("states") counted from 0) rotates only when ``state > 0`` ("the first
round cannot rotate") and then aligns A when ``state % 2 != swap_offset``, else B, where
``initialshare: 'A'`` (in the configurations read: glue/yamls/base_fedlora2.yaml,
llm/yamls/base_fedrot_lora.yaml) gives ``swap_offset = 0``: state 0 aligns nothing, state 1
aligns A, state 2 B, state 3 A, ... In fedbench's 1-based rounds: round 1 nothing, then A in even rounds
and B in odd ones (``aligned_factor``). ``--fedrot-align`` ``alternate`` is that schedule, ``A`` or ``B``
the code's ablations (``lora.ablation``: always that factor, still not in the first round).
``--fedrot-phase early`` [reconstruction] is fedbench's earlier schedule, one round ahead of the code
(alignment from round 1: A in odd rounds, B in even; the A/B ablations from round 1 too), kept to
reproduce the readings taken with it; the label names it.
With the hard rotation the result does not depend on how a client's factors are rotated on input (R
absorbs any proper rotation), which is what averaging misaligned factors lacks. The code's hard path
(``rotate_lambda > 1``) takes U V^T without the det fix; its ``rotate_lambda <= 1`` path (λ = 1 included)
applies the fix; fedbench applies it for every λ.
Reported: ``fedit_factor_error`` of the rotated factors (the error left after alignment). The rotation
is client compute, metered by formula (M, the r x r SVD or two for the soft version, R^T A and B R).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedbench.hparams import hparam
from fedbench.lora import algebra
from fedbench.metering.algebra import product_macs, svd_macs
from fedbench.methods.lora_family import FederatedLoRA, LoRAParams
from fedbench.registry import register_method


def _proper(u: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """U V^T, with the last row of V^T negated when that makes det = +1."""
    r = u @ vh
    if torch.linalg.det(r) < 0:
        vh = vh.clone()
        vh[-1] = -vh[-1]
        r = u @ vh
    return r


def procrustes(m: torch.Tensor, proper: bool = True) -> torch.Tensor:
    """The orthogonal R maximising tr(R^T M) (= minimising ||R^T X - Y|| for M = X Y^T); det +1 if proper."""
    u, _, vh = torch.linalg.svd(m)
    return _proper(u, vh) if proper else u @ vh


def alignment(a: torch.Tensor, b: torch.Tensor, a_ref: torch.Tensor, b_ref: torch.Tensor, on: str,
              lam: float = 1.0, proper: bool = True) -> torch.Tensor:
    """The client's rotation R (r x r): Procrustes of A to A_ref (on "A") or of B to B_ref (on "B");
    softened to polar((1 - λ) I + λ R) for λ < 1."""
    m = a @ a_ref.T if on == "A" else b.T @ b_ref
    r = procrustes(m, proper)
    if lam < 1:
        eye = torch.eye(r.shape[0], dtype=r.dtype, device=r.device)
        r = procrustes((1 - lam) * eye + lam * r, proper)  # polar factor
    return r


def rotate(a: torch.Tensor, b: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R^T A, B R): the same product B A in the rotated basis."""
    return r.T @ a, b @ r


@register_method("fedrot-lora")
class FedRotLoRA(FederatedLoRA):
    code = "haoran-zh/FedRot-LoRA"
    paper = "Zhang, Kim, Cha, Vikalo, FedRot-LoRA: rotation-aligned factor averaging, ICML 2026 (arXiv 2602.23638)"
    trains = ("A", "B")
    sends = ("A", "B")

    @dataclass
    class Params(LoRAParams):
        fedrot_align: str = hparam("alternate", "factor aligned to the reference: alternate (the official "
                                                "schedule: A, then B, then A, ... from round 2; see --fedrot-phase), "
                                                "A or B (the code's ablations)",
                                    choices=("alternate", "A", "B"))
        fedrot_phase: str = hparam("reference", "when alignment starts: reference (the official code: round 1 "
                                                "aligns nothing, round 2 A, round 3 B, ...) or early (fedbench's "
                                                "earlier schedule, one round ahead: round 1 A, round 2 B, ...)",
                                   choices=("reference", "early"))
        fedrot_lambda: float = hparam(1.0, "soft rotation polar((1-λ) I + λ R); λ >= 1 is the hard rotation R",
                                      low=0.0)

    @classmethod
    def display_name(cls) -> str:
        return "FedRot-LoRA"

    @classmethod
    def label(cls, p) -> str:
        phase = "" if p.fedrot_phase == "reference" else f", phase={p.fedrot_phase}"
        return super().label(p)[:-1] + f", align={p.fedrot_align}{phase}, lambda={p.fedrot_lambda})"

    def aligned_factor(self, t: int) -> str | None:
        """The factor aligned in (1-based) round ``t``, or None: the official code's state is t - 1."""
        state = t if self.hp.fedrot_phase == "early" else t - 1  # "early": fedbench's old phase
        if state <= 0:
            return None
        if self.hp.fedrot_align != "alternate":
            return self.hp.fedrot_align
        return "A" if state % 2 == 1 else "B"

    def client_update(self, client, payload):
        self.install(client, payload)
        ref = self.factors_of(client, ("A", "B"))  # the reference: what the server broadcast this round
        self.train(client)
        self.align(client, ref)
        self._record_end(client)
        return self.upload(client)

    @torch.no_grad()
    def align(self, client, ref: dict) -> None:
        on = self.aligned_factor(client.round)
        if on is None:
            return
        ad = client.module("lora")
        for t in self.targets:
            a, b = ad.factors(t.key)
            a64, b64 = a.double(), b.double()
            r = alignment(a64, b64, ref["A"][t.key].reshape(a.shape).double(),
                          ref["B"][t.key].reshape(b.shape).double(), on, self.hp.fedrot_lambda)
            a_new, b_new = rotate(a64, b64, r)
            ad.lora_A[t.key].weight.copy_(a_new.reshape(ad.lora_A[t.key].weight.shape))
            ad.lora_B[t.key].weight.copy_(b_new.reshape(ad.lora_B[t.key].weight.shape))
            k = a.shape[0]
            # M (k x d x k), svd of M (and of the soft polar), R^T A, B R
            client.count_macs(product_macs(k, t.d_in if on == "A" else t.d_out, k)
                              + svd_macs(k, k) * (2 if self.hp.fedrot_lambda < 1 else 1)
                              + product_macs(k, k, t.d_in) + product_macs(t.d_out, k, k))

    @torch.no_grad()
    def aggregate(self, server, uploads):
        ps = [u.weight for u in uploads]
        s = server.module("lora").scaling
        A, B = {}, {}
        err = 0.0
        for t in self.targets:
            As = [algebra.as_matrix(u.payload["A"][t.key]).double() for u in uploads]
            Bs = [algebra.as_matrix(u.payload["B"][t.key]).double() for u in uploads]
            A[t.key], B[t.key] = algebra.weighted_sum(ps, As), algebra.weighted_sum(ps, Bs)
            err += algebra.frob2(algebra.fedit_error(ps, [a.double() for a in As], [b.double() for b in Bs], s))
        self.set_global(server, A, B)
        server.report("fedit_factor_error", err ** 0.5)
