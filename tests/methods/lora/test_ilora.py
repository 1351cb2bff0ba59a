"""ILoRA's server split (a reconstruction: the paper stops before it): QR of the stacked B_c, then the SVD
of the small R A_c factor, so each client receives the best rank-r_k approximation of the exact
aggregate sum_k p_k s_k B_k A_k, whatever the order of the uploads."""

from __future__ import annotations

import itertools
import math

import torch
from test_lora_family import rand_factors

from fedbench.lora import algebra
from fedbench.methods.lora.ilora import split, stacked_svd

F64 = torch.float64


def _e(n, i):
    return torch.eye(n, dtype=F64)[:, i:i + 1]


def _hand_case():
    """Three clients of ranks 1, 1, 2, alpha = 2 (s = 2, 2, 1), weights 0.5, 0.3, 0.2; every term lies on
    a coordinate pair, so ΔW = sum p_k s_k B_k A_k is diagonal and its SVD is read off:
      client 0: B = e1, A = [1 0 0]                  -> 0.5 * 2 * 1 = 1.0 at (1, 1)
      client 1: B = e2, A = [0 2 0]                  -> 0.3 * 2 * 2 = 1.2 at (2, 2)
      client 2: B = [e3 e1], A = [[0 0 10], [2 0 0]] -> 0.2 * 1 * 10 = 2.0 at (3, 3), 0.2 * 1 * 2 = 0.4 at (1, 1)
    ΔW = diag(1.4, 1.2, 2.0) (4 x 3, last row 0): singular values 2.0 (e3 f3), 1.4 (e1 f1), 1.2 (e2 f2)."""
    ps = [0.5, 0.3, 0.2]
    Bs = [_e(4, 0), _e(4, 1), torch.cat([_e(4, 2), _e(4, 0)], dim=1)]
    As = [torch.tensor([[1.0, 0, 0]], dtype=F64), torch.tensor([[0, 2.0, 0]], dtype=F64),
          torch.tensor([[0, 0, 10.0], [2.0, 0, 0]], dtype=F64)]
    ss = [2.0, 2.0, 1.0]
    return ps, As, Bs, ss


def test_ilora_split_is_the_best_rank_r_approximation_derived_by_hand():
    ps, As, Bs, ss = _hand_case()
    assert len(set(ps)) == len(ps)  # unequal weights
    q, ra = stacked_svd(ps, As, Bs, ss)
    # rank 1 (s = 2): the largest singular pair, 2.0 e3 f3^T: B = e3, A = 2.0 / 2 f3
    b, a = split(q, ra, 1, 2.0)
    torch.testing.assert_close(b, _e(4, 2), rtol=0, atol=1e-12)
    torch.testing.assert_close(a, torch.tensor([[0, 0, 1.0]], dtype=F64), rtol=0, atol=1e-12)
    # rank 2 (s = 1): + 1.4 e1 f1^T
    b, a = split(q, ra, 2, 1.0)
    torch.testing.assert_close(b, torch.cat([_e(4, 2), _e(4, 0)], dim=1), rtol=0, atol=1e-12)
    torch.testing.assert_close(a, torch.tensor([[0, 0, 2.0], [1.4, 0, 0]], dtype=F64), rtol=0, atol=1e-12)
    # truncation errors: rank 1 leaves 1.4 and 1.2, rank 2 leaves 1.2
    assert math.isclose(float(ra[1:].norm()), math.sqrt(1.4 ** 2 + 1.2 ** 2), rel_tol=1e-12)
    assert math.isclose(float(ra[2:].norm()), 1.2, rel_tol=1e-12)


def test_ilora_split_does_not_depend_on_the_order_of_the_uploads():
    ps, As, Bs, ss = _hand_case()
    base = stacked_svd(ps, As, Bs, ss)
    for perm in itertools.permutations(range(3)):
        q, ra = stacked_svd(*([x[i] for i in perm] for x in (ps, As, Bs, ss)))
        torch.testing.assert_close(q, base[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(ra, base[1], rtol=0, atol=1e-12)
    # random factors, mixed ranks, unequal weights: every order gives the same factors, and each rank's
    # product is the truncation of a full SVD of the exact aggregate
    ranks = [2, 4, 8, 3]
    ps, As, Bs = rand_factors(4, 0, 24, 20, seed=5, ranks=ranks)
    assert len({round(p, 12) for p in ps}) == 4
    ss = [16 / r for r in ranks]
    ideal = sum(p * s * b @ a for p, s, a, b in zip(ps, ss, As, Bs, strict=True))
    u, sv, vh = torch.linalg.svd(ideal, full_matrices=False)
    base = stacked_svd(ps, As, Bs, ss, r_min_cols=8)
    for perm in ([3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]):
        q, ra = stacked_svd(*([x[i] for i in perm] for x in (ps, As, Bs, ss)), r_min_cols=8)
        torch.testing.assert_close(q[:, :8], base[0][:, :8], rtol=0, atol=1e-10)
        torch.testing.assert_close(ra[:8], base[1][:8], rtol=0, atol=1e-10)
    q, ra = base
    torch.testing.assert_close(q.T @ q, torch.eye(q.shape[1], dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(q @ ra, ideal, rtol=0, atol=1e-12)  # exact before truncation
    for r in (2, 4, 8):
        b, a = split(q, ra, r, 16 / r)
        best = (u[:, :r] * sv[:r]) @ vh[:r]
        torch.testing.assert_close((16 / r) * b @ a, best, rtol=0, atol=1e-10)
        assert math.isclose(algebra.frob2(ideal - best), float(ra[r:].square().sum()), rel_tol=1e-9)
