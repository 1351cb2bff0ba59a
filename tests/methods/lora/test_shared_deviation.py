"""D_t (the aggregation deviation: ||aggregate - sum_i p_i end_i|| / ||sum_i p_i (end_i - start_i)||) where a method has no
single global model: on the shared part of FedSA-LoRA (A) and CE-LoRA (the FedAvg of C), and per cluster
for FL-TAC (the cluster's s B̄ Ā against its submissions' s B_i A_i). Always with unequal client weights
(the synthetic split's equal 600 samples per client once hid a weighting bug)."""

from __future__ import annotations

import math

import torch
from test_lora_family import lora_sim

from fedbench.lora import algebra

F64 = torch.float64
DIRICHLET = dict(partition="dirichlet", alpha=0.5)  # unequal client sizes, hence unequal weights


def test_deviation_parts_by_hand():
    # a cluster of two rank-1 adapters on a 1 x 1 matrix, s = 2, weights 1/4, 3/4 (sample counts 1 and 3):
    #   submission 1: B = 1, A = 2 -> s B A = 4;  submission 2: B = 3, A = 0 -> 0;  both started at B = 0 (0)
    #   A_bar = 1/4 * 2 = 0.5, B_bar = 1/4 + 3/4 * 3 = 2.5 -> s B_bar A_bar = 2.5;  FedAvg: 1/4 * 4 = 1.0
    #   numerator |2.5 - 1.0| = 1.5, denominator |1.0 - 0| = 1.0: D_t = 1.5
    ws = [0.25, 0.75]
    ends = [torch.tensor([[4.0]], dtype=F64), torch.tensor([[0.0]], dtype=F64)]
    starts = [torch.zeros(1, 1, dtype=F64)] * 2
    agg = 2 * torch.tensor([[2.5]], dtype=F64) @ torch.tensor([[0.5]], dtype=F64)
    num, den = algebra.deviation_parts(ws, ends, starts, agg)
    assert (num, den) == (1.5 ** 2, 1.0)
    # a shared factor (FedSA-LoRA's A), weights 0.2, 0.8, start 0: the p-weighted mean gives 0; the
    # unweighted mean [0.5 0.5] misses [0.3 -0.3] of the FedAvg [0.2 0.8]: D_t = sqrt(0.18 / 0.68)
    ps = [0.2, 0.8]
    ends = [torch.tensor([[1.0, 0.0]], dtype=F64), torch.tensor([[0.0, 1.0]], dtype=F64)]
    starts = [torch.zeros(1, 2, dtype=F64)] * 2
    num, den = algebra.deviation_parts(ps, ends, starts, torch.tensor([[0.2, 0.8]], dtype=F64))
    assert num == 0.0 and math.isclose(den, 0.68, rel_tol=1e-12)
    num, den = algebra.deviation_parts(ps, ends, starts, torch.tensor([[0.5, 0.5]], dtype=F64))
    assert math.isclose(num, 0.18, rel_tol=1e-12) and math.isclose(den, 0.68, rel_tol=1e-12)


def _spy(sim):
    """Capture every participant's download and upload of each round."""
    m, seen = sim.method, []
    orig = m.client_update

    def client_update(client, payload):
        up = orig(client, payload)
        seen.append((client.round, client.id, payload, up))
        return up

    m.client_update = client_update
    return seen


def _weights(sim, t, seen):
    n = {cid: float(sim.agg_n[cid]) for r, cid, _, _ in seen if r == t}  # n_k of --agg-weight (all splits)
    return {cid: v / sum(n.values()) for cid, v in n.items()}


def _shared_d_t(sim, t, seen, part, kept):
    """D_t of the shared ``part`` by its definition: sum over matrices, p_i = n_i / sum n (float64)."""
    p = _weights(sim, t, seen)
    assert len({round(v, 9) for v in p.values()}) > 1, p  # the weights differ
    num = den = 0.0
    for k, agg in kept.items():
        ideal = sum(p[cid] * up[part][k].double() for r, cid, _, up in seen if r == t)
        start = sum(p[cid] * down[part][k].double() for r, cid, down, _ in seen if r == t)
        num += float((agg.double() - ideal).square().sum())
        den += float((ideal - start).square().sum())
    return math.sqrt(num / den), den


