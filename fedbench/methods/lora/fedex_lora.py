"""FedEx-LoRA, exact aggregation through a residual (Singhal, Ponkshe, Vepakomma; spec §3.8, §6.1-2).

    client k: load the global (A, B) and the residuals it missed; train A and B; send A_k, B_k      P(r) up
    server:   Ā = sum_k p_k A_k,  B̄ = sum_k p_k B_k                              (FedIT's means, p_k ∝ n_k)
              R = sum_k p_k B_k A_k - B̄ Ā  = sum_k p_k (B_k - B̄)(A_k - Ā)
              W0 <- W0 + s R;  global (A, B) <- (Ā, B̄)
    Exact: W0' + s B̄ Ā = W0 + s sum_k p_k B_k A_k, the FedAvg of the effective weights (D_t = 0). R is
    computed against the means as stored (rounded to the adapters' dtype), so nothing is lost between them.
    download: P(r) (the global factors) + the residuals merged since the client's last download:
      ``--fedex-residual dense``  (the reference code) their sum, one d_out x d_in matrix per target;
      ``--fedex-residual factored`` [reconstruction] per missed round the (N-1) rank-r terms of
              R = sum_{i<N} p_i (B_i - B_N)(A_i - Ā)   (the i = N term vanishes since sum_i p_i (A_i - Ā) = 0):
              B_R = [B_1 - B_N ... B_{N-1} - B_N] (d_out x (N-1) r), A_R = [s p_i (A_i - Ā)] ((N-1) r x d_in),
              (N-1) P(r) parameters per round; smaller than dense while (N-1) r (d_in + d_out) < d_in d_out.
The backbone is shared in simulation, so every client computes on the merged backbone at once; the
residuals a client missed are counted in its next download (methods/lora/merge_log.py).

``--reference-quirks`` (RaghavSinghal10/fedex-lora, spec §6.1): uniform weights 1/N instead of p_k, and
the residual added transposed, W0 <- W0 + s R^T. That is a wrong update for square matrices (the
reported D_t shows by how much) and does not fit a non-square one (d_in x d_out into d_out x d_in: the
reference code's add would fail there), so non-square targets (e.g. the ResNet convolutions) are
refused under the quirk with a configuration error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedbench.errors import ConfigError
from fedbench.hparams import hparam
from fedbench.lora import algebra
from fedbench.metering.algebra import product_macs
from fedbench.methods.lora.merge_log import MissedMerges
from fedbench.methods.lora_family import FederatedLoRA, LoRAParams
from fedbench.registry import register_method


def fedex_residual(ps, As, Bs, a_bar=None, b_bar=None) -> torch.Tensor:
    """R = sum_i p_i B_i A_i - B̄ Ā (d_out x d_in; the means may be given, e.g. as rounded for storage)."""
    a_bar = algebra.weighted_sum(ps, As) if a_bar is None else a_bar
    b_bar = algebra.weighted_sum(ps, Bs) if b_bar is None else b_bar
    return algebra.ideal_update(ps, As, Bs, [1.0] * len(ps)) - b_bar @ a_bar


def factored_residual(ps, As, Bs, s: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B_R, A_R) with B_R A_R = s sum_{i<N} p_i (B_i - B_N)(A_i - Ā) = s R when sum_i p_i = 1:
    (N-1) r columns / rows, i.e. (N-1) P(r) parameters."""
    a_bar = algebra.weighted_sum(ps, As)
    last = Bs[-1]
    b = torch.cat([bi - last for bi in Bs[:-1]], dim=1) if len(Bs) > 1 else last[:, :0]
    a = torch.cat([(s * float(p)) * (ai - a_bar) for p, ai in zip(ps[:-1], As[:-1], strict=True)], dim=0) \
        if len(As) > 1 else As[0][:0]
    return b, a


@register_method("fedex-lora")
class FedExLoRA(MissedMerges, FederatedLoRA):
    code = "RaghavSinghal10/fedex-lora"
    paper = "Singhal, Ponkshe, Vepakomma, FedEx-LoRA: exact aggregation for federated LoRA through a residual " \
            "(code: RaghavSinghal10/fedex-lora)"
    trains = ("A", "B")
    sends = ("A", "B")

    @dataclass
    class Params(LoRAParams):
        fedex_residual: str = hparam("dense", "how a download carries the missed residuals: dense (one "
                                              "d_out x d_in matrix per target, as coded) or factored ((N-1) "
                                              "rank-r terms per round, (N-1) P(r))",
                                     choices=("dense", "factored"), marker="reconstruction")

    @classmethod
    def display_name(cls) -> str:
        return "FedEx-LoRA"

    @classmethod
    def label(cls, p) -> str:
        return super().label(p)[:-1] + f", residual={p.fedex_residual})"

    @classmethod
    def check_backbone(cls, p, cfg, backbone):
        targets = super().check_backbone(p, cfg, backbone)
        if p.reference_quirks:
            bad = [t for t in targets if t.d_in != t.d_out]
            if bad:
                raise ConfigError(f"--reference-quirks (fedex-lora adds the residual transposed) needs square "
                                  f"targets; layer {bad[0].name} is {bad[0].d_out} x {bad[0].d_in}")
        return targets

    def download(self, server, client, state):
        payload = super().download(server, client, state)
        payload.update(self.log.payload(client.id, dense=self.hp.fedex_residual == "dense"))
        return payload

    @torch.no_grad()
    def aggregate(self, server, uploads):
        n = len(uploads)
        ps = [1.0 / n] * n if self.hp.reference_quirks else [u.weight for u in uploads]
        s = server.module("lora").scaling
        A, B, part = {}, {}, {"A": {}, "B": {}} if self.hp.fedex_residual == "factored" else {"dense": {}}
        err = 0.0
        for t in self.targets:
            As = [algebra.as_matrix(u.payload["A"][t.key]).double() for u in uploads]
            Bs = [algebra.as_matrix(u.payload["B"][t.key]).double() for u in uploads]
            A[t.key] = algebra.weighted_sum(ps, As).float()
            B[t.key] = algebra.weighted_sum(ps, Bs).float()
            # sum_k p_k B_k A_k and B̄ Ā: N + 1 products of d_out x r x d_in
            server.count_macs((n + 1) * product_macs(t.d_out, As[0].shape[0], t.d_in))
            res = s * fedex_residual(ps, As, Bs, A[t.key].double(), B[t.key].double())
            err += algebra.frob2(res)
            if self.hp.reference_quirks:
                res = res.T  # square targets only (check_backbone)
            self.merge(t.key, res)
            if self.hp.fedex_residual == "dense":
                part["dense"][t.key] = res.float()
            else:
                b, a = factored_residual(ps, As, Bs, s)
                if self.hp.reference_quirks:
                    b, a = a.T, b.T
                part["B"][t.key], part["A"][t.key] = b.float(), a.float()
        self.set_global(server, A, B)
        self.log.record(server.round, part)
        server.report("fedex_residual_norm", err ** 0.5)
