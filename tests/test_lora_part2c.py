"""CE-LoRA (tri-matrix, personalised; spec §3.15) and FL-TAC (task-specific adapters clustered by K-means;
spec §3.17): their defining math in float64, payload bytes against the formulas, the §6.5 zero-gradient
caveat, the FLOP meter on the tri-matrix layer against torch's FlopCounterMode, and 5-round smoke runs on
the synthetic set with a seeded random backbone."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_lora_family import _head_bytes, lora_config, lora_sim

from fedbench.errors import ConfigError
from fedbench.lora.layers import AdapterSet, LoRALayer, Target
from fedbench.lora.trimatrix import REFERENCE_A_STD, TriAdapterSet, TriLoRALayer
from fedbench.methods.base import Upload
from fedbench.methods.lora.ce_lora import similarity_weights
from fedbench.methods.lora.fl_tac import clustering_accuracy, combine, kmeans, task_groups
from fedbench.runner import prepare

# --- the tri-matrix layer ----------------------------------------------------------------------------

LIN = Target("x", "linear", 12, 10)
CONV = Target("x", "conv", 3 * 3 * 3, 6, (3, (3, 3), (1, 1), (1, 1)))


def _random_tri(target, r=4, init="peft", alpha=8.0):
    torch.manual_seed(0)
    ad = TriAdapterSet((target,), r, alpha, False, init).double()
    for mods in (ad.lora_A, ad.lora_B, ad.lora_C):
        torch.nn.init.normal_(mods[target.key].weight)
    return ad


def test_tri_matrix_effective_weight_is_w0_plus_s_bca():
    ad = _random_tri(LIN)
    lin = torch.nn.Linear(12, 10).double()
    layer = TriLoRALayer(lin, LIN)
    layer.adapters = ad
    a, b, c = ad.factors(LIN.key)[0], ad.factors(LIN.key)[1], ad.core(LIN.key)
    assert a.shape == (4, 12) and c.shape == (4, 4) and b.shape == (10, 4)  # PEFT layout
    w_eff = lin.weight + ad.scaling * b @ c @ a
    x = torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ w_eff.T + lin.bias, rtol=0, atol=1e-12)
    torch.testing.assert_close(ad.delta(LIN.key), w_eff - lin.weight, rtol=0, atol=1e-12)
    assert (ad.delta(LIN.key) - ad.scaling * b @ a).norm() > 1e-3  # C is really in the product
    # a convolution: W_eff flattened over its kernel
    cad = _random_tri(CONV)
    conv = torch.nn.Conv2d(3, 6, 3, padding=1).double()
    cl = TriLoRALayer(conv, CONV)
    cl.adapters = cad
    xi = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    w = conv.weight + cad.delta(CONV.key).reshape(conv.weight.shape)
    torch.testing.assert_close(cl(xi), F.conv2d(xi, w, conv.bias, padding=1), rtol=0, atol=1e-10)


def test_tri_layer_keeps_two_factor_behaviour():
    """The TriLoRALayer runs a plain AdapterSet exactly as LoRALayer does (layers.py is unchanged)."""
    torch.manual_seed(1)
    ad = AdapterSet((LIN,), 4, 8.0, False).double()
    torch.nn.init.normal_(ad.lora_B[LIN.key].weight)
    lin = torch.nn.Linear(12, 10).double()
    old, new = LoRALayer(lin, LIN), TriLoRALayer(lin, LIN)
    old.adapters = new.adapters = ad
    x = torch.randn(3, 12, dtype=torch.float64)
    assert torch.equal(old(x), new(x))
    new.adapters = None
    assert torch.equal(new(x), lin(x))


def test_inits_and_the_zero_gradient_caveat():
    """Why --celora-init exists (spec §6.5): the reference start (A ~ N(0, 1e-3^2), B = 0, C = I) with A and
    B frozen gives C a gradient of exactly zero; random-B (C = 0, B random) and the A, B warm-up do not."""
    lin = torch.nn.Linear(64, 48)
    t = Target("x", "linear", 64, 48)
    x, y = torch.randn(32, 64), torch.randint(0, 48, (32,))

    def grads(init, train_ab):
        torch.manual_seed(2)
        ad = TriAdapterSet((t,), 8, 16.0, False, init)
        layer = TriLoRALayer(lin, t)
        layer.adapters = ad
        ad.lora_A[t.key].weight.requires_grad_(train_ab)
        ad.lora_B[t.key].weight.requires_grad_(train_ab)
        F.cross_entropy(layer(x), y).backward()
        return ad

    ref = grads("reference", False)
    a, b = ref.factors(t.key)
    assert abs(float(a.std()) - REFERENCE_A_STD) < 2e-4 and torch.equal(b, torch.zeros_like(b))
    assert torch.equal(ref.core(t.key), torch.eye(8))
    assert torch.equal(ref.lora_C[t.key].weight.grad, torch.zeros(8, 8))  # exactly zero: C never moves
    rnd = grads("random-b", False)
    assert torch.equal(rnd.core(t.key), torch.zeros(8, 8)) and rnd.factors(t.key)[1].abs().min() > 0
    assert torch.equal(rnd.delta(t.key), torch.zeros(48, 64))  # starts at W0
    assert rnd.lora_C[t.key].weight.grad.abs().max() > 1e-6
    warm = grads("peft", True)
    assert torch.equal(warm.delta(t.key), torch.zeros(48, 64))  # starts at W0 (B = 0)
    assert torch.equal(warm.lora_C[t.key].weight.grad, torch.zeros(8, 8))  # still 0 at the first step...
    assert warm.lora_B[t.key].weight.grad.abs().max() > 1e-6  # ...but B moves, and with it C's gradient


# --- CE-LoRA: the server rule ------------------------------------------------------------------------

def _weights_by_hand(ps, hists, cores, mix, tau):
    m = len(ps)
    w = torch.zeros(m, m, dtype=torch.float64)

    def cos(u, v):
        nu, nv = u.norm(), v.norm()
        return float(u @ v / (nu * nv)) if nu > 0 and nv > 0 else 0.0

    for i in range(m):
        sims = [1.0 if i == j else mix * cos(hists[i], hists[j]) + (1 - mix) * cos(cores[i], cores[j])
                for j in range(m)]
        e = [ps[j] * math.exp(sims[j] / tau) for j in range(m)]
        for j in range(m):
            w[i, j] = e[j] / sum(e)
    return w


def test_similarity_weights_rows_sum_to_one_and_match_the_formula():
    g = torch.Generator().manual_seed(4)
    ps = [0.1, 0.3, 0.2, 0.4]
    hists = torch.rand(4, 10, generator=g, dtype=torch.float64)
    hists /= hists.sum(1, keepdim=True)
    cores = torch.randn(4, 50, generator=g, dtype=torch.float64)
    w = similarity_weights(ps, hists, cores, 0.5, 0.1)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(1), torch.ones(4, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(w, _weights_by_hand(ps, hists, cores, 0.5, 0.1), rtol=0, atol=1e-12)
    assert (w.diagonal() > w.max(1).values - 1e-15).all()  # a client is most similar to itself
    # a large temperature gives the uniform rule (the prior p_j), a small one keeps a client's own C
    torch.testing.assert_close(similarity_weights(ps, hists, cores, 0.5, 1e9),
                               torch.tensor([ps] * 4, dtype=torch.float64), rtol=0, atol=1e-8)
    torch.testing.assert_close(similarity_weights(ps, hists, cores, 0.5, 1e-4), torch.eye(4, dtype=torch.float64),
                               rtol=0, atol=1e-8)
    # mix = 1: data space only (the cores do not matter); identical histograms -> the prior
    torch.testing.assert_close(similarity_weights(ps, hists, cores, 1.0, 0.1),
                               similarity_weights(ps, hists, -cores, 1.0, 0.1), rtol=0, atol=1e-12)
    same = hists[:1].expand(4, 10)
    torch.testing.assert_close(similarity_weights(ps, same, cores, 1.0, 0.1), torch.tensor([ps] * 4, dtype=torch.float64),
                               rtol=0, atol=1e-12)


def _spy_uploads(sim):
    m, seen = sim.method, {}
    orig = m.upload

    def upload(client):
        p = orig(client)
        seen[client.id] = p
        return p

    m.upload = upload
    return seen


def _core_keys(sim):
    return list(sim.server.module("lora").lora_C)


def test_uniform_mode_is_the_fedavg_of_c_and_exact_with_shared_a_b():
    sim = lora_sim("ce-lora", celora_weights="uniform", celora_init="random-B", rounds=2, fraction=0.6)
    seen = _spy_uploads(sim)
    res = sim.run_round(1)
    sel = [r.client for r in res.rows if r.selected]
    p = torch.tensor(sim.agg_n[sel] / sim.agg_n[sel].sum(), dtype=torch.float64)
    ad = sim.server.module("lora")
    for k in _core_keys(sim):
        want = sum(p[i] * seen[c]["C"][k].double() for i, c in enumerate(sel))
        torch.testing.assert_close(ad.lora_C[k].weight.double(), want, rtol=0, atol=1e-6)
        # random-B: A, B common, so s B C_bar A is the FedAvg of the clients' s B C_j A (exact for C)
        a, b = (f.double() for f in ad.factors(k))
        ideal = sum(p[i] * ad.scaling * b @ seen[c]["C"][k].double() @ a for i, c in enumerate(sel))
        torch.testing.assert_close(ad.scaling * b @ ad.lora_C[k].weight.double() @ a, ideal, rtol=0, atol=1e-5)
    for c in sim.clients:  # everyone's next download is that mean
        down = sim.method.download(sim.server, c, sim.broadcast)["C"]
        assert all(torch.equal(down[k], ad.lora_C[k].weight) for k in down)


def test_similarity_mode_sends_each_client_its_own_mix():
    sim = lora_sim("ce-lora", rounds=1, fraction=1.0, partition="dirichlet", alpha=0.5)
    seen = _spy_uploads(sim)
    res = sim.run_round(1)
    m = sim.method
    sel = [r.client for r in res.rows if r.selected]
    p = (sim.agg_n[sel] / sim.agg_n[sel].sum()).tolist()
    keys = _core_keys(sim)
    hists = torch.stack([sim.clients[c].label_counts.double() / sim.clients[c].label_counts.sum() for c in sel])
    for c in sel:
        torch.testing.assert_close(seen[c]["hist"].double(), hists[sel.index(c)], rtol=0, atol=1e-7)
    cores = torch.stack([torch.cat([(seen[c]["C"][k].double() - m.c0[k]).flatten() for k in keys]) for c in sel])
    w = _weights_by_hand(p, hists, cores, m.hp.celora_mix, m.hp.celora_temperature)
    assert w.diagonal().max() < 0.999  # the mix is not trivially the client's own C
    assert math.isclose(res.metrics["celora_self_weight"], float(w.diagonal().mean()), rel_tol=1e-6)
    for i, c in enumerate(sel):
        down = m.download(sim.server, sim.clients[c], sim.broadcast)["C"]
        for k in keys:
            want = sum(w[i, j] * seen[cj]["C"][k].double() for j, cj in enumerate(sel))
            torch.testing.assert_close(down[k].double(), want, rtol=0, atol=1e-6)
    assert res.server_macs > 0  # the Gram matrices and mixes are metered


@pytest.mark.parametrize("rule", ["uniform", "similarity"])
def test_celora_payload_is_r_squared_per_matrix(rule):
    sim = lora_sim("ce-lora", celora_weights=rule, rank=4, rounds=2, fraction=0.6)
    n_mat = len(sim.method.targets)
    for t in (1, 2):
        for row in sim.run_round(t).rows:
            down = 4 * 4 * 4 * n_mat + _head_bytes(sim) if row.selected else 0
            up = down + (4 * sim.num_classes if rule == "similarity" and row.selected else 0)
            assert (row.bytes_up, row.bytes_down) == (up, down), (rule, t, row.client)


def _lora_state(client):
    ad = client.module("lora")
    return {f: {k: m.weight.detach().clone() for k, m in mods.items()}
            for f, mods in (("A", ad.lora_A), ("B", ad.lora_B), ("C", ad.lora_C))}


def _changed(s0, s1, f):
    return any(not torch.equal(s0[f][k], s1[f][k]) for k in s0[f])


def test_a_and_b_untouched_in_c_only_phases():
    sim = lora_sim("ce-lora", celora_init="train-AB-first", rounds=2, fraction=1.0)
    start = _lora_state(sim.clients[0])
    sim.run_round(1)
    warm = [_lora_state(c) for c in sim.clients]
    assert _changed(start, warm[0], "A") and _changed(start, warm[0], "B")  # the warm-up trains them
    sim.run_round(2)
    for c, before in zip(sim.clients, warm, strict=True):
        after = _lora_state(c)
        assert not _changed(before, after, "A") and not _changed(before, after, "B")
        assert _changed(before, after, "C")
    rnd = lora_sim("ce-lora", celora_init="random-B", rounds=2, fraction=1.0)
    shared = _lora_state(rnd.clients[0])
    rnd.run_round(1)
    rnd.run_round(2)
    for c in rnd.clients:  # A and B: the shared seed's, in every client, for ever
        s = _lora_state(c)
        assert not _changed(shared, s, "A") and not _changed(shared, s, "B") and _changed(shared, s, "C")


def test_reference_quirks_reproduce_the_frozen_c_defect():
    """The reference start and C-only training: every client uploads exactly the C it downloaded (I in
    round 1), whatever it trains on (without weight decay, which would shrink C)."""
    sim = lora_sim("ce-lora", reference_quirks=True, weight_decay=0.0, rounds=2, fraction=1.0)
    m, downs = sim.method, {}
    seen = _spy_uploads(sim)
    orig = m.download

    def download(server, client, state):
        downs[client.id] = p = orig(server, client, state)
        return p

    m.download = download
    for t in (1, 2):
        sim.run_round(t)
        for c in sim.clients:
            for k, v in seen[c.id]["C"].items():
                assert torch.equal(v, downs[c.id]["C"][k]), (t, c.id, k)
                if t == 1:
                    assert torch.equal(v.reshape(v.shape[0], -1), torch.eye(v.shape[0]))
        assert any(not torch.equal(seen[c.id]["head"]["weight"], downs[c.id]["head"]["weight"])
                   for c in sim.clients)  # the head learns


def _step_flops(sim, freeze_ab=False):
    """(fedbench FLOPs, FlopCounterMode FLOPs) of one CE-LoRA training step of client 0."""
    from torch.utils.flop_counter import FlopCounterMode
    c, m = sim.clients[0], sim.method
    ad = c.module("lora")
    for p in (*ad.lora_A.parameters(), *ad.lora_B.parameters()):
        p.requires_grad_(not freeze_ab)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with sim.meter.scope("warm", "train"):
        F.cross_entropy(m.forward(c, x), y).backward()
    sim.meter.take()
    with sim.meter.scope(0, "train"), FlopCounterMode(display=False) as fc:
        F.cross_entropy(m.forward(c, x), y).backward()
    return 2 * sim.meter.take()[(0, "train")], fc.get_total_flops()


@pytest.mark.parametrize("backbone,targets", [("vit", "attn"), ("resnet", "conv")])
def test_meter_counts_the_tri_matrix_step_as_flop_counter(backbone, targets):
    sim = lora_sim("ce-lora", backbone=backbone, targets=targets)
    ours, theirs = _step_flops(sim)
    assert ours == theirs
    ours_c, theirs_c = _step_flops(sim, freeze_ab=True)  # the C-only phase: fewer weight gradients
    assert ours_c == theirs_c and ours_c < ours
    fedit, _ = _step_flops(lora_sim("fedit", backbone=backbone, targets=targets))
    assert ours > fedit  # the r x r product is there


# --- FL-TAC: clustering and the multi-task split -----------------------------------------------------

def _blobs(sizes=(5, 7, 4), d=20, seed=5):
    g = torch.Generator().manual_seed(seed)
    centres = 10 * torch.randn(len(sizes), d, generator=g, dtype=torch.float64)
    x = torch.cat([c + 0.1 * torch.randn(n, d, generator=g, dtype=torch.float64) for c, n in zip(centres, sizes,
                                                                                                    strict=True)])
    truth = torch.cat([torch.full((n,), j) for j, n in enumerate(sizes)])
    perm = torch.randperm(len(truth), generator=g)
    return x[perm], truth[perm]


def test_kmeans_recovers_well_separated_clusters():
    x, truth = _blobs()
    labels, inertia = kmeans(x, 3, n_init=10, seed=0)
    assert clustering_accuracy(labels.tolist(), truth.tolist()) == 1.0
    for j in range(3):  # one cluster per group
        assert len(set(labels[truth == j].tolist())) == 1
    assert inertia < 16 * 20 * 0.1 ** 2 * 2  # about the noise: no blob split or merged
    again, _ = kmeans(x, 3, n_init=10, seed=0)
    assert torch.equal(labels, again)  # seeded
    counted = []
    kmeans(x, 3, n_init=2, seed=0, count=counted.append)
    assert sum(counted) >= 2 * x.shape[0] * x.shape[1] * 3  # at least one distance pass per start


def test_clustering_accuracy_is_hungarian_matched():
    assert clustering_accuracy([2, 2, 0, 0, 1], [0, 0, 1, 1, 2]) == 1.0  # any relabelling
    assert clustering_accuracy([0, 0, 0, 1], [0, 0, 1, 1]) == 0.75
    assert clustering_accuracy([0, 0, 0, 0], [0, 0, 1, 1]) == 0.5  # one cluster can match one task only


def test_task_groups_and_client_tasks():
    assert task_groups(10, 3).tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert task_groups(10, 2).tolist() == [0] * 5 + [1] * 5
    sim = lora_sim("fl-tac", partition="dirichlet", alpha=0.5, fltac_min_samples=150)
    m = sim.method
    for c in sim.clients:
        counts = c.label_counts
        assert int(counts.sum()) == c.n_train
        n = m.counts[c.id]
        assert n.tolist() == [int(counts[:5].sum()), int(counts[5:].sum())]
        assert m.held[c.id] == ([j for j in (0, 1) if n[j] >= 150] or [int(n.argmax())])
    assert {len(h) for h in m.held} == {1, 2}  # the test sees one-task and two-task clients


def test_each_task_adapter_trains_only_on_its_tasks_samples(monkeypatch):
    from types import SimpleNamespace

    from fedbench.methods.lora import fl_tac
    sim = lora_sim("fl-tac", rounds=1, fraction=1.0, partition="dirichlet", alpha=0.5, fltac_min_samples=150)
    m, calls, current = sim.method, [], {}
    orig = m.forward_task

    def forward_task(party, j, x):
        current.update(client=party.id, task=j)
        return orig(party, j, x)

    def cross_entropy(logits, y):
        calls.append((current["client"], current["task"], y.clone()))
        return F.cross_entropy(logits, y)

    m.forward_task = forward_task
    monkeypatch.setattr(fl_tac, "F", SimpleNamespace(cross_entropy=cross_entropy))
    res = sim.run_round(1)
    groups = task_groups(sim.num_classes, 2)
    for cid, j, y in calls:
        assert j in m.held[cid] and bool((groups[y] == j).all()), (cid, j)
    assert {(cid, j) for cid, j, _ in calls} == {(c.id, j) for c in sim.clients for j in m.held[c.id]}
    for row in res.rows:  # a client holding every task trains on every sample it is handed, once
        trained = sum(len(y) for cid, _, y in calls if cid == row.client)
        if len(m.held[row.client]) == 2:
            assert trained == row.train_samples
        else:
            assert 0 < trained < row.train_samples


def _fake_adapter(sim, value, seed):
    g = torch.Generator().manual_seed(seed)
    m = sim.method
    r = m.ranks[0]
    return {"A": {t.key: value + 0.01 * torch.randn(r, t.d_in, generator=g, dtype=torch.float64)
                  for t in m.targets},
            "B": {t.key: value + 0.01 * torch.randn(t.d_out, r, generator=g, dtype=torch.float64)
                  for t in m.targets}}


def test_server_clusters_submissions_and_averages_by_sample_count():
    sim = lora_sim("fl-tac", head="local", partition="dirichlet", alpha=0.5, fltac_min_samples=150)
    m = sim.method
    uploads, subs = [], []
    for c in sim.clients:
        payload = {}
        for s, j in enumerate(m.held[c.id]):
            part = _fake_adapter(sim, 1.0 if j == 0 else -1.0, seed=10 * c.id + s)
            n = float(3 + c.id + 5 * j)
            part["n"] = torch.tensor([n], dtype=torch.float64)
            payload[str(s)] = part
            subs.append((c.id, s, j, part, n))
        uploads.append(Upload(c.id, 1.0 / len(sim.clients), payload))
    sim._metrics = {}
    m.server_update(sim.server, uploads)
    assert sim._metrics["round"]["fltac_cluster_acc"] == 1.0
    for cid, s, j, _, _ in subs:
        group = [(p, n) for _, _, jj, p, n in subs if jj == j]
        total = sum(n for _, n in group)
        got = m.assigned[(cid, s)]
        for f in ("A", "B"):
            for k in got[f]:
                want = sum((n / total) * p[f][k] for p, n in group)
                assert got[f][k].dtype == torch.float64
                torch.testing.assert_close(got[f][k], want, rtol=0, atol=1e-12)
        down = m.download(sim.server, sim.clients[cid], None)[str(s)]
        assert down is got  # the submission gets its cluster's adapter back


def test_fltac_bytes_per_task_and_one_task_clients_send_one_adapter():
    sim = lora_sim("fl-tac", rounds=2, fraction=1.0, partition="dirichlet", alpha=0.5, fltac_min_samples=150)
    m = sim.method
    per_task = 4 * sum(t.factor_numel(m.ranks[0]) for t in m.targets) + _head_bytes(sim)
    seen = {}
    orig = m.upload
    m.upload = lambda client: seen.setdefault(client.id, orig(client))
    for t in (1, 2):
        seen.clear()
        for row in sim.run_round(t).rows:
            tasks = len(m.held[row.client])
            assert len(seen[row.client]) == tasks
            assert row.bytes_down == tasks * per_task
            assert row.bytes_up == tasks * (per_task + 4)  # + the sample count n_ij
    assert any(len(h) == 1 for h in m.held)


def test_fltac_with_one_task_is_fedit():
    """K = 1: one cluster, count-weighted (= FedIT's p with --agg-weight train), every batch for the one task."""
    kw = dict(rounds=2, fraction=1.0, agg_weight="train")
    a, b = lora_sim("fedit", **kw), lora_sim("fl-tac", tasks=1, **kw)
    for t in (1, 2):
        a.run_round(t)
        rb = b.run_round(t)
    assert rb.metrics["fltac_clusters"] == 1.0 and rb.metrics["fltac_cluster_acc"] == 1.0
    ad, agg = a.server.module("lora"), b.method.clusters[0]
    for k, mod in ad.lora_A.items():
        # two code paths, two rounds of AdamW: up to 1.7e-6 apart on AMD EPYC (AVX-512); a wrong weight ~1e-2
        torch.testing.assert_close(agg["A"][k], mod.weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(agg["B"][k], ad.lora_B[k].weight, rtol=1e-4, atol=1e-5)


def test_task_agnostic_inference_rules():
    a = torch.tensor([[4.0, 0.0, 0.0], [0.1, 0.0, 0.0]])
    b = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    conf = combine([a, b], "confidence")
    assert torch.equal(conf[0], a[0]) and torch.equal(conf[1], b[1])  # per sample, the surer adapter
    ens = combine([a, b], "ensemble")
    torch.testing.assert_close(ens.exp(), (a.softmax(-1) + b.softmax(-1)) / 2)
    assert combine([a], "ensemble") is a


# --- smoke runs and bad input ------------------------------------------------------------------------

@pytest.mark.parametrize("method,kw", [("ce-lora", {}),
                                       pytest.param("ce-lora", {"celora_init": "random-B"}, marks=pytest.mark.slow),
                                       ("fl-tac", {})])
def test_five_round_smoke_run(method, kw):
    sim = lora_sim(method, rounds=5, eval_every=5, local_steps=4, lr=3e-3, partition="dirichlet", alpha=0.5, **kw)
    before = [sim.evaluate(c) for c in sim.clients]
    first = sum(c / n for c, n in before) / len(before)
    rows = sim.run()
    last = rows[-1].accuracy()[0]
    assert last > 0.45 and last > first + 0.2, (method, kw, first, last)
    for r in rows:
        assert all(math.isfinite(v) for v in r.metrics.values())
        assert all(row.bytes_up > 0 and row.bytes_down > 0 for row in r.rows if row.selected)
    if method == "ce-lora":
        assert rows[-1].global_accuracy() is None  # personalised
    else:
        assert 0.0 <= rows[-1].metrics["fltac_cluster_acc"] <= 1.0
        assert rows[-1].global_accuracy() > 0.3  # K cluster adapters, task-agnostic


@pytest.mark.parametrize("kw,match", [
    (dict(method="ce-lora", celora_init="B-first"), r"--celora-init .* 'B-first'; choose from: train-ABC, train-AB-first"),
    (dict(method="ce-lora", celora_weights="cosine"), r"--celora-weights .*'cosine'; choose from"),
    (dict(method="ce-lora", celora_temperature=0), r"--celora-temperature .* must be > 0"),
    (dict(method="ce-lora", celora_mix=1.5), r"--celora-mix .* must be <= 1"),
    (dict(method="fl-tac", fltac_infer="vote"), r"--fltac-infer .*'vote'; choose from: confidence, ensemble"),
    (dict(method="fl-tac", tasks=0), r"--tasks .* must be >= 1"),
])
def test_bad_flags_are_one_line_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match) as e:
        lora_config(**kw)
    assert "\n" not in str(e.value)


def test_more_tasks_than_classes_is_a_config_error():
    with pytest.raises(ConfigError, match=r"--tasks 11: the dataset synthetic has 10 classes") as e:
        prepare(lora_config("fl-tac", tasks=11), None, "cpu")
    assert "\n" not in str(e.value)


def test_downloads_that_do_not_fit_are_refused():
    ce = lora_sim("ce-lora")
    c, key = ce.clients[0], _core_keys(ce)[0]
    good = ce.method.download(ce.server, c, ce.broadcast)
    ce.method.install(c, good)
    assert torch.equal(c.module("lora").lora_C[key].weight, good["C"][key])
    with pytest.raises(KeyError, match="no_such_layer"):
        ce.method.install(c, {"C": {"no_such_layer": torch.eye(8)}})
    with pytest.raises(ValueError, match="shape"):
        ce.method.install(c, {"C": {key: torch.eye(3)}})
    tac = lora_sim("fl-tac")
    c = tac.clients[0]
    down = tac.method.download(tac.server, c, tac.broadcast)
    assert set(down) == {str(s) for s in range(len(tac.method.held[c.id]))}
    with pytest.raises(KeyError, match="slot '7'"):
        tac.method.install(c, {"7": down["0"]})
    with pytest.raises(ValueError, match="shape"):
        tac.method.install(c, {"0": {"A": {k: v[:2] for k, v in down["0"]["A"].items()}}})
