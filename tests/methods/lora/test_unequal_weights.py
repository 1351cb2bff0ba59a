"""The aggregation identities under unequal client weights (the synthetic split gives every client the
same size, under which a rule that weights one factor and averages the other uniformly goes unseen)."""

from __future__ import annotations

import math

import pytest
import torch
from lora_helpers import const, factor_upload, lora_sim, server_factors

pytestmark = pytest.mark.xdist_group("lora-family")


def test_fedit_weights_both_factors_by_the_data_weights():
    """Weights 0.25 / 0.75, A = 1 / 3, B = 2 / 4: A = 2.5 and B = 0.25 * 2 + 0.75 * 4 = 3.5 (uniform B
    would be 3.0, uniform A 2.0)."""
    sim = lora_sim("fedit", rounds=1)
    sim.method.aggregate(sim.server, [factor_upload(sim, 0, 0.25, 1, 2), factor_upload(sim, 1, 0.75, 3, 4)])
    A, B = server_factors(sim)
    for k in A:
        torch.testing.assert_close(A[k], const(A[k].shape, 2.5), rtol=1e-6, atol=0)
        torch.testing.assert_close(B[k], const(B[k].shape, 3.5), rtol=1e-6, atol=0)


@pytest.mark.parametrize("method,exact", [("fedit", False), ("ffa-lora", True), ("flora", True)])
def test_identities_hold_with_unequal_weights(method, exact):
    """A Dirichlet split (unequal client sizes, so unequal p_i): D_t is 0 for the exact rules and FedIT's
    factor error for FedIT, with p_i from the data sizes; the weights are checked to differ."""
    sim = lora_sim(method, rounds=1, partition="dirichlet", alpha=0.5, fraction=1.0)
    weights = []
    orig = sim.method.aggregate
    sim.method.aggregate = lambda server, ups: (weights.append([u.weight for u in ups]), orig(server, ups))
    res = sim.run_round(1)
    ws = weights[-1]
    assert math.isclose(sum(ws), 1.0) and max(ws) - min(ws) > 0.05, ws  # unequal, not a uniform mean
    if exact:
        assert res.metrics["agg_deviation"] < 1e-4, res.metrics
    else:
        assert res.metrics["agg_deviation"] > 1e-3
        assert math.isclose(res.metrics["agg_deviation_abs"], res.metrics["fedit_factor_error"], rel_tol=1e-3)
