"""The federated-LoRA family: exact aggregation identities (float64, spec §5.5), payload bytes against
the formula under mixed ranks, strict downloads, the FLOP meter against torch's FlopCounterMode, and a
5-round smoke run of every method on synthetic data with a seeded random backbone."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import small_config

from fedbench.engine.simulation import Simulation
from fedbench.errors import ConfigError
from fedbench.lora import algebra
from fedbench.lora.layers import AdapterSet, Target, find_targets
from fedbench.runner import prepare

pytestmark = pytest.mark.xdist_group("lora-family")  # one worker: the fabricated ViT cache is pretrained once

LORA_METHODS = ["fedit", "ffa-lora", "fedsa-lora", "hetlora", "flora", "flexlora", "lora-local", "full-ft"]
HET = {"hetlora", "flora", "flexlora", "lora-local"}


def lora_config(method="fedit", **kw):
    base = dict(method=method, backbone_init="random", local_steps=2, batch_size=16, optimizer="adamw",
                lr=1e-3, eval_every=100)
    base.update(kw)
    return small_config(**base)


def lora_sim(method="fedit", **kw) -> Simulation:
    cfg = lora_config(method, **kw)
    p = prepare(cfg, None, "cpu")
    return Simulation(cfg, p.data, p.device, prefetch=False, backbone=p.backbone)


def rand_factors(n, r, d_in, d_out, seed=0, ranks=None):
    g = torch.Generator().manual_seed(seed)
    ranks = ranks or [r] * n
    As = [torch.randn(rk, d_in, generator=g, dtype=torch.float64) for rk in ranks]
    Bs = [torch.randn(d_out, rk, generator=g, dtype=torch.float64) for rk in ranks]
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    return (w / w.sum()).tolist(), As, Bs


# --- §5 identities in float64 ------------------------------------------------------------------------

def test_fedit_error_equals_covariance_identity():
    ps, As, Bs = rand_factors(5, 4, 48, 64)
    err = algebra.fedit_error(ps, As, Bs, s=2.0)
    a_bar, b_bar = algebra.weighted_sum(ps, As), algebra.weighted_sum(ps, Bs)
    cov = 2.0 * sum(p * (b - b_bar) @ (a - a_bar) for p, a, b in zip(ps, As, Bs, strict=True))
    torch.testing.assert_close(err, cov, rtol=0, atol=1e-12)
    assert err.norm() > 0.1 * algebra.ideal_update(ps, As, Bs, [2.0] * 5).norm()  # not trivially zero
    assert torch.linalg.matrix_rank(err) <= 4 * 4  # rank <= (N - 1) r


def test_stacking_and_freeze_a_have_zero_error():
    ps, As, Bs = rand_factors(5, 3, 48, 64, ranks=[8, 8, 4, 2, 2])
    ss = [16 / r for r in (8, 8, 4, 2, 2)]
    a, b = algebra.stack(ps, As, Bs, ss, s_out=2.0)
    assert a.shape == (24, 48) and b.shape == (64, 24)  # rank sum r_i
    torch.testing.assert_close(2.0 * b @ a, algebra.ideal_update(ps, As, Bs, ss), rtol=0, atol=1e-12)
    # freeze-A: one A for all clients
    ps, _, Bs = rand_factors(5, 4, 48, 64, seed=1)
    a0 = torch.randn(4, 48, dtype=torch.float64)
    err = algebra.fedit_error(ps, [a0] * 5, Bs, s=2.0)
    assert err.abs().max() < 1e-12


def test_svd_truncation_loses_exactly_the_tail_energy():
    ps, As, Bs = rand_factors(5, 4, 48, 64, seed=2)
    delta = algebra.ideal_update(ps, As, Bs, [1.0] * 5)
    u, sv, vh = algebra.svd(delta)
    for r in (2, 4, 8):
        b, a = algebra.truncate(u, sv, vh, r, s=0.5)
        lost = (delta - 0.5 * b @ a).square().sum().item()
        assert math.isclose(lost, algebra.tail_energy(sv, r), rel_tol=1e-10, abs_tol=1e-12)
    assert algebra.tail_energy(sv, 20) < 1e-20  # the update has rank <= 5 x 4


def test_client_rotation_leaves_stacking_and_svd_unchanged_but_not_fedit():
    ps, As, Bs = rand_factors(4, 4, 32, 40, seed=3)
    rots = [torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))[0] for _ in range(4)]
    As2 = [r @ a for r, a in zip(rots, As, strict=True)]
    Bs2 = [b @ r.T for r, b in zip(rots, Bs, strict=True)]
    a, b = algebra.stack(ps, As, Bs, [1.0] * 4)
    a2, b2 = algebra.stack(ps, As2, Bs2, [1.0] * 4)
    torch.testing.assert_close(b @ a, b2 @ a2, rtol=0, atol=1e-12)  # FLoRA
    d, d2 = algebra.ideal_update(ps, As, Bs, [1.0] * 4), algebra.ideal_update(ps, As2, Bs2, [1.0] * 4)
    torch.testing.assert_close(torch.linalg.svdvals(d), torch.linalg.svdvals(d2), rtol=0, atol=1e-10)  # FlexLoRA
    e, e2 = algebra.fedit_error(ps, As, Bs, 1.0), algebra.fedit_error(ps, As2, Bs2, 1.0)
    assert (e - e2).norm() > 1e-3  # FedIT is rotation-sensitive: the test could tell


# --- the methods on the engine -------------------------------------------------------------------------

def _targets(sim):
    return sim.method.targets


def _head_bytes(sim):
    return 4 * (sim.method.feature_dim + 1) * sim.num_classes


@pytest.mark.parametrize("method", ["fedit", "ffa-lora", "fedsa-lora", "hetlora", "flexlora"])
def test_payload_bytes_per_client_equal_formula_under_mixed_ranks(method):
    ranks = "cycle:2,4,8" if method in HET else ""
    sim = lora_sim(method, ranks=ranks, rounds=2, fraction=0.6)
    sends = sim.method.sends
    for t in (1, 2):
        res = sim.run_round(t)
        for row in res.rows:
            r = sim.method.ranks[row.client]
            per = sum((r * tg.d_in if "A" in sends else 0) + (r * tg.d_out if "B" in sends else 0)
                      for tg in _targets(sim))
            head = _head_bytes(sim) if sim.method.hp.head == "shared" else 0  # FedSA-LoRA's stays local
            want = 4 * per + head if row.selected else 0
            assert row.bytes_up == want and row.bytes_down == want, (method, t, row.client, r)


def test_flora_download_is_every_stack_the_client_missed():
    sim = lora_sim("flora", ranks="cycle:2,4,8", rounds=3, fraction=0.6)
    targets = _targets(sim)
    stacked_rank = {}
    for t in (1, 2, 3):
        res = sim.run_round(t)
        stacked_rank[t] = sum(sim.method.ranks[row.client] for row in res.rows if row.selected)
    # round 3: each participant gets the stacks of rounds since it last synced
    last_seen = {}
    for t in (1, 2, 3):
        for k in sim.sample(t):
            last_seen.setdefault(k, []).append(t)
    for row in res.rows:
        if not row.selected:
            continue
        prev = [t for t in last_seen[row.client] if t < 3]
        since = prev[-1] if prev else 0
        rank_sum = sum(stacked_rank[t] for t in (1, 2) if t >= since)
        want = 4 * sum(rank_sum * (tg.d_in + tg.d_out) for tg in targets) + _head_bytes(sim)
        assert row.bytes_down == want, (row.client, since)


def test_hetlora_with_equal_ranks_equals_fedit():
    a, b = lora_sim("fedit", rounds=2), lora_sim("hetlora", rounds=2)
    for t in (1, 2):
        a.run_round(t)
        b.run_round(t)
    for (ka, ta), (kb, tb) in zip(a.server.module("lora").state_dict().items(),
                                  b.server.module("lora").state_dict().items(), strict=True):
        assert ka == kb and torch.equal(ta, tb)


@pytest.mark.parametrize("method", ["flora", "flexlora"])
def test_client_side_rotation_leaves_the_server_result_unchanged(method):
    """Rotate every client's uploaded factors (A -> R A, B -> B R^T): the same aggregate."""
    results = []
    for rotate in (False, True):
        sim = lora_sim(method, ranks="cycle:2,4,8", rounds=1, fraction=1.0)
        orig = sim.method.upload

        def upload(client, orig=orig, rotate=rotate):
            p = orig(client)
            if rotate:
                g = torch.Generator().manual_seed(client.id)
                for k in p["A"]:
                    r = p["A"][k].shape[0]
                    q = torch.linalg.qr(torch.randn(r, r, generator=g))[0]
                    p["A"][k], p["B"][k] = q @ p["A"][k], p["B"][k] @ q.T
            return p

        sim.method.upload = upload
        sim.run_round(1)
        if method == "flora":
            results.append({k: v.clone() for k, v in sim.method._merged.items()})
        else:
            results.append({k: sim.method.global_deltas(sim.server)[k] for k in sim.method.layers})
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["fedit", "ffa-lora", "fedsa-lora", "hetlora", "flora", "flexlora", "full-ft"])
def test_every_downloaded_tensor_is_loaded_by_the_client(method):
    """Spy on each client's state right after it installs its download: every tensor sent equals the
    client's parameter (a download dropped, e.g. by a lenient load under mixed ranks, fails here)."""
    sim = lora_sim(method, ranks="cycle:2,4,8" if method in HET else "", rounds=2, fraction=0.6)
    m = sim.method
    orig_train, seen = m.train, []

    def train(client):
        seen.append((client.id, m.download(sim.server, client, sim.broadcast), _state(m, client)))
        return orig_train(client)

    m.train = train
    sim.run_round(1)
    sim.run_round(2)
    assert len(seen) == 6
    checked = 0
    for cid, payload, state in seen:
        if method == "flora":  # stacks are merged into the shared backbone; the fresh LoRA is local
            continue
        for part, tensors in payload.items():
            for key, t in tensors.items():
                assert torch.equal(state[part][key], t), (method, cid, part, key)
                checked += 1
    assert checked > 0 or method == "flora"
    with pytest.raises((KeyError, ValueError)):
        bad = dict(seen[0][1])
        bad["A" if method != "full-ft" else "model"] = {"no_such_layer": torch.zeros(1)}
        m.install(sim.clients[seen[0][0]], bad)


