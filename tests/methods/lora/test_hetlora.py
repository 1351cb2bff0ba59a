"""HetLoRA (zero-padding): mixed-rank padding with data weights, the `norm` weights with each client's
scaling, and the download scaling rule (a client starts at the global model's truncation). Every expected
value is worked out by hand from constant factors (float64)."""

from __future__ import annotations

import pytest
import torch
from lora_helpers import const, factor_upload, lora_sim, server_factors

pytestmark = pytest.mark.xdist_group("lora-family")

ALPHA = 16.0


def _het(**kw):
    return lora_sim("hetlora", ranks="cycle:2,4", lora_alpha=ALPHA, rounds=1, **kw)  # ranks 2, 4, 2, 4, 2


def _rows_cols(A, B, key):
    """(rows 0-1 of A, rows 2-3 of A, columns 0-1 of B, columns 2-3 of B) of one target, each one value."""
    a, b = A[key], B[key]
    parts = (a[:2], a[2:], b[:, :2], b[:, 2:])
    for p in parts:
        assert torch.allclose(p, p.flatten()[0].expand_as(p))  # constant blocks, as built
    return tuple(float(p.flatten()[0]) for p in parts)


def test_mixed_rank_padding_weights_each_rank_block_by_data_weights():
    """Client 0 (rank 2, p = 0.25, A = 1, B = 2), client 1 (rank 4, p = 0.75, A = 3, B = 4). Padded to
    r_max = 4: rows 0-1 of A = 0.25 * 1 + 0.75 * 3 = 2.5; rows 2-3 only client 1: 0.75 * 3 = 2.25;
    B columns 0-1 = 0.25 * 2 + 0.75 * 4 = 3.5, columns 2-3 = 0.75 * 4 = 3.0."""
    sim = _het()
    sim.method.aggregate(sim.server, [factor_upload(sim, 0, 0.25, 1, 2), factor_upload(sim, 1, 0.75, 3, 4)])
    A, B = server_factors(sim)
    for key in A:
        assert _rows_cols(A, B, key) == pytest.approx((2.5, 2.25, 3.5, 3.0), rel=1e-6)


@pytest.mark.parametrize("rule,w0", [("constant", 1 / 13), ("per-rank", 1 / 7)])
def test_norm_weights_are_the_norms_of_each_clients_scaled_update(rule, w0):
    """``norm``: w_k proportional to ||s_k B_k A_k||_F. With constant A = a (r x d_in), B = b (d_out x r),
    B A is the constant r a b, so ||s_k B_k A_k|| = s_k r_k a_k b_k sqrt(d_out d_in).
    constant (s_k = alpha / 4 for both): client 0: 2 * 1 * 2 = 4, client 1: 4 * 3 * 4 = 48 -> w0 = 4 / 52 = 1/13.
    per-rank (s_k = alpha / r_k, so s_k r_k = alpha): client 0: 1 * 2 = 2, client 1: 3 * 4 = 12 -> w0 = 2/14 = 1/7.
    The data weights (0.5, 0.5) are not used. Rows 0-1 of A = w0 * 1 + (1 - w0) * 3, rows 2-3 = (1 - w0) * 3;
    B likewise with 2 and 4."""
    sim = _het(hetlora_weight="norm", rank_scaling=rule)
    sim.method.aggregate(sim.server, [factor_upload(sim, 0, 0.5, 1, 2), factor_upload(sim, 1, 0.5, 3, 4)])
    A, B = server_factors(sim)
    w1 = 1 - w0
    want = (w0 * 1 + w1 * 3, w1 * 3, w0 * 2 + w1 * 4, w1 * 4)
    for key in A:
        assert _rows_cols(A, B, key) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("rule,factor", [("constant", 1.0), ("per-rank", 2.0), ("sqrt", 2 ** 0.5)])
def test_client_starts_at_the_global_models_truncation_times_the_rule(rule, factor):
    """Global LoRA of rank 4 at s_g = alpha / 4 = 4: row i of A is the constant i + 1, B all ones. The
    rank-2 truncation's effective weight is s_g (1 + 2) = 12 everywhere. A rank-2 client applies s_k:
    constant s_k = s_g -> 12 (exactly the truncation); per-rank s_k = alpha / 2 -> 2 x 12; sqrt
    s_k = s_g sqrt(4 / 2) -> sqrt(2) x 12."""
    sim = _het(rank_scaling=rule)
    m = sim.method
    A = {t.key: torch.arange(1, 5, dtype=torch.float64)[:, None].expand(4, t.d_in).float() for t in m.targets}
    B = {t.key: const((t.d_out, 4), 1).float() for t in m.targets}
    m.set_global(sim.server, A, B)
    assert sim.server.module("lora").scaling == ALPHA / 4
    client = sim.clients[0]
    assert m.ranks[0] == 2
    m.install(client, m.download(sim.server, client, sim.broadcast))
    ad = client.module("lora")
    for t in m.targets:
        eff = ad.scaling * (ad.lora_B[t.key].weight.double() @ ad.lora_A[t.key].weight.double())
        torch.testing.assert_close(eff, const(eff.shape, 12.0 * factor), rtol=1e-6, atol=0)


def test_rank_scaling_is_in_the_label_under_mixed_ranks_only():
    from fedbench.methods.lora.hetlora import HetLoRA
    p = HetLoRA.Params(ranks="cycle:2,4")
    assert "scaling=constant" in HetLoRA.label(p)
    assert "scaling" not in HetLoRA.label(HetLoRA.Params())
