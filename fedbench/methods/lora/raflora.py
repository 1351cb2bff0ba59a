"""raFLoRA, rank-partitioned aggregation (Wu, Hu, Min, Wang, "Preventing Rank Collapse in Federated
Low-Rank Adaptation with Client Heterogeneity", arXiv 2602.13486; spec §3.7). No code was found; the
weights are the spec's reconstruction of the paper's sentence.

    client k: as FlexLoRA: start from the rank-r_k SVD truncation of the global update; train; send A_k, B_k
    server:   distinct participant ranks r_(1) < ... < r_(m), r_(0) = 0; segment j = rank indices
              [r_(j-1), r_(j)), held by C_j = {k : r_k >= r_(j)};
              ΔW = sum_j sum_{k in C_j} (p_k / sum_{l in C_j} p_l) s_k B_k[:, seg_j] A_k[seg_j, :]
              then U, S, V^T = svd(ΔW) and the per-rank allocation of FlexLoRA (all of S into B)
Why: with rank-agnostic weights p_k the components above r_min get contributions only from the clients
that hold them but are divided by everyone's weight, and the energy collapses into the top r_min
singular values; ``energy_ratio_rmin`` = sum_{j <= r_min} sigma_j^2 / sum_j sigma_j^2 is reported every
round (with FlexLoRA's truncation errors). With one rank for all it is FlexLoRA.
``--raflora-weight data``: p_k on every segment (= FlexLoRA), the ablation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedbench.hparams import hparam
from fedbench.lora.algebra import as_matrix
from fedbench.metering.algebra import product_macs
from fedbench.methods.lora.flexlora import FlexLoRA
from fedbench.methods.lora_family import RankScalingParams
from fedbench.registry import register_method


def partitions(ranks: list[int]) -> list[tuple[int, int, list[int]]]:
    """(lo, hi, members) per segment [lo, hi) of the sorted distinct ranks; members: the positions i
    with ranks[i] >= hi, i.e. the clients that hold the whole segment."""
    out, lo = [], 0
    for hi in sorted(set(ranks)):
        out.append((lo, hi, [i for i, r in enumerate(ranks) if r >= hi]))
        lo = hi
    return out


def partitioned_update(ps, As, Bs, ss, renorm: bool = True, count=None) -> torch.Tensor:
    """sum_j sum_{k in C_j} w_jk s_k B_k[:, seg_j] A_k[seg_j]; w_jk = p_k / sum_{l in C_j} p_l (renorm)
    or p_k."""
    out = None
    for lo, hi, members in partitions([a.shape[0] for a in As]):
        total = sum(float(ps[i]) for i in members) if renorm else 1.0
        for i in members:
            b, a = as_matrix(Bs[i])[:, lo:hi], as_matrix(As[i])[lo:hi]  # a convolution's in matrix form
            if count is not None:
                count(product_macs(b.shape[0], b.shape[1], a.shape[1]))
            term = (float(ps[i]) / total * float(ss[i])) * (b @ a)
            out = term if out is None else out + term
    return out


@register_method("raflora")
class RaFLoRA(FlexLoRA):
    rule_revision = 1  # 1: --rank-scaling constant under mixed ranks
    code = "none found"
    paper = "Wu, Hu, Min, Wang, Preventing Rank Collapse in Federated Low-Rank Adaptation with Client " \
            "Heterogeneity (raFLoRA), arXiv 2602.13486"

    @dataclass
    class Params(RankScalingParams):
        raflora_weight: str = hparam("renorm", "weights of each rank segment: renorm (p_k over the clients that "
                                               "hold the segment) or data (p_k over all: FlexLoRA)",
                                     choices=("renorm", "data"), marker="reconstruction")

    @classmethod
    def display_name(cls) -> str:
        return "raFLoRA"

    @classmethod
    def label(cls, p) -> str:
        return super().label(p)[:-1] + f", weights={p.raflora_weight})"

    def update_matrix(self, ps, As, Bs, ss, count) -> torch.Tensor:
        return partitioned_update(ps, As, Bs, ss, self.hp.raflora_weight == "renorm", count)
