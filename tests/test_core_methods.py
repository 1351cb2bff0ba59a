"""Math of the core methods: payload bytes against the formula, aggregation identities, FedLoRA's
reconstruction properties (spec B.6)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_sim, own_class_guess, small_config

from fedbench.methods.base import snapshot
from fedbench.methods.fedlora import phase1_loss

K = 10


def test_fedlora_bytes_formula():
    for r in (1, 8):
        sim = make_sim(small_config(method="fedlora", rank=r, fraction=0.6))
        res = sim.run_round(1)
        per = r * (500 + K) * 4  # A (r x 500) and B (K x r), fp32
        for row in res.rows:
            assert row.bytes_up == (per if row.selected else 0)
            assert row.bytes_down == (per if row.selected else 0)
        assert sum(row.selected for row in res.rows) == 3


def test_fedlora_small_cnn_adapters_bytes():
    for adapter in ("small-cnn-dimred", "small-cnn-decomp"):
        sim = make_sim(small_config(method="fedlora", adapter=adapter, rank=4, rounds=1))
        n = sum(p.numel() for p in sim.server.module("adapter").parameters())
        res = sim.run_round(1)
        assert all(row.bytes_up == 4 * n and row.bytes_down == 4 * n for row in res.rows)


def test_fedlora_rank_bounded_by_the_adapter_layers():
    from fedbench.errors import ConfigError
    from fedbench.methods.fedlora import max_rank
    assert max_rank("head-lora", 10)[0] == 10 and max_rank("head-lora", 100)[0] == 100
    assert max_rank("head-lora", 1000)[0] == 500
    assert max_rank("small-cnn-dimred", 10)[0] == max_rank("small-cnn-decomp", 10)[0] == 500
    small_config(method="fedlora", rank=K)  # full rank of the 500 -> K map: allowed
    with pytest.raises(ConfigError, match=r"--rank 11 is out of range for --adapter head-lora .* 1 <= r <= 10"):
        small_config(method="fedlora", rank=K + 1)
    small_config(method="fedlora", adapter="small-cnn-decomp", rank=500)
    with pytest.raises(ConfigError, match="1 <= r <= 500"):
        small_config(method="fedlora", adapter="small-cnn-decomp", rank=501)


def test_standalone_exchanges_nothing():
    res = make_sim(small_config(method="standalone")).run_round(1)
    assert all(r.bytes_up == 0 and r.bytes_down == 0 for r in res.rows)
    assert all(r.train_macs > 0 for r in res.rows)


def test_fedavg_bytes_and_weighted_average_identity():
    sim = make_sim(small_config(method="fedavg", models="cnn5", agg_weight="train"))
    n_params = 670_058
    uploads = []
    orig = sim.method.server_update

    def spy(server, ups):
        uploads.extend(ups)
        return orig(server, ups)

    sim.method.server_update = spy
    res = sim.run_round(1)
    assert all(r.bytes_up == 4 * n_params and r.bytes_down == 4 * n_params for r in res.rows)
    n = np.array([c.n_train for c in sim.clients], dtype=float)
    w = n / n.sum()
    got = snapshot(sim.server.module("model"))
    for name, t in got.items():
        expect = sum(wk * u.payload[name] for wk, u in zip(w, uploads, strict=True))
        torch.testing.assert_close(t, expect, rtol=1e-5, atol=1e-6)


def test_fedavg_refuses_heterogeneous_models():
    from fedbench.errors import ConfigError
    with pytest.raises(ConfigError, match="--models cnn1"):
        small_config(method="fedavg", models="hetero")


def test_lora_with_zero_B_gives_local_predictions():
    sim = make_sim(small_config(method="fedlora"))
    c = sim.clients[0]
    model, adapter = c.module("model"), c.module("adapter")
    assert torch.count_nonzero(adapter.lora_B.weight) == 0
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(sim.method.predict(c, x), model(x)[0])


def test_fedlora_mu_zero_phase1_is_standalone():
    """With mu = 0, phase 1 is exactly Standalone training of f_k (same seed, same streams)."""
    a = make_sim(small_config(method="fedlora", mu=0.0, rounds=1))
    b = make_sim(small_config(method="standalone", rounds=1))
    a.run_round(1)
    b.run_round(1)
    for ca, cb in zip(a.clients, b.clients, strict=True):
        for pa, pb in zip(ca.module("model").parameters(), cb.module("model").parameters(), strict=True):
            torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_fedlora_server_is_weighted_factorwise_mean():
    sim = make_sim(small_config(method="fedlora", rank=2))
    from fedbench.methods.base import Upload
    ups = [Upload(0, 0.25, {"lora_A.weight": torch.ones(2, 500), "lora_B.weight": torch.zeros(K, 2)}),
           Upload(1, 0.75, {"lora_A.weight": torch.full((2, 500), 3.0), "lora_B.weight": torch.ones(K, 2)})]
    g = sim.method.server_update(sim.server, ups)
    torch.testing.assert_close(g["lora_A.weight"], torch.full((2, 500), 2.5))
    torch.testing.assert_close(g["lora_B.weight"], torch.full((K, 2), 0.75))
    torch.testing.assert_close(sim.server.module("adapter").lora_A.weight, g["lora_A.weight"])


def test_fedlora_phase1_loss_by_hand():
    """L1 = (1 - mu) CE(local) + mu CE(combined), in float64; mu weights the combined term."""
    local = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]], dtype=torch.float64)
    both = torch.tensor([[0.0, 1.5, 0.5], [1.0, -0.5, 2.0]], dtype=torch.float64)
    y = torch.tensor([0, 2])

    def ce(z, t):
        return -(z[range(len(t)), t] - torch.logsumexp(z, 1)).mean().item()

    mu = 0.3
    got = phase1_loss(both, local, y, mu).item()
    assert got == pytest.approx(0.7 * ce(local, y) + 0.3 * ce(both, y), rel=1e-12)
    assert got != pytest.approx(0.3 * ce(local, y) + 0.7 * ce(both, y), rel=1e-3)  # mu and 1 - mu swapped
    assert got != pytest.approx(0.7 * ce(local, y), rel=1e-3)  # combined term dropped


def _spy_steps(sim):
    """Record (optimised parameter ids, loss, batch) of every optimiser step of the engine, and the
    parameters of the stepping client's model and adapter around it."""
    steps, batches = [], []
    orig_step, orig_batches = sim.optimizer_step, sim.train_batches

    def train_batches(client, *a):
        for b in orig_batches(client, *a):
            batches.append((client.id, tuple(t.clone() for t in b)))  # the source may reuse its buffers
            yield b

    def optimizer_step(opt, loss):
        ids = {id(p) for g in opt.param_groups for p in g["params"]}
        client = sim.clients[batches[-1][0]]
        before = snapshot_all(client)
        orig_step(opt, loss)
        steps.append({"ids": ids, "loss": loss.detach().double().item(), "batch": batches[-1],
                      "before": before, "after": snapshot_all(client)})

    sim.optimizer_step, sim.train_batches = optimizer_step, train_batches
    return steps