def test_fedsa_shared_part_is_the_weighted_mean_of_a():
    sim = lora_sim("fedsa-lora", rounds=2, fraction=0.6, **DIRICHLET)
    seen = _spy(sim)
    for t in (1, 2):
        res = sim.run_round(t)
        kept = sim.method.factors_of(sim.server, ("A",))["A"]
        want, den = _shared_d_t(sim, t, seen, "A", kept)
        # the server keeps the p-weighted mean of A: D_t = 0 up to float32 rounding (measured 4e-6; a
        # uniform mean of these unequal clients gives about 0.3)
        assert den > 0 and want < 1e-4
        assert math.isclose(res.metrics["agg_deviation_shared"], want, abs_tol=1e-5)


def test_celora_shared_part_is_the_weighted_mean_of_c():
    sim = lora_sim("ce-lora", rounds=2, fraction=0.6, **DIRICHLET)  # similarity rule: personal C's, mean C shared
    seen = _spy(sim)
    for t in (1, 2):
        res = sim.run_round(t)
        kept = sim.method.cores_of(sim.server)
        want, den = _shared_d_t(sim, t, seen, "C", kept)
        assert den > 0 and want < 1e-3  # measured 3e-5 (float32 rounding over a small movement of C)
        assert math.isclose(res.metrics["agg_deviation_shared"], want, abs_tol=1e-5)


def test_fltac_deviation_per_cluster():
    """Recompute each cluster's D_t from the submissions (sample-count weights, unequal) and the adapter
    each downloaded; the pooled numerator is FedIT's factor error inside the clusters."""
    sim = lora_sim("fl-tac", rounds=2, fraction=1.0, fltac_min_samples=150, **DIRICHLET)
    m = sim.method
    seen = _spy(sim)
    sim.run_round(1)
    res = sim.run_round(2)
    s = sim.server.module("lora").scaling

    def eff(adapter, k):
        return s * (adapter["B"][k].double() @ adapter["A"][k].double())

    clusters: dict[int, list] = {}
    for r, cid, down, up in seen:
        if r != 2:
            continue
        for slot, part in up.items():
            c = next(i for i, agg in enumerate(m.clusters) if agg is m.assigned[(cid, int(slot))])
            clusters.setdefault(c, []).append((float(part["n"]), part, down[slot]))
    assert len(clusters) == 2
    unequal = False
    num_all = den_all = 0.0
    for c, subs in clusters.items():
        total = sum(n for n, _, _ in subs)
        w = [n / total for n, _, _ in subs]
        unequal |= len({round(x, 9) for x in w}) > 1
        num = den = 0.0
        for k in m.layers:
            a_bar = sum(wi * part["A"][k].double() for wi, (_, part, _) in zip(w, subs, strict=True))
            b_bar = sum(wi * part["B"][k].double() for wi, (_, part, _) in zip(w, subs, strict=True))
            ideal = sum(wi * eff(part, k) for wi, (_, part, _) in zip(w, subs, strict=True))
            start = sum(wi * eff(down, k) for wi, (_, _, down) in zip(w, subs, strict=True))
            num += float((s * b_bar @ a_bar - ideal).square().sum())
            den += float((ideal - start).square().sum())
        assert den > 0 and num > 0
        assert math.isclose(res.metrics[f"agg_deviation_c{c}"], math.sqrt(num / den), rel_tol=1e-5)
        num_all, den_all = num_all + num, den_all + den
    assert unequal  # some cluster averages submissions of different sizes
    assert math.isclose(res.metrics["agg_deviation"], math.sqrt(num_all / den_all), rel_tol=1e-5)
    assert math.isclose(res.metrics["agg_deviation_abs"], res.metrics["fltac_factor_error"], rel_tol=1e-5)