def _state(m, client):
    if m.name == "full-ft":
        return {"model": {k: v.clone() for k, v in client.module("model").state_dict().items()}}
    ad = client.module("lora")
    out = {"A": {k: v.weight.detach().clone() for k, v in ad.lora_A.items()},
           "B": {k: v.weight.detach().clone() for k, v in ad.lora_B.items()}}
    if m.hp.head != "frozen":
        out["head"] = {k: v.detach().clone() for k, v in client.module("head").named_parameters()}
    return out


def test_deviation_zero_for_exact_rules_and_equal_to_fedit_error_for_fedit():
    for method, exact in (("ffa-lora", True), ("flora", True), ("fedit", False)):
        sim = lora_sim(method, rounds=2)
        sim.run_round(1)
        res = sim.run_round(2)
        if exact:
            assert res.metrics["agg_deviation"] < 1e-4, (method, res.metrics)
        else:
            assert res.metrics["agg_deviation"] > 1e-3
            assert math.isclose(res.metrics["agg_deviation_abs"], res.metrics["fedit_factor_error"], rel_tol=1e-3)


def test_flexlora_truncation_metrics_and_deviation():
    sim = lora_sim("flexlora", ranks="cycle:2,4,8", rounds=2, fraction=1.0)
    sim.run_round(1)
    res = sim.run_round(2)
    m = res.metrics
    assert m["trunc_err_r2"] >= m["trunc_err_r4"] >= m["trunc_err_r8"] >= 0
    assert 0 < m["energy_ratio_rmin"] <= 1
    # the global model is the rank-r_max truncation: its deviation is the r_max truncation error
    assert math.isclose(m["agg_deviation_abs"], m["trunc_err_r8"], rel_tol=1e-3, abs_tol=1e-7)
    assert res.server_macs > 0  # SVDs and products metered


