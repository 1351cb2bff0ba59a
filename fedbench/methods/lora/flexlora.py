"""FlexLoRA (Bai et al., arXiv 2402.11505; spec §3.6).

    client k: start from the server's rank-r_k truncation of the global update; train; send A_k, B_k   P(r_k)
    server:   ΔW = sum_k p_k s_k B_k A_k  (full d_out x d_in per matrix);  U, S, V^T = svd(ΔW)
              for each client rank r: B^(r) = U_r diag(S_r) / s_r,  A^(r) = V_r^T   (all of S into B)
s_k is the client's scaling under ``--rank-scaling`` (FederatedScope's code: per-rank, 16 / r_k).
Exact up to truncation: a rank-r client starts from T_r(ΔW), losing sqrt(sum_{j>r} sigma_j^2); reported
per client rank as ``trunc_err_r{r}`` (absolute, over all matrices) and ``trunc_err_rel_r{r}``, with the
energy ratio ``energy_ratio_rmin`` = sum_{j<=r_min} sigma_j^2 / sum_j sigma_j^2. The server's global
model is T_{r_max}(ΔW). One SVD per matrix per round, metered.

``--reference-quirks``: the FederatedScope branch hard-codes alpha = 16 in the merge rate 16 / r_k (§6.7).
"""

from __future__ import annotations

import torch

from fedbench.lora import algebra
from fedbench.methods.lora_family import FederatedLoRA, RankScalingParams
from fedbench.registry import register_method


@register_method("flexlora")
class FlexLoRA(FederatedLoRA):
    rule_revision = 1  # 1: --rank-scaling constant under mixed ranks
    code = "alibaba/FederatedScope (FlexLoRA branch)"
    paper = "Bai et al., Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client " \
            "Resources (FlexLoRA), arXiv 2402.11505"
    heterogeneous_ranks = True
    Params = RankScalingParams

    @classmethod
    def display_name(cls) -> str:
        return "FlexLoRA"

    def setup(self, server, clients):
        super().setup(server, clients)
        self.factors: dict[str, tuple] = {}  # key -> (U, S, Vh) of the last aggregate

    def rate(self, r: int) -> float:
        """The scaling a rank-r client's update enters ΔW with."""
        return 16.0 / r if self.hp.reference_quirks else self.client_scaling(r)

    def download(self, server, client, state):
        if not self.factors:
            return super().download(server, client, state)
        r = self.ranks[client.id]
        s = client.module("lora").scaling
        A, B = {}, {}
        ad = client.module("lora")
        for key, (u, sv, vh) in self.factors.items():
            b, a = algebra.truncate(u, sv, vh, r, s)
            # in the client's layout (a convolution's factors are 4-d)
            B[key], A[key] = b.reshape(ad.lora_B[key].weight.shape), a.reshape(ad.lora_A[key].weight.shape)
        payload = {"A": A, "B": B}
        if self.hp.head == "shared":
            payload["head"] = self.head_of(server)
        return payload

    def update_matrix(self, ps, As, Bs, ss, count) -> torch.Tensor:
        """The full update the SVD allocates: sum_k p_k s_k B_k A_k (raFLoRA overrides it)."""
        return algebra.ideal_update(ps, As, Bs, ss, count)

    @torch.no_grad()
    def aggregate(self, server, uploads):
        ps = [u.weight for u in uploads]
        ranks = sorted(set(self.ranks))
        r_min = min(ranks)
        tails = dict.fromkeys(ranks, 0.0)
        total = head = 0.0
        s_g = server.module("lora").scaling
        A_g, B_g = {}, {}
        for t in self.targets:
            As = [u.payload["A"][t.key] for u in uploads]
            Bs = [u.payload["B"][t.key] for u in uploads]
            ss = [self.rate(self.ranks[u.client]) for u in uploads]
            delta = self.update_matrix(ps, As, Bs, ss, server.count_macs)
            u_, sv, vh = algebra.svd(delta, server.count_macs)
            self.factors[t.key] = (u_, sv, vh)
            B_g[t.key], A_g[t.key] = algebra.truncate(u_, sv, vh, self.r_global, s_g)
            e = sv.double().square()
            total += float(e.sum())
            head += float(e[:r_min].sum())
            for r in ranks:
                tails[r] += algebra.tail_energy(sv, r)
        self.set_global(server, A_g, B_g)
        for r in ranks:
            server.report(f"trunc_err_r{r}", tails[r] ** 0.5)
            server.report(f"trunc_err_rel_r{r}", (tails[r] / total) ** 0.5 if total > 0 else 0.0)
        server.report("energy_ratio_rmin", head / total if total > 0 else 1.0)