def snapshot_all(c):
    return {f"{m}.{k}": v.detach().clone() for m in ("model", "adapter") for k, v in snapshot(c.module(m)).items()}


def test_fedlora_phase1_loss_with_a_nonzero_adapter_and_frozen_parts():
    mu, K_ = 0.3, K
    sim = make_sim(small_config(method="fedlora", rounds=1, fraction=0.2, mu=mu, batch_size=128))
    (k,) = sim.sample(1)
    c = sim.clients[k]
    g = torch.Generator().manual_seed(3)
    g0 = {name: v.clone() for name, v in sim.broadcast.items()}
    g0["lora_B.weight"] = 30 * torch.randn(K_, sim.cfg.method_params["rank"], generator=g)  # B != 0
    sim.broadcast = {name: v.clone() for name, v in g0.items()}  # the global adapter of round 1
    model0 = snapshot(c.module("model"))
    steps = _spy_steps(sim)
    sim.run_round(1)

    model_ids = {id(p) for p in c.module("model").parameters()}
    adapter_ids = {id(p) for p in c.module("adapter").parameters()}
    phase1 = [s for s in steps if s["ids"] == model_ids]
    phase2 = [s for s in steps if s["ids"] == adapter_ids]
    assert phase1 and phase2 and len(phase1) + len(phase2) == len(steps)
    assert steps.index(phase2[0]) == len(phase1)  # all of phase 1, then all of phase 2

    # the first phase-1 loss, recomputed by hand from the initial f_k and the (non-zero) global adapter
    cid, (x, y) = phase1[0]["batch"]
    assert cid == k
    ref = c.model_spec.build().double()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(model0[name].double())
        local, h = ref(x.double())
        A, B = g0["lora_A.weight"].double(), g0["lora_B.weight"].double()
        both = local + sim.cfg.method_params["adapter_scale"] * h @ A.T @ B.T
    ce_local, ce_both = F.cross_entropy(local, y).item(), F.cross_entropy(both, y).item()
    assert abs(ce_local - ce_both) > 0.05  # the adapter changes the logits: the terms are told apart
    assert phase1[0]["loss"] == pytest.approx((1 - mu) * ce_local + mu * ce_both, rel=1e-5)

    # frozen parts do not move: the adapter in phase 1, f_k in phase 2
    for s in phase1:
        before, after = s["before"], s["after"]
        assert all(torch.equal(before[n], after[n]) for n in before if n.startswith("adapter."))
        assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("model."))
    for s in phase2:
        before, after = s["before"], s["after"]
        assert all(torch.equal(before[n], after[n]) for n in before if n.startswith("model."))
        assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("adapter."))
    start = phase1[0]["before"]
    assert all(torch.equal(start["adapter." + n], g0[n]) for n in g0)  # the global adapter was installed