def test_ffa_lora_never_trains_or_sends_a():
    sim = lora_sim("ffa-lora", rounds=2)
    a0 = {k: v.weight.detach().clone() for k, v in sim.server.module("lora").lora_A.items()}
    sim.run_round(1)
    sim.run_round(2)
    for c in sim.clients:
        for k, v in c.module("lora").lora_A.items():
            assert torch.equal(v.weight, a0[k])


def test_fedsa_keeps_b_local_and_has_no_global_model():
    sim = lora_sim("fedsa-lora", rounds=1, fraction=1.0, eval_every=1)
    res = sim.run_round(1)
    assert "global_correct" not in res.metrics and "agg_deviation" not in res.metrics
    bs = [c.module("lora").lora_B[next(iter(c.module("lora").lora_B))].weight.detach().clone() for c in sim.clients]
    assert not torch.equal(bs[0], bs[1])  # each client's own B


def _meter_and_flop_counter(sim) -> tuple[int, dict]:
    """(fedbench FLOPs, FlopCounterMode's counts) of one training step of client 0."""
    from torch.utils.flop_counter import FlopCounterMode
    c, m = sim.clients[0], sim.method
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with sim.meter.scope("warm", "train"):  # fvcore traces each layer shape once, outside the count
        F.cross_entropy(m.forward(c, x), y).backward()
    sim.meter.take()
    with sim.meter.scope(0, "train"), FlopCounterMode(display=False) as fc:
        F.cross_entropy(m.forward(c, x), y).backward()
    return 2 * sim.meter.take()[(0, "train")], fc


