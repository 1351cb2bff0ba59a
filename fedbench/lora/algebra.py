"""The exact algebra of federated LoRA aggregation (spec §5), in PEFT's layout: A is r x d_in, B is
d_out x r, the update is s B A. Pure functions of tensors (any float dtype: the identity tests run them
in float64); methods call them and declare their cost with ``count`` (MACs, metering/algebra.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from fedbench.metering.algebra import product_macs, svd_macs

Count = Callable[[int], None] | None


def weighted_sum(ps: Sequence[float], xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_i p_i X_i."""
    out = torch.zeros_like(xs[0])
    for p, x in zip(ps, xs, strict=True):
        out.add_(x, alpha=float(p))
    return out


def ideal_update(ps, As, Bs, ss, count: Count = None) -> torch.Tensor:
    """FedAvg of the clients' effective updates: sum_i p_i s_i B_i A_i (d_out x d_in)."""
    out = None
    for p, a, b, s in zip(ps, As, Bs, ss, strict=True):
        a, b = as_matrix(a), as_matrix(b)  # a convolution's factors in matrix form
        if count is not None:
            count(product_macs(b.shape[0], b.shape[1], a.shape[1]))
        term = (float(p) * float(s)) * (b @ a)
        out = term if out is None else out + term
    return out


def fedit_error(ps, As, Bs, s: float) -> torch.Tensor:
    """s (sum_i p_i B_i A_i - B_bar A_bar): what averaging the factors separately loses (spec §5.1);
    equal to s sum_i p_i (B_i - B_bar)(A_i - A_bar) when sum p_i = 1."""
    a_bar, b_bar = as_matrix(weighted_sum(ps, As)), as_matrix(weighted_sum(ps, Bs))
    return ideal_update(ps, As, Bs, [s] * len(ps)) - s * (b_bar @ a_bar)


def deviation_parts(ps, ends, starts, agg) -> tuple[float, float]:
    """The two squared norms of D_t (the aggregation deviation) for one tensor: ||agg - sum_i p_i end_i||_F^2 (what the
    server's aggregate misses of the FedAvg of the clients' end states) and ||sum_i p_i (end_i - start_i)||_F^2
    (the round's FedAvg movement), in float64. ``ends`` / ``starts``: each client's tensor at the end and the
    start of its local round (effective updates s B A, or a shared factor alone for a personalised method's
    shared part); ``agg`` what the server keeps. D_t = sqrt(sum of the first / sum of the second) over the
    tensors of a model (or of a cluster)."""
    ideal = weighted_sum(ps, [e.double() for e in ends])
    moved = ideal - weighted_sum(ps, [s.double() for s in starts])
    return frob2(agg.double() - ideal), frob2(moved)


def zero_pad(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Pad factor ``x`` with zeros along its rank dimension ``dim`` (0 for A, 1 for B) to rank r."""
    if x.shape[dim] == r:
        return x
    shape = list(x.shape)
    shape[dim] = r - x.shape[dim]
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def stack(ps, As, Bs, ss, s_out: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """FLoRA's stacking: A_stack = [c_1 A_1; ...; c_N A_N] (rows), B_stack = [B_1 ... B_N] (columns) with
    c_i = p_i s_i / s_out, so that s_out B_stack A_stack = sum_i p_i s_i B_i A_i exactly (rank sum r_i).
    Only A carries the weights, as in the reference code."""
    a = torch.cat([(float(p) * float(s) / s_out) * x for p, x, s in zip(ps, As, ss, strict=True)], dim=0)
    b = torch.cat(list(Bs), dim=1)
    return a, b


def svd(delta: torch.Tensor, count: Count = None):
    """Thin SVD of an update matrix, metered."""
    if count is not None:
        count(svd_macs(*delta.shape))
    return torch.linalg.svd(delta, full_matrices=False)


def truncate(u, sv, vh, r: int, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r factors of U diag(sv) V^T for a client of scaling s, FlexLoRA's split: all singular values
    into B: B = U_r diag(sv_r) / s, A = V_r^T, so that s B A = T_r(delta)."""
    r = min(r, sv.shape[0])
    return (u[:, :r] * sv[:r]) / s, vh[:r].clone()


def tail_energy(sv: torch.Tensor, r: int) -> float:
    """sum_{j > r} sigma_j^2: the squared Frobenius error of the best rank-r approximation."""
    return float(sv[r:].double().square().sum())


def frob2(x: torch.Tensor) -> float:
    return float(x.double().square().sum())


def as_matrix(x: torch.Tensor) -> torch.Tensor:
    """A factor in PEFT's matrix layout (a convolution's A, r x c x kh x kw, flattened to r x c kh kw)."""
    return x.reshape(x.shape[0], -1)