def test_fedlora_default_aggregation_weights_are_all_splits_sample_counts():
    """The default --agg-weight all-splits: n_k = train + val + test, normalised over the participants,
    is what reaches the server, and the server adapter is the sum_k w_k g_k with those weights."""
    sim = make_sim(small_config(method="fedlora", fraction=0.6))
    assert sim.cfg.agg_weight == "all-splits"
    seen = []
    orig = sim.method.server_update
    sim.method.server_update = lambda server, ups: (seen.extend(ups), orig(server, ups))[1]
    res = sim.run_round(1)
    sel = [r.client for r in res.rows if r.selected]
    n = {k: sum(sim.clients[k].sizes.values()) for k in sel}
    want = {k: n[k] / sum(n.values()) for k in sel}
    got = {u.client: u.weight for u in seen}
    assert got.keys() == want.keys()
    assert all(got[k] == pytest.approx(want[k], rel=1e-12) for k in sel)
    train = {k: sim.clients[k].n_train / sum(sim.clients[j].n_train for j in sel) for k in sel}
    assert any(abs(train[k] - want[k]) > 1e-4 for k in sel)  # the test tells the two rules apart
    server = snapshot(sim.server.module("adapter"))
    for name, v in server.items():
        expect = sum(want[u.client] * u.payload[name].double() for u in seen)
        torch.testing.assert_close(v.double(), expect, rtol=1e-6, atol=1e-7)


def test_client_state_is_separate_per_client():
    """Clients 0 and 5 share an architecture (cnn1) and so a workspace module: each keeps its own tensors."""
    sim = make_sim(small_config(method="standalone", rounds=1, clients=10))
    c0, c5 = sim.clients[0], sim.clients[5]
    assert c0.arch == c5.arch == "cnn1"
    sim.run_round(1)
    a, b = snapshot(c0.module("model")), snapshot(c5.module("model"))
    assert any(not torch.equal(a[k], b[k]) for k in a)  # trained on different data
    with torch.no_grad():
        c0.module("model").fc3.weight.add_(1.0)  # a write to one client's state ...
    assert torch.equal(snapshot(c5.module("model"))["fc3.weight"], b["fc3.weight"])  # ... leaves the other's
    assert torch.equal(snapshot(c0.module("model"))["fc3.weight"], a["fc3.weight"] + 1.0)


@pytest.mark.parametrize("method,extra", [("standalone", {}), ("fedavg", {"models": "cnn1"}), ("fedlora", {}),
                                          ("fedlora", {"adapter": "small-cnn-decomp"})])
def test_same_seed_same_metrics(method, extra):
    r1 = make_sim(small_config(method=method, **extra)).run()
    r2 = make_sim(small_config(method=method, **extra)).run()
    for a, b in zip(r1, r2, strict=True):
        assert [(x.correct, x.bytes_up, x.train_macs) for x in a.rows] == \
               [(x.correct, x.bytes_up, x.train_macs) for x in b.rows]


@pytest.mark.parametrize("method,extra", [("standalone", {}), ("fedavg", {"models": "cnn5", "partition": "iid"}),
                                          ("fedlora", {})])
def test_synthetic_smoke_learns(method, extra):
    sim = make_sim(small_config(method=method, rounds=3, **extra))
    acc, _ = sim.run()[-1].accuracy()
    guess = own_class_guess(sim)  # always predicting the client's most frequent class: ~0.5 pathological
    assert acc >= guess + 0.2, f"{method} did not learn: {acc} (guessing own classes: {guess})"
