"""Math of the core methods: payload bytes against the formula, aggregation identities, FedLoRA's
reconstruction properties (spec B.6)."""

import numpy as np
import pytest
import torch
from conftest import make_sim, small_config

from fedbench.methods.base import snapshot

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


def test_fedlora_phase2_trains_only_adapter():
    sim = make_sim(small_config(method="fedlora", rounds=1))
    c = sim.clients[1]
    before_B = c.module("adapter").lora_B.weight.detach().clone()
    sim.run_round(1)
    assert not torch.equal(c.module("adapter").lora_B.weight, before_B)


def test_client_state_is_separate_per_client():
    sim = make_sim(small_config(method="standalone", rounds=1))
    sim.run_round(1)
    w0 = sim.clients[0].module("model").fc3.weight.detach().clone()
    w5 = sim.clients[5 % 5].module("model").fc3.weight.detach().clone()  # same arch? client 0 and 5 are cnn1
    assert torch.equal(w0, w5)  # same client index -> same tensors
    # clients 0 and 1 have different architectures, clients of one arch keep their own tensors
    sim2 = make_sim(small_config(method="standalone", rounds=1, clients=10))
    sim2.run_round(1)
    a = sim2.clients[0].module("model").fc3.weight.detach().clone()
    b = sim2.clients[5].module("model").fc3.weight.detach().clone()
    assert not torch.equal(a, b)


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
    res = make_sim(small_config(method=method, rounds=3, **extra)).run()
    acc, _ = res[-1].accuracy()
    chance = 0.1 if extra.get("partition") == "iid" else 0.5
    assert acc > chance + 0.15, f"{method} did not learn: {acc}"
