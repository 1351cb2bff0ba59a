"""FRLoRA, federated residual LoRA (Yan et al., ICLR 2025; spec §3.11).

    set-up:   per adapted W0 (d_out x d_in): V, S, U^T = svd(W0)   (server; its cost is metered in round 1)
              B0 = V_r diag(sqrt(S_r / s)),  A0 = diag(sqrt(S_r / s)) U^T_r        (principal init)
              W_res = W0 - s B0 A0, merged once into the shared backbone, so W_res + s B0 A0 = W0
    client k: every round start from the same fixed (B0, A0) (each client derives them from W0 itself);
              train A and B; send A_k, B_k                                                       P(r) up
    server:   Ā = sum_k p_k A_k, B̄ = sum_k p_k B_k;  ΔW = s (B̄ Ā - B0 A0);  W_res <- W_res + ΔW;
              the global LoRA stays (B0, A0): global effective weight W_res' + s B0 A0 = W_res + s B̄ Ā
    download: the merges the client missed, each as factors [B̄, B0] [s Ā; -s A0] [reconstruction],
              2 P(r) per missed round (``--frlora-download dense``: their sum, one d_out x d_in matrix per
              target); the fixed init itself never travels
Not exact: FedIT's factor averaging is inside, so D_t equals FedIT's factor error (reported as
``fedit_factor_error``). The backbone accumulates a full-rank residual while every round's LoRA starts in
the principal subspace.

``--reference-quirks``: uniform weights 1/N (IAMJackYan/FRLoRA overrides the sample counts with ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedbench.hparams import hparam
from fedbench.lora import algebra
from fedbench.lora.layers import scaling
from fedbench.metering.algebra import product_macs
from fedbench.methods.lora.merge_log import MissedMerges
from fedbench.methods.lora_family import FederatedLoRA, LoRAParams
from fedbench.registry import register_method


def principal_init(w0: torch.Tensor, r: int, s: float, count=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B0, A0) with s B0 A0 = T_r(W0), the singular values split evenly between the factors."""
    v, sv, uh = algebra.svd(w0, count)
    root = (sv[:r] / s).sqrt()
    return v[:, :r] * root, root[:, None] * uh[:r]


def merge_factors(a_bar, b_bar, a0, b0, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """([B̄, B0], [s Ā; -s A0]): their product is s (B̄ Ā - B0 A0), 2 P(r) parameters."""
    return torch.cat([b_bar, b0], dim=1), torch.cat([s * a_bar, -s * a0], dim=0)


@register_method("frlora")
class FRLoRA(MissedMerges, FederatedLoRA):
    code = "IAMJackYan/FRLoRA"
    paper = "Yan et al., FRLoRA: federated residual low-rank adaptation, ICLR 2025 (code: IAMJackYan/FRLoRA)"
    trains = ("A", "B")
    sends = ("A", "B")

    @dataclass
    class Params(LoRAParams):
        frlora_download: str = hparam("factored", "how a download carries the missed merges: factored ([B̄, B0] "
                                                  "[Ā; -A0] per round, 2 P(r)) or dense (their sum, d_out x d_in "
                                                  "per target)", choices=("factored", "dense"),
                                      marker="reconstruction")

    @classmethod
    def display_name(cls) -> str:
        return "FRLoRA"

    @classmethod
    def label(cls, p) -> str:
        return super().label(p)[:-1] + f", download={p.frlora_download})"

    def setup(self, server, clients):
        super().setup(server, clients)
        self.init: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> (A0, B0) as matrices, float64
        self._setup_macs = 0
        s = scaling(self.hp.lora_alpha, self.r_global, self.hp.rslora)
        for t in self.targets:
            layer = self.layers[t.key]
            b0, a0 = principal_init(layer.weight().double(), self.r_global, s, self._count_setup)
            a0, b0 = a0.float().double(), b0.float().double()  # as the adapters will hold them
            self.init[t.key] = (a0, b0)
            self._setup_macs += product_macs(t.d_out, self.r_global, t.d_in)  # s B0 A0
            layer.merge(-s * (b0 @ a0))

    def _count_setup(self, macs: int) -> None:
        self._setup_macs += macs

    def server_init(self, server):
        state = super().server_init(server)
        self.set_global(server, {k: a for k, (a, _) in self.init.items()}, {k: b for k, (_, b) in self.init.items()})
        self.start = self.factors_of(server, ("A", "B"))  # (A0, B0) in the adapters' shapes
        return state

    def download(self, server, client, state):
        payload = self.log.payload(client.id, dense=self.hp.frlora_download == "dense")
        if self.hp.head == "shared":
            payload["head"] = self.head_of(server)
        return payload

    def install(self, party, payload):
        super().install(party, {**self.start, **payload})  # the fixed start, derived locally from W0

    @torch.no_grad()
    def aggregate(self, server, uploads):
        if self._setup_macs:
            server.count_macs(self._setup_macs)  # the set-up SVDs (no meter scope is open at set-up)
            self._setup_macs = 0
        n = len(uploads)
        ps = [1.0 / n] * n if self.hp.reference_quirks else [u.weight for u in uploads]
        s = server.module("lora").scaling
        part = {"A": {}, "B": {}}
        err = 0.0
        for t in self.targets:
            As = [algebra.as_matrix(u.payload["A"][t.key]).double() for u in uploads]
            Bs = [algebra.as_matrix(u.payload["B"][t.key]).double() for u in uploads]
            a_bar, b_bar = algebra.weighted_sum(ps, As), algebra.weighted_sum(ps, Bs)
            a0, b0 = (x.double() for x in self.init[t.key])
            b_m, a_m = merge_factors(a_bar, b_bar, a0, b0, s)
            server.count_macs(product_macs(t.d_out, b_m.shape[1], t.d_in))
            self.merge(t.key, b_m @ a_m)
            part["B"][t.key], part["A"][t.key] = b_m.float(), a_m.float()
            err += algebra.frob2(algebra.fedit_error(ps, As, Bs, s))
        self.log.record(server.round, part)
        server.report("fedit_factor_error", err ** 0.5)
