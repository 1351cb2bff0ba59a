"""Federated LoRA, part 2b: the server optimiser, FLASC, FSLoRA, ILoRA and raFLoRA. Each method's defining
math in float64 (or on the engine where the rule lives there), payload bytes against the formula, and a
5-round smoke run on synthetic data with a seeded random backbone."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from test_lora_family import _head_bytes, lora_config, lora_sim, rand_factors

from fedbench.errors import ConfigError
from fedbench.lora import algebra
from fedbench.lora.server_opt import ServerOptimizer
from fedbench.methods.lora.flasc import densify, index_dtype, kept, top_k
from fedbench.methods.lora.fslora import sketch_indices
from fedbench.methods.lora.ilora import split, stacked_svd
from fedbench.methods.lora.raflora import partitioned_update, partitions


def _lora_state(party):
    return {k: v.detach().clone() for k, v in party.module("lora").state_dict().items()}


def _assert_states_close(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol)


# --- server optimiser --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,cls,wd", [("adam", torch.optim.Adam, 0.0), ("adam", torch.optim.Adam, 0.05),
                                         ("adamw", torch.optim.AdamW, 0.1)])
def test_server_optimizer_equals_torch_on_the_same_pseudo_gradients(kind, cls, wd):
    g = torch.Generator().manual_seed(0)
    ps = {"a": torch.randn(3, 4, generator=g, dtype=torch.float64), "b": torch.randn(7, generator=g, dtype=torch.float64)}
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in ps.items()}
    opt = cls(list(ref.values()), lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd)
    ours = ServerOptimizer(kind, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd)
    for _ in range(6):
        grads = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in ps.items()}
        for k in ref:
            ref[k].grad = grads[k].clone()
        opt.step()
        ours.step(ps, grads)
        for k in ps:
            torch.testing.assert_close(ps[k], ref[k].detach(), rtol=0, atol=1e-14)
    assert (ps["a"] - ref["a"].detach()).abs().max() < 1e-14 and not torch.equal(ps["a"], ps["a"] * 0)


def test_server_sgd_lr_one_on_mean_difference_is_fedavg_and_bad_kind_refused():
    g = torch.Generator().manual_seed(1)
    theta = torch.randn(20, generator=g, dtype=torch.float64)
    clients = [torch.randn(20, generator=g, dtype=torch.float64) for _ in range(4)]
    params = {"theta": theta.clone()}
    ServerOptimizer("sgd", lr=1.0).step(params, {"theta": sum(theta - c for c in clients) / 4})
    torch.testing.assert_close(params["theta"], sum(clients) / 4, rtol=0, atol=1e-14)
    with pytest.raises(ConfigError, match="server optimiser 'lamb'"):
        ServerOptimizer("lamb")


# --- FLASC -------------------------------------------------------------------------------------------

def test_flasc_top_k_selection_index_dtype_and_round_trip():
    g = torch.Generator().manual_seed(2)
    vec = torch.randn(300, generator=g, dtype=torch.float64)
    p = top_k(vec, 0.1)
    k = kept(0.1, 300)
    assert k == 30 and p["values"].numel() == 30 and p["index"].dtype == torch.uint16
    want = set(torch.argsort(vec.abs(), descending=True)[:30].tolist())
    assert set(p["index"].long().tolist()) == want
    assert p["index"].long().tolist() == sorted(want)
    dense = densify(p, 300)
    mask = torch.zeros(300, dtype=torch.bool)
    mask[sorted(want)] = True
    assert torch.equal(dense[mask], vec[mask]) and torch.all(dense[~mask] == 0)
    assert set(top_k(vec, 1.0)) == {"values"} and torch.equal(densify(top_k(vec, 1.0), 300), vec)
    assert [index_dtype(n) for n in (256, 257, 65536, 65537, 2 ** 32 + 1)] == \
           [torch.uint8, torch.uint16, torch.uint16, torch.uint32, torch.int64]
    assert kept(0.1, 40) == 4 and kept(1e-9, 40) == 1 and kept(0.26, 10) == 3


@pytest.mark.parametrize("down,up", [(0.05, 0.3), (0.25, 1.0), (1.0, 0.01)])
def test_flasc_bytes_equal_the_density_formula(down, up):
    sim = lora_sim("flasc", flasc_down=down, flasc_up=up, rounds=1, fraction=0.6)
    n_lora = sum(t.factor_numel(8) for t in sim.method.targets)
    n = n_lora + _head_bytes(sim) // 4  # the shared head is part of theta, inside the density budget
    assert n_lora == 16384 and index_dtype(n) == torch.uint16  # 2-byte indices

    def size(d):
        return 4 * n if d >= 1.0 else (4 + 2) * math.ceil(d * n)

    res = sim.run_round(1)
    for row in res.rows:
        if row.selected:
            assert row.bytes_down == size(down), row
            assert row.bytes_up == size(up), row
        else:
            assert row.bytes_down == row.bytes_up == 0


def test_flasc_client_starts_from_exactly_the_masked_global_lora():
    sim = lora_sim("flasc", flasc_down=0.2, rounds=1)
    sim.run_round(1)  # a trained global LoRA (round 0's B = 0 would make the mask trivial)
    m, c = sim.method, sim.clients[0]
    theta = m.flat(sim.server)
    m.install(c, m.download(sim.server, c, None))
    got = m.flat(c)
    keep = torch.argsort(theta.abs(), descending=True)[:kept(0.2, theta.numel())]
    want = torch.zeros_like(theta)
    want[keep] = theta[keep]
    assert torch.equal(got, want) and int((got != 0).sum()) == keep.numel()


def test_flasc_at_density_one_with_server_sgd_lr_one_is_fedavg_of_the_factors():
    a = lora_sim("fedit", rounds=2, agg_weight="uniform")
    b = lora_sim("flasc", rounds=2, agg_weight="uniform", server_opt="sgd", server_lr=1.0)
    for t in (1, 2):
        a.run_round(t)
        b.run_round(t)
        _assert_states_close(_lora_state(a.server), _lora_state(b.server), atol=1e-6)
    assert _lora_state(a.server)["lora_B.blocks__0__attn__q_proj.weight"].abs().max() > 1e-4  # it moved
    c = lora_sim("flasc", rounds=1, agg_weight="uniform")  # server Adam: a different rule
    c.run_round(1)
    a1 = lora_sim("fedit", rounds=1, agg_weight="uniform")
    a1.run_round(1)
    assert any((x - y).abs().max() > 1e-5 for x, y in zip(_lora_state(a1.server).values(),
                                                           _lora_state(c.server).values(), strict=True))


# --- FSLoRA ------------------------------------------------------------------------------------------

def test_fslora_bytes_are_the_sketched_block_plus_its_indices():
    sim = lora_sim("fslora", rank=8, ranks="cycle:2,4,8", rounds=2, fraction=0.6)
    per = sum(t.d_in + t.d_out for t in sim.method.targets)
    for t in (1, 2):
        for row in sim.run_round(t).rows:
            k = sim.method.ranks[row.client]
            want = 4 * k * per + k * 1 + _head_bytes(sim) if row.selected else 0  # uint8 indices (r = 8)
            assert row.bytes_up == want and row.bytes_down == want, (t, row)


def test_fslora_unselected_rows_and_columns_are_untouched():
    sim = lora_sim("fslora", rank=8, fslora_ratio=0.25, rounds=1, fraction=0.4)
    before = {k: v.weight.detach().clone() for k, v in sim.server.module("lora").lora_A.items()}
    m, picked = sim.method, []
    orig = m.upload

    def upload(client):
        p = orig(client)
        picked.append(p["index"].long())
        assert all(v.shape[0] == 2 for v in p["A"].values()) and all(v.shape[1] == 2 for v in p["B"].values())
        return p

    m.upload = upload
    sim.run_round(1)
    union = sorted(set(torch.cat(picked).tolist()))
    assert len(picked) == 2 and len(union) < 8  # some rank index left out
    rest = [i for i in range(8) if i not in union]
    ad = sim.server.module("lora")
    for k, a in before.items():
        after_a, after_b = ad.lora_A[k].weight.detach(), ad.lora_B[k].weight.detach()
        assert torch.equal(after_a[rest], a[rest]) and torch.all(after_b[:, rest] == 0)
        assert (after_a[union] - a[union]).abs().amax(dim=1).min() > 0  # every selected row moved
        assert after_b[:, union].abs().amax(dim=0).min() > 0


def test_fslora_with_full_sketch_trains_exactly_as_full_rank_lora():
    a = lora_sim("fedit", rounds=1, fraction=1.0)
    b = lora_sim("fslora", fslora_ratio=1.0, rounds=1, fraction=1.0)
    a.run_round(1)
    b.run_round(1)
    for ca, cb in zip(a.clients, b.clients, strict=True):
        assert cb.module("lora").scaling == ca.module("lora").scaling
        _assert_states_close(_lora_state(ca), _lora_state(cb), atol=0)


def test_fslora_reference_quirks_train_and_send_the_full_rank():
    sim = lora_sim("fslora", rank=8, ranks="cycle:2,4", reference_quirks=True, rounds=1, fraction=0.6)
    per = sum(t.d_in + t.d_out for t in sim.method.targets)
    assert sim.method.ranks == [8] * 5
    for row in sim.run_round(1).rows:
        if row.selected:
            assert row.bytes_up == 4 * 8 * per + 8 + _head_bytes(sim)


def test_fslora_sketch_expectation_is_identity():
    r, k = 6, 2  # exact: every k-subset once
    total = torch.zeros(r, dtype=torch.float64)
    subsets = list(itertools.combinations(range(r), k))
    for sub in subsets:
        total[list(sub)] += r / k
    torch.testing.assert_close(total / len(subsets), torch.ones(r, dtype=torch.float64), rtol=0, atol=1e-15)
    # the method's sampler: uniform k-of-r subsets, so E[S] = I (Monte-Carlo over clients x rounds)
    r, k, n = 8, 3, 4000
    freq = torch.zeros(r, dtype=torch.float64)
    for j in range(n):
        idx = sketch_indices(0, j % 7, j // 7, r, k)
        assert idx.tolist() == sorted(set(idx.tolist())) and idx.numel() == k
        freq[idx] += 1
    mean_s = freq * (r / k) / n
    assert (mean_s - 1).abs().max() < 0.08, mean_s  # 4 sigma of (r/k) * sqrt(p (1 - p) / n) = 0.082
    assert not torch.equal(sketch_indices(0, 1, 1, r, k), sketch_indices(0, 1, 2, r, k)) or \
        not torch.equal(sketch_indices(0, 1, 1, r, k), sketch_indices(0, 1, 3, r, k))  # fresh every round


# --- ILoRA -------------------------------------------------------------------------------------------

def test_ilora_initial_factors_are_orthonormal_and_start_at_the_backbone():
    sim = lora_sim("ilora", ranks="cycle:2,4,8", rounds=1)
    m = sim.method
    for c in sim.clients:
        payload = m.download(sim.server, c, None)
        r = m.ranks[c.id]
        for t in m.targets:
            b = payload["B"][t.key].reshape(t.d_out, r).double()
            torch.testing.assert_close(b.T @ b, torch.eye(r, dtype=torch.float64), rtol=0, atol=1e-5)
            assert torch.all(payload["A"][t.key] == 0)
            q = torch.linalg.qr(m.layers[t.key].weight().double())[0][:, :r]
            torch.testing.assert_close(b, q, rtol=0, atol=1e-6)  # the basis of W0's QR, shared by all


def test_ilora_stacked_split_is_the_exact_aggregate_and_its_truncation_error():
    ranks = [2, 4, 8, 8, 3]
    ps, As, Bs = rand_factors(5, 0, 48, 64, seed=4, ranks=ranks)
    ss = [16 / r for r in ranks]
    q, ra = stacked_svd(ps, As, Bs, ss)
    ideal = algebra.ideal_update(ps, As, Bs, ss)
    assert q.shape == (64, 25)
    torch.testing.assert_close(q.T @ q, torch.eye(25, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(q @ ra, ideal, rtol=0, atol=1e-12)
    for r in (2, 4, 8):
        b, a = split(q, ra, r, 16 / r)
        err2 = algebra.frob2(ideal - (16 / r) * b @ a)
        assert math.isclose(err2, float(ra[r:].square().sum()), rel_tol=1e-10)
        assert math.isclose(err2, algebra.tail_energy(torch.linalg.svdvals(ideal), r), rel_tol=1e-9)  # the SVD's
    q2, _ = stacked_svd(ps[:1], As[:1], Bs[:1], ss[:1], r_min_cols=8)  # one rank-2 client, rank-8 global
    torch.testing.assert_close(q2.T @ q2, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-12)


def test_ilora_reported_truncation_error_is_the_global_deviation():
    sim = lora_sim("ilora", ranks="cycle:2,4,8", rounds=2, fraction=1.0)
    sim.run_round(1)
    mt = sim.run_round(2).metrics
    assert mt["trunc_err_r2"] >= mt["trunc_err_r4"] >= mt["trunc_err_r8"] >= 0 and mt["trunc_err_r2"] > 0
    assert math.isclose(mt["agg_deviation_abs"], mt["trunc_err_r8"], rel_tol=1e-3, abs_tol=1e-7)


@pytest.mark.parametrize("cv", ["on", "off"])
def test_ilora_control_variate_bytes_and_scaffold_update(cv):
    sim = lora_sim("ilora", ranks="cycle:2,4,8", ilora_cv=cv, rounds=2, fraction=0.6)
    m = sim.method
    per = sum(t.d_in + t.d_out for t in m.targets)
    seen = {}
    orig = m.upload

    def upload(client):
        x = {p: {k: v.clone() for k, v in d.items()} for p, d in m.local[client.id]["x"].items()} if m.cv else None
        out = orig(client)
        seen[client.id] = (x, out)
        return out

    m.upload = upload
    res = sim.run_round(1)
    for row in res.rows:
        k = m.ranks[row.client]
        want = (2 if cv == "on" else 1) * 4 * k * per + _head_bytes(sim) if row.selected else 0
        assert row.bytes_up == want and row.bytes_down == want, row
    if cv == "off":
        assert not m.ck and not m.c
        return
    steps, lr = 2, 1e-3  # local_steps, lr of lora_config
    for cid, (x, out) in seen.items():  # round 1: c = c_k = 0, so c_k+ = (x - y) / (K eta)
        for part in ("A", "B"):
            for key, y in out[part].items():
                torch.testing.assert_close(m.ck[cid][part][key], (x[part][key] - y) / (steps * lr))
                torch.testing.assert_close(out["cv"][part][key], m.ck[cid][part][key])
    key = next(iter(m.c["A"]))
    want = sum(algebra.zero_pad(m.ck[cid]["A"][key], 8, 0) for cid in seen) / 5
    torch.testing.assert_close(m.c["A"][key], want)
    assert m.c["A"][key].abs().max() > 0


def test_ilora_control_variates_change_local_training_from_round_two():
    ends = {}
    for cv in ("on", "off"):
        sim = lora_sim("ilora", ranks="cycle:2,4,8", ilora_cv=cv, rounds=2, fraction=1.0)
        sim.run_round(1)
        r1 = [_lora_state(c) for c in sim.clients]
        sim.run_round(2)
        ends[cv] = (r1, [_lora_state(c) for c in sim.clients])
    for a, b in zip(ends["on"][0], ends["off"][0], strict=True):
        _assert_states_close(a, b, atol=0)  # round 1: zero control variates, no correction
    assert any((x - y).abs().max() > 1e-6 for a, b in zip(ends["on"][1], ends["off"][1], strict=True)
               for x, y in zip(a.values(), b.values(), strict=True))


# --- raFLoRA -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("ranks", [[2, 4, 8], [8, 2, 2, 4, 8], [3], [5, 5, 1], [1, 16, 4, 16, 2, 7]])
def test_raflora_partitions_cover_each_client_rank_exactly_once(ranks):
    segs = partitions(ranks)
    assert [lo for lo, _, _ in segs][0] == 0 and all(a[1] == b[0] for a, b in zip(segs, segs[1:], strict=False))
    for i, r in enumerate(ranks):
        covered = [j for lo, hi, members in segs if i in members for j in range(lo, hi)]
        assert covered == list(range(r)), (ranks, i, covered)
    for _, hi, members in segs:
        assert members == [i for i, r in enumerate(ranks) if r >= hi] and members


def test_raflora_equals_flexlora_with_homogeneous_ranks():
    ps, As, Bs = rand_factors(5, 4, 48, 64, seed=5)
    ss = [4.0] * 5
    torch.testing.assert_close(partitioned_update(ps, As, Bs, ss), algebra.ideal_update(ps, As, Bs, ss),
                               rtol=0, atol=1e-12)
    a, b = lora_sim("flexlora", rounds=2), lora_sim("raflora", rounds=2)
    for t in (1, 2):
        a.run_round(t)
        b.run_round(t)
        _assert_states_close(_lora_state(a.server), _lora_state(b.server), atol=1e-6)


def test_raflora_high_segments_are_divided_only_by_their_holders_weights():
    """Three 1x1 clients: ranks 1, 2, 2, p = (1/2, 1/4, 1/4), s = (2, 1, 1).
    client 1: B = [2],    A = [3]    -> segment 0: 6
    client 2: B = [1, 2], A = [1, 4] -> segment 0: 1, segment 1: 8
    client 3: B = [3, 1], A = [2, 2] -> segment 0: 6, segment 1: 2
    segment 0 (all, weights sum 1): 1/2*2*6 + 1/4*1 + 1/4*6 = 6 + 0.25 + 1.5 = 7.75
    segment 1 (clients 2, 3, weights sum 1/2 -> 1/2 each): 1/2*8 + 1/2*2 = 5            raFLoRA: 12.75
    FlexLoRA (p on everything): 6 + 1/4*(1 + 8) + 1/4*(6 + 2) = 6 + 2.25 + 2 = 10.25"""
    d = torch.float64
    As = [torch.tensor([[3.]], dtype=d), torch.tensor([[1.], [4.]], dtype=d), torch.tensor([[2.], [2.]], dtype=d)]
    Bs = [torch.tensor([[2.]], dtype=d), torch.tensor([[1., 2.]], dtype=d), torch.tensor([[3., 1.]], dtype=d)]
    ps, ss = [0.5, 0.25, 0.25], [2.0, 1.0, 1.0]
    assert partitioned_update(ps, As, Bs, ss).item() == 12.75
    assert partitioned_update(ps, As, Bs, ss, renorm=False).item() == 10.25
    assert algebra.ideal_update(ps, As, Bs, ss).item() == 10.25


def test_raflora_on_the_engine_differs_from_flexlora_under_mixed_ranks_and_reports_energy():
    a = lora_sim("flexlora", ranks="cycle:2,4,8", rounds=1, fraction=1.0)
    b = lora_sim("raflora", ranks="cycle:2,4,8", rounds=1, fraction=1.0)
    c = lora_sim("raflora", ranks="cycle:2,4,8", rounds=1, fraction=1.0, raflora_weight="data")
    ma, mb, _ = a.run_round(1).metrics, b.run_round(1).metrics, c.run_round(1)
    assert 0 < mb["energy_ratio_rmin"] <= 1 and 0 < ma["energy_ratio_rmin"] <= 1
    sa, sb, sc = _lora_state(a.server), _lora_state(b.server), _lora_state(c.server)
    assert any((sa[k] - sb[k]).abs().max() > 1e-5 for k in sa)
    # --raflora-weight data is FlexLoRA (float32 on two summation orders: 1.1e-6 apart on AMD EPYC, AVX-512)
    _assert_states_close(sa, sc, atol=3e-6)


# --- bad input and the 5-round smoke runs ------------------------------------------------------------

def test_bad_flags_are_one_line_config_errors():
    with pytest.raises(ConfigError, match=r"FSLoRA's sketch sizes must be <= the global rank --rank 4, got 8"):
        lora_config("fslora", rank=4, ranks="cycle:2,8")
    with pytest.raises(ConfigError, match=r"--flasc-down .* must be > 0.0 and <= 1.0, got 0.0"):
        lora_config("flasc", flasc_down=0.0)
    with pytest.raises(ConfigError, match=r"--ilora-cv .* got 'maybe'; choose from: on, off"):
        lora_config("ilora", ilora_cv="maybe")
    with pytest.raises(ConfigError, match=r"--server-opt .* got 'lamb'"):
        lora_config("fslora", server_opt="lamb")
    with pytest.raises(ConfigError, match="needs one rank for all clients"):
        lora_config("flasc", ranks="cycle:2,4")


# FLASC and FSLoRA step the shared head with their server optimiser (as their official code): server SGD at
# lr 1 (FedAvg of the differences) lets the head learn within 5 rounds; server Adam at 1e-3 / 3e-4 reached
# 0.43 / 0.42 mean accuracy here (from 0.06), below the smoke bar made for averaged heads.
SMOKE = {"flasc": dict(flasc_down=0.5, flasc_up=0.25, server_opt="sgd", server_lr=1.0),
         "fslora": dict(rank=8, ranks="cycle:2,4,8", server_opt="sgd", server_lr=1.0),
         "ilora": dict(ranks="cycle:2,4,8"), "raflora": dict(ranks="cycle:2,4,8")}


@pytest.mark.parametrize("method", list(SMOKE))
def test_five_round_smoke_run(method):
    sim = lora_sim(method, rounds=5, eval_every=5, local_steps=4, lr=3e-3, partition="dirichlet", alpha=0.5,
                   **SMOKE[method])
    before = [sim.evaluate(c) for c in sim.clients]
    first = sum(c / n for c, n in before) / len(before)
    rows = sim.run()
    last = rows[-1].accuracy()[0]
    assert last > 0.55 and last > first + 0.2, (method, first, last)
    assert rows[-1].global_accuracy() > 0.5, (method, rows[-1].global_accuracy())  # measured 0.64-0.70
    for r in rows:
        assert all(math.isfinite(v) for v in r.metrics.values()), r.metrics
        for row in r.rows:
            want = _smoke_bytes(sim, method, row.client) if row.selected else (0, 0)
            assert (row.bytes_down, row.bytes_up) == want, (method, row)


def _smoke_bytes(sim, method, cid) -> tuple[int, int]:
    """(down, up) of a participant by the method's formula."""
    m, head = sim.method, _head_bytes(sim)
    per = sum(t.d_in + t.d_out for t in m.targets)
    r = m.ranks[cid]
    if method == "flasc":  # the shared head is part of theta: inside the density budget
        n = 8 * per + head // 4
        item = 4 + index_dtype(n).itemsize
        return item * math.ceil(0.5 * n), item * math.ceil(0.25 * n)
    if method == "fslora":
        return (4 * r * per + r + head,) * 2
    if method == "ilora":
        return (2 * 4 * r * per + head,) * 2
    return (4 * r * per + head,) * 2


@pytest.mark.parametrize("method", ["flasc", "fslora", "ilora"])
def test_convolution_targets_run_with_the_right_bytes(method):
    """ResNet-8 conv1/conv2 (A a conv kernel, B 1x1): the factors keep their 4-d shapes through every
    payload (raFLoRA is left out: FlexLoRA's products on 4-d factors fail, see the report)."""
    sim = lora_sim(method, backbone="resnet", targets="conv", rounds=3, fraction=0.4, **SMOKE[method])
    for t in (1, 2, 3):
        res = sim.run_round(t)
        assert all(math.isfinite(v) for v in res.metrics.values()), res.metrics
        for row in res.rows:
            want = _smoke_bytes(sim, method, row.client) if row.selected else (0, 0)
            assert (row.bytes_down, row.bytes_up) == want, (method, t, row)