@pytest.mark.parametrize("backbone,targets", [("vit", "attn"), ("vit", "attn-mlp"), ("resnet", "conv")])
def test_meter_equals_flop_counter_on_a_lora_training_step(backbone, targets):
    ours, fc = _meter_and_flop_counter(lora_sim("fedit", backbone=backbone, targets=targets))
    assert ours == fc.get_total_flops()
    if backbone == "vit":  # the attention matmuls were there and counted
        assert fc.get_flop_counts()["Global"].get(torch.ops.aten.bmm, 0) > 0


def test_lora_layer_matches_peft_when_installed():
    peft = pytest.importorskip("peft", reason="Hugging Face peft not installed (optional extra)")
    lin = torch.nn.Linear(12, 10)
    t = Target("x", "linear", 12, 10)
    ad = AdapterSet((t,), 4, alpha=8.0, rslora=False)
    torch.nn.init.normal_(ad.lora_B[t.key].weight)
    model = torch.nn.Sequential()
    model.add_module("x", lin)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["x"], lora_dropout=0.0))
    layer = pm.base_model.model.x
    layer.lora_A["default"].weight.data.copy_(ad.lora_A[t.key].weight)
    layer.lora_B["default"].weight.data.copy_(ad.lora_B[t.key].weight)
    x = torch.randn(3, 12)
    ours = lin(x) + ad.lora_B[t.key](ad.lora_A[t.key](x)) * ad.scaling
    torch.testing.assert_close(pm(x), ours)
    torch.testing.assert_close(layer.get_delta_weight("default"), ad.delta(t.key))


@pytest.mark.parametrize("method", LORA_METHODS)
def test_five_round_smoke_run_learns(method):
    """Dirichlet(0.5) split of the synthetic set: guessing a client's majority class gives about 40%,
    chance on the union 10%; measured after 5 rounds: personalised 0.61-0.71, global 0.67-0.74."""
    sim = lora_sim(method, ranks="cycle:2,4,8" if method in HET else "", rounds=5, eval_every=5, local_steps=4,
                   lr=3e-3 if method != "full-ft" else 1e-3, partition="dirichlet", alpha=0.5)
    before = [sim.evaluate(c) for c in sim.clients]  # the untrained model (random head)
    first = sum(c / n for c, n in before) / len(before)
    rows = sim.run()
    last = rows[-1].accuracy()[0]
    assert last > 0.55 and last > first + 0.2, (method, first, last)
    if sim.method.personalised:
        assert rows[-1].global_accuracy() is None
    else:
        assert rows[-1].global_accuracy() > 0.5, (method, rows[-1].global_accuracy())
    assert all(r.bytes_up == 0 for r in rows[-1].rows) == (method == "lora-local")


@pytest.mark.parametrize("method", ["fedit", "hetlora", "flora", "flexlora", "raflora", "fl-tac"])
def test_convolution_factors_aggregate_and_install(method):
    """A convolution's factors are 4-d (A r x c x k x k, B d_out x r x 1 x 1): the aggregation algebra
    works on their matrix form and a download comes back in the client's layout (round 2 installs what
    round 1 aggregated). Each of these methods failed on ``--targets conv`` before."""
    het = method in {"hetlora", "flora", "flexlora", "raflora"}
    sim = lora_sim(method, backbone="resnet", targets="conv", rounds=2, local_steps=1, batch_size=8,
                   ranks="cycle:2,4" if het else "")
    rows = sim.run()
    assert all(r.bytes_up > 0 and r.bytes_down > 0 for r in rows[-1].rows if r.selected)
    dev = rows[-1].metrics.get("fltac_factor_error" if method == "fl-tac" else "agg_deviation")
    assert dev is not None and math.isfinite(dev), (method, rows[-1].metrics)
    if method == "flora":
        assert dev < 1e-5  # stacking stays exact on convolutions


