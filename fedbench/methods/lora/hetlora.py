"""HetLoRA as zero-padding aggregation (Cho et al., arXiv 2401.06432; spec §3.4).

    server keeps a global LoRA of rank r_max (scaling s = alpha / r_max)
    client k: receive the truncation B[:, :r_k], A[:r_k, :]; train its rank-r_k LoRA at scaling s_k
              (``--rank-scaling``, default constant: s_k = s, so it starts at the global model's rank-r_k
              truncation); send A_k, B_k                                                     P(r_k)
    server:   zero-pad every client's factors to r_max; A <- sum_k w_k pad(A_k), B <- sum_k w_k pad(B_k)
              w_k = p_k (``--hetlora-weight data``, the verified re-implementations) or
              w_k = ||s_k B_k A_k||_F / sum_j ||s_j B_j A_j||_F per matrix (``norm``, the paper's figure:
              the norm of each client's update as it acts, its scaling included)
Not exact: padded factor averaging keeps FedIT's cross terms (and, unless the scaling is constant, mixes
clients' scalings).
The paper's rank self-pruning is not implemented (its form is unverified, spec §9), so the label says
"zero-padding" with the weighting used, never plain "HetLoRA".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedbench.hparams import hparam
from fedbench.lora import algebra
from fedbench.methods.lora_family import FederatedLoRA, RankScalingParams
from fedbench.registry import register_method


@register_method("hetlora")
class HetLoRA(FederatedLoRA):
    rule_revision = 1  # 1: --rank-scaling constant; norm weights include each client's scaling
    code = "none (a re-implementation in alibaba/FederatedScope, FlexLoRA branch)"
    paper = "Cho et al., Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models, arXiv 2401.06432"
    heterogeneous_ranks = True

    @dataclass
    class Params(RankScalingParams):
        hetlora_weight: str = hparam("data", "aggregation weights: data (p_k, as FederatedScope/FederatedLLM) or "
                                             "norm (||B_k A_k||, the paper's sparsity weighting)",
                                     choices=("data", "norm"), marker="reconstruction")

    @classmethod
    def display_name(cls) -> str:
        return "HetLoRA/zero-padding"

    @classmethod
    def label(cls, p) -> str:
        return super().label(p)[:-1] + f", weights={p.hetlora_weight})"

    @torch.no_grad()
    def aggregate(self, server, uploads):
        r = self.r_global
        A, B = {}, {}
        for t in self.targets:
            As = [u.payload["A"][t.key] for u in uploads]
            Bs = [u.payload["B"][t.key] for u in uploads]
            if self.hp.hetlora_weight == "norm":
                ss = [self.client_scaling(self.ranks[u.client]) for u in uploads]
                norms = [s * float(torch.linalg.matrix_norm(b @ a)) for s, a, b in zip(ss, As, Bs, strict=True)]
                total = sum(norms)
                ws = [n / total for n in norms] if total > 0 else [u.weight for u in uploads]
            else:
                ws = [u.weight for u in uploads]
            A[t.key] = algebra.weighted_sum(ws, [algebra.zero_pad(a, r, 0) for a in As])
            B[t.key] = algebra.weighted_sum(ws, [algebra.zero_pad(b, r, 1) for b in Bs])
        self.set_global(server, A, B)