# --- bad input -----------------------------------------------------------------------------------------

def test_rank_above_layer_bound_unknown_target_and_rank_list_length_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"--rank 1000 exceeds what layer .* allows: min\(d_in, d_out\) = 128"):
        prepare(lora_config(rank=1000), None, "cpu")
    with pytest.raises(ConfigError, match="no linear or convolution layer named 'qq_proj'"):
        prepare(lora_config(targets="qq_proj"), None, "cpu")
    with pytest.raises(ConfigError, match="--ranks gives 3 ranks for --clients 5"):
        lora_config("hetlora", ranks="2,4,8")
    with pytest.raises(ConfigError, match="needs one rank for all clients"):
        lora_config("fedit", ranks="cycle:2,4")
    with pytest.raises(ConfigError, match="backbone"):
        lora_config(backbone="vgg")


def test_find_targets_sizes():
    from fedbench.models.backbones import build_backbone
    ts = find_targets(build_backbone("vit", 10), "attn")
    assert [t.name.rsplit(".", 1)[-1] for t in ts[:2]] == ["q_proj", "v_proj"]
    assert all(t.d_in == t.d_out == 128 for t in ts)
    cs = find_targets(build_backbone("resnet", 10), "conv")
    assert all(t.kind == "conv" and t.d_in == t.conv[0] * 9 for t in cs)


@pytest.fixture(scope="module")
def fabricated_cache(tmp_path_factory):
    """A data dir with small fabricated cifar100/cifar10 archives and the ViT pretrained on them with the
    default recipe (seconds at this size): what `fedbench run` finds as its cache."""
    import numpy as np

    from fedbench.pretrain import pretrain
    d = tmp_path_factory.mktemp("lora-data")
    rng = np.random.default_rng(3)
    for name, k, n in (("cifar100", 100, 300), ("cifar10", 10, 400)):
        templates = rng.integers(30, 225, size=(k, 4, 4, 3)).repeat(8, axis=1).repeat(8, axis=2)
        y = np.arange(n) % k
        x = np.clip(templates[y] + rng.normal(0, 30, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
        np.savez(d / f"{name}.npz", x_train=x, y_train=y, x_test=x[::4], y_test=y[::4])
    info = pretrain("vit", d, device="cpu")
    return d, info


def _cli_one_line_exit2(capsys, args):
    from fedbench.cli import main
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("fedbench: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_cli_runs_on_the_cache_and_refuses_a_corrupt_or_foreign_one(fabricated_cache, tmp_path, capsys):
    import hashlib
    import shutil

    from fedbench.cli import main
    from fedbench.pretrain import cache_paths, seeded_backbone
    src, info = fabricated_cache
    d = tmp_path / "data"
    shutil.copytree(src, d)
    store = tmp_path / "r.sqlite"
    run = ["run", "--method", "fedit", "--dataset", "cifar10", "--partition", "iid", "--clients", "4", "--rounds", "1",
           "--local-steps", "1", "--batch-size", "16", "--data-dir", str(d), "--results", str(store), "--quiet"]
    with pytest.raises(SystemExit) as e:
        main(run)
    assert e.value.code == 0
    capsys.readouterr()
    digest = hashlib.sha256(store.read_bytes()).hexdigest()
    weights, _ = cache_paths("vit", d, info.key)
    raw = bytearray(weights.read_bytes())
    raw[-5] ^= 0xFF
    weights.write_bytes(bytes(raw))
    assert "corrupt" in _cli_one_line_exit2(capsys, run + ["--force"])
    other = tmp_path / "resnet.pt"
    torch.save(seeded_backbone("resnet", 100, 0).state_dict(), other)
    assert str(other) in _cli_one_line_exit2(capsys, run + ["--model-path", str(other)])
    assert hashlib.sha256(store.read_bytes()).hexdigest() == digest  # nothing stored changed
