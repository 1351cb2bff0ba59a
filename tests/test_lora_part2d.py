"""FedLEASE (spec §3.18): the silhouette against hand-computed values, the B-cosine clustering, expert m
averaged only over cluster m (float64), the mixture layer against a plain LoRA layer (float64), the
routing weights, payload bytes against the formula in warm-up, joining and mixture rounds, the FLOP
meter against FlopCounterMode on a mixture training step, bad input, and a 5-round smoke run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_lora_family import _head_bytes, _meter_and_flop_counter, lora_config, lora_sim

from fedbench.errors import ConfigError
from fedbench.lora.experts import ExpertSet, MixtureLayer, activate_experts, route
from fedbench.lora.layers import AdapterSet, LoRALayer, Target
from fedbench.methods.base import Upload
from fedbench.methods.lora.fedlease import b_distances, choose_clusters, silhouette
from fedbench.runner import prepare

# --- clustering ----------------------------------------------------------------------------------------


def _line(xs):
    x = np.asarray(xs, dtype=float)
    return np.abs(x[:, None] - x[None, :])


def test_silhouette_equals_the_hand_computed_value():
    # points 0, 1 | 4, 6 on a line:
    #   s(0) = (mean(4, 6) - 1) / 5 = 4/5      s(1) = (mean(3, 5) - 1) / 4 = 3/4
    #   s(4) = (mean(4, 3) - 2) / 3.5 = 3/7    s(6) = (mean(6, 5) - 2) / 5.5 = 7/11
    want = (4 / 5 + 3 / 4 + 3 / 7 + 7 / 11) / 4
    assert math.isclose(silhouette(_line([0, 1, 4, 6]), [0, 0, 1, 1]), want, rel_tol=1e-12)
    # a cluster of one counts 0: points 0, 1 | 5 -> (4/5 + 3/4 + 0) / 3
    assert math.isclose(silhouette(_line([0, 1, 5]), [0, 0, 1]), (4 / 5 + 3 / 4) / 3, rel_tol=1e-12)
    # a bad split scores lower than the natural one
    assert silhouette(_line([0, 1, 4, 6]), [0, 1, 0, 1]) < 0
    with pytest.raises(ValueError):
        silhouette(_line([0, 1, 4]), [0, 1, 2])  # n clusters for n points: undefined


def _Bs(groups, n_keys=2, d_out=12, r=3, noise=0.05, seed=0):
    """One dict of B's per client; clients of a group share a direction (plus noise)."""
    g = torch.Generator().manual_seed(seed)
    centres = {c: [torch.randn(d_out, r, generator=g, dtype=torch.float64) for _ in range(n_keys)]
               for c in set(groups)}
    return [{f"k{j}": centres[c][j] + noise * torch.randn(d_out, r, generator=g, dtype=torch.float64)
             for j in range(n_keys)} for c in groups]


def test_b_distance_is_the_mean_cosine_distance_over_matrices():
    Bs = _Bs([0, 1, 0])
    d = b_distances(Bs)
    cos = [float(torch.nn.functional.cosine_similarity(Bs[0][k].reshape(-1), Bs[1][k].reshape(-1), dim=0))
           for k in ("k0", "k1")]
    assert math.isclose(d[0, 1], np.mean([1 - c for c in cos]), rel_tol=1e-12)
    assert np.allclose(d, d.T) and np.all(np.diag(d) == 0)
    scaled = [{k: 3.0 * v for k, v in b.items()} for b in Bs]
    assert np.allclose(b_distances(scaled), d, atol=1e-12)  # scale-free: a cosine
    zero = b_distances([{"k0": torch.zeros(4, 2)}, {"k0": torch.ones(4, 2)}])  # an untrained B
    assert zero[0, 1] == 1.0


def test_clustering_recovers_well_separated_groups_and_picks_m_by_silhouette():
    groups = [0, 1, 0, 1, 1, 0]
    labels, m, score = choose_clusters(b_distances(_Bs(groups)), max_clusters=4)
    assert m == 2 and labels == groups and score > 0.5
    three = [2, 0, 1, 0, 2, 1, 1, 0]
    labels, m, _ = choose_clusters(b_distances(_Bs(three, seed=1)), max_clusters=4)
    assert m == 3 and len({(a, b) for a, b in zip(labels, three, strict=True)}) == 3  # same partition
    labels, m, _ = choose_clusters(b_distances(_Bs(three, seed=1)), max_clusters=2)
    assert m == 2  # the search stops at --fedlease-max-clusters
    # few clients: no error; one client -> one expert, two -> one each
    assert choose_clusters(np.zeros((1, 1)), 4) == ([0], 1, None)
    assert choose_clusters(_line([0, 1]), 4) == ([0, 1], 2, None)


# --- the mixture layer ----------------------------------------------------------------------------------

def _layer_pair(experts, routing, seed=0):
    torch.manual_seed(seed)
    t = Target("x", "linear", 10, 8)
    base = torch.nn.Linear(10, 8).double()
    layer = MixtureLayer(LoRALayer(base, t))
    ex = ExpertSet((t,), experts, 4, alpha=8.0, rslora=False, routing=routing).double()
    for b in ex.lora_B[t.key]:
        torch.nn.init.normal_(b.weight)
    return t, layer, ex


@pytest.mark.parametrize("routing", ["adaptive", "dense"])
def test_one_expert_is_a_plain_lora_layer(routing):
    t, layer, ex = _layer_pair(1, routing)
    ad = AdapterSet((t,), 4, alpha=8.0, rslora=False).double()
    ad.lora_A[t.key].weight.data.copy_(ex.lora_A[t.key][0].weight)
    ad.lora_B[t.key].weight.data.copy_(ex.lora_B[t.key][0].weight)
    x = torch.randn(3, 5, 10, dtype=torch.float64)
    activate_experts({"x": layer}, ex, own=0)
    mixed = layer(x)
    activate_experts({"x": layer}, None)
    layer.inner.adapters = ad
    plain = layer(x)
    torch.testing.assert_close(mixed, plain, rtol=0, atol=1e-12)
    assert (plain - layer.inner.base(x)).abs().max() > 0.1  # the adapter did something


def test_extra_slots_stand_for_the_own_expert():
    """M = 2, own expert 0: a router whose top-2 slots are 0 and 2 (slot 2 is an extra slot, i.e. the own
    expert) puts all weight on expert 0, so the layer is a plain LoRA layer with expert 0 whatever expert 1
    is; with own = 1 the same router splits the weight between experts 0 and 1."""
    t, layer, ex = _layer_pair(2, "adaptive", seed=1)
    ex.router[t.key].weight.data.zero_()
    ex.router[t.key].weight.data[:, 0] = torch.tensor([5.0, -5.0, 5.0], dtype=torch.float64)
    x = 0.01 * torch.randn(4, 10, dtype=torch.float64)
    x[:, 0] = 1.0
    activate_experts({"x": layer}, ex, own=0)
    ad = AdapterSet((t,), 4, alpha=8.0, rslora=False).double()
    ad.lora_A[t.key].weight.data.copy_(ex.lora_A[t.key][0].weight)
    ad.lora_B[t.key].weight.data.copy_(ex.lora_B[t.key][0].weight)
    want = layer.inner.base(x) + ad.scaling * ad.lora_B[t.key](ad.lora_A[t.key](x))
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-12)
    activate_experts({"x": layer}, ex, own=1)
    assert (layer(x) - want).abs().max() > 1e-3


def test_routing_weights_as_defined():
    # M = 2, logits ln(1, 2, 3): p = (1, 2, 3)/6; top-2 = slots 2, 1 -> renormalised 3/5, 2/5
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64))
    torch.testing.assert_close(route(logits, 2, 0, "adaptive"), torch.tensor([[0.6, 0.4]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(route(logits, 2, 1, "adaptive"), torch.tensor([[0.0, 1.0]]), rtol=0, atol=1e-6)
    dense = route(torch.log(torch.tensor([[1.0, 3.0]])), 2, 0, "dense")
    torch.testing.assert_close(dense, torch.tensor([[0.25, 0.75]]), rtol=0, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    for m in (3, 4):
        lg = torch.randn(6, 7, 2 * m - 1, generator=g)
        for own in range(m):
            w = route(lg, m, own, "adaptive")
            assert w.shape == (6, 7, m) and (w >= 0).all()
            torch.testing.assert_close(w.sum(-1), torch.ones(6, 7), rtol=0, atol=1e-6)
            # the kept mass is the M largest probabilities; the own expert gets at least its own slot's share
            p = torch.softmax(lg, -1)
            top = p.topk(m, -1).values
            own_share = torch.where(p[..., own:own + 1] >= top[..., -1:], p[..., own:own + 1], 0) / top.sum(-1,
                                                                                                  keepdim=True)
            assert (w[..., own:own + 1] >= own_share - 1e-6).all()


# --- the method on the engine ------------------------------------------------------------------------

class _FakeServer:
    """What FedLEASE.aggregate uses of a server, with float64 experts."""

    def __init__(self, experts):
        self.experts, self.metrics = experts, {}

    def module(self, name):
        assert name == "experts"
        return self.experts

    def report(self, name, value):
        self.metrics[name] = value

    def count_macs(self, macs):
        pass


def test_expert_m_is_averaged_only_over_cluster_m_float64():
    sim = lora_sim("fedlease", fedlease_warmup=1, rounds=2, fedlease_upload="all")
    m = sim.method
    m.M, m.assign = 3, {0: 0, 1: 1, 2: 0, 3: 1, 4: 0}  # cluster 2 has no participant this round
    ex = ExpertSet(tuple(m.targets), 3, m.r_global, m.hp.lora_alpha, False, "adaptive").double()
    for t in m.targets:
        for b in ex.lora_B[t.key]:
            torch.nn.init.normal_(b.weight)
    start = {(t.key, k): [w.detach().clone() for w in ex.factors(t.key, k)] for t in m.targets for k in range(3)}
    g = torch.Generator().manual_seed(0)
    weights = [0.1, 0.3, 0.2, 0.25, 0.15]
    uploads = []
    for c, w in enumerate(weights):
        experts = {str(k): {"A": {t.key: torch.randn(m.r_global, t.d_in, generator=g, dtype=torch.float64)
                                  for t in m.targets},
                            "B": {t.key: torch.randn(t.d_out, m.r_global, generator=g, dtype=torch.float64)
                                  for t in m.targets}} for k in range(3)}
        uploads.append(Upload(c, w, {"experts": experts}))
    server = _FakeServer(ex)
    with torch.no_grad():
        m.aggregate(server, uploads)
    num = den = 0.0
    for k, members in ((0, [0, 2, 4]), (1, [1, 3])):
        ws = [weights[c] / sum(weights[i] for i in members) for c in members]
        for t in m.targets:
            As = [uploads[c].payload["experts"][str(k)]["A"][t.key] for c in members]
            Bs = [uploads[c].payload["experts"][str(k)]["B"][t.key] for c in members]
            a_bar = sum(w * a for w, a in zip(ws, As, strict=True))
            b_bar = sum(w * b for w, b in zip(ws, Bs, strict=True))
            a, b = ex.factors(t.key, k)
            torch.testing.assert_close(a, a_bar, rtol=0, atol=1e-12)
            torch.testing.assert_close(b, b_bar, rtol=0, atol=1e-12)
            s = ex.scaling
            cov = s * sum(w * (bi - b_bar) @ (ai - a_bar) for w, ai, bi in zip(ws, As, Bs, strict=True))
            a0, b0 = start[(t.key, k)]
            ideal = s * sum(w * bi @ ai for w, ai, bi in zip(ws, As, Bs, strict=True))
            num += float(cov.square().sum())
            den += float((ideal - s * b0 @ a0).square().sum())
    for t in m.targets:  # no participant: unchanged
        a, b = ex.factors(t.key, 2)
        assert torch.equal(a, start[(t.key, 2)][0]) and torch.equal(b, start[(t.key, 2)][1])
    # D_t pooled over clusters is FedIT's covariance error within each cluster
    assert math.isclose(server.metrics["agg_deviation_abs"], num ** 0.5, rel_tol=1e-10)
    assert math.isclose(server.metrics["agg_deviation"], (num / den) ** 0.5, rel_tol=1e-10)
    assert "agg_deviation_c2" not in server.metrics and server.metrics["agg_deviation_c0"] > 0


@pytest.mark.parametrize("opts", [dict(), dict(fedlease_upload="all", fedlease_router_agg=True, head="shared")])
def test_payload_bytes_in_warmup_joining_and_mixture_rounds(opts):
    W = 2
    sim = lora_sim("fedlease", fedlease_warmup=W, rounds=6, fraction=0.6, **opts)
    m = sim.method
    P = sum(m.r_global * (t.d_in + t.d_out) for t in m.targets)
    H = _head_bytes(sim) if m.hp.head == "shared" else 0
    joined = mixed = 0
    for t in range(1, 7):
        assigned = dict(m.assign)
        routers = set(m.routers)
        res = sim.run_round(t)
        M = m.M
        R = sum(t_.d_in * (2 * M - 1) for t_ in m.targets) if M else 0
        for row in res.rows:
            c = row.client
            if not row.selected:
                want = (0, 0)
            elif t < W:
                want = (0, 0)
            elif t == W:
                want = (4 * P + H, 0)
            elif c not in assigned:  # joins a cluster this round
                want = (4 * P, 0)
                joined += 1
            else:
                agg = m.hp.fedlease_router_agg
                up = 4 * P * (M if m.hp.fedlease_upload == "all" else 1) + (4 * R if agg else 0) + H
                down = 4 * M * P + (4 * R if agg and assigned[c] in routers else 0) + H
                want = (up, down)
                mixed += 1
            assert (row.bytes_up, row.bytes_down) == want, (t, c, opts)
    assert joined > 0 and mixed > 0  # both paths ran
    assert set(m.assign) == {c for t in range(W, 7) for c in sim.sample(t)}


def test_meter_equals_flop_counter_on_a_mixture_training_step():
    """On attn-mlp: fc1/fc2 lie outside the attention module, whose matmul counter would also catch
    bare products inside q/v (so attn alone could not tell a product the meter misses)."""
    sim = lora_sim("fedlease", fedlease_warmup=1, rounds=2, targets="attn-mlp")
    sim.run_round(1)
    sim.run_round(2)
    assert 0 in sim.method.started and sim.method.M >= 2
    ours, fc = _meter_and_flop_counter(sim)
    assert ours == fc.get_total_flops()
    # the experts and routers were counted: more than a plain LoRA step on the same backbone
    plain, _ = _meter_and_flop_counter(lora_sim("fedit", targets="attn-mlp"))
    assert ours > plain


def test_every_downloaded_tensor_is_loaded_and_a_misfit_is_refused():
    sim = lora_sim("fedlease", fedlease_warmup=1, rounds=3, fedlease_router_agg=True, head="shared")
    m = sim.method
    orig, seen = m.train, []

    def train(client):
        state = {"experts": {}, "router": {},
                 "head": {k: v.detach().clone() for k, v in client.module("head").named_parameters()}}
        if client.id in m.started:
            ex = client.module("experts")
            state["experts"] = {str(k): {"A": {key: ex.lora_A[key][k].weight.detach().clone() for key in ex.lora_A},
                                         "B": {key: ex.lora_B[key][k].weight.detach().clone() for key in ex.lora_B}}
                                for k in range(m.M)}
            state["router"] = {key: r.weight.detach().clone() for key, r in ex.router.items()}
        seen.append((client.id, m.download(sim.server, client, None), state))
        return orig(client)

    m.train = train
    for t in (1, 2, 3):
        sim.run_round(t)
    checked = 0
    for _cid, payload, state in seen:
        for k, parts in payload.get("experts", {}).items():
            for part, tensors in parts.items():
                for key, v in tensors.items():
                    assert torch.equal(state["experts"][k][part][key], v)
                    checked += 1
        for part in ("router", "head"):
            for key, v in payload.get(part, {}).items():
                assert torch.equal(state[part][key], v)
                checked += 1
    assert checked > 0 and any("router" in p for _, p, _ in seen)  # round 3 sends the cluster routers
    c = sim.clients[0]
    with pytest.raises(KeyError):
        m.install(c, {"experts": {str(m.M): seen[-1][1]["experts"]["0"]}})  # no such expert
    with pytest.raises(KeyError):
        m.install(c, {"router": {"no_such_layer": torch.zeros(1)}})
    key = next(iter(seen[-1][1]["router"]))
    with pytest.raises(ValueError):
        m.install(c, {"router": {key: torch.zeros(1, 1)}})


def test_reference_quirks_first_mixture_round_loads_nothing_and_uses_own_lora():
    sim = lora_sim("fedlease", fedlease_warmup=1, rounds=3, reference_quirks=True)
    m = sim.method
    sim.run_round(1)
    lora = {c.id: m.factors_of(c, ("A", "B")) for c in sim.clients}
    seen = {}
    orig = m.train

    def train(client):
        ex = client.module("experts")
        own = m.assign[client.id]
        seen[client.id] = (own, {k: ex.lora_A[k][own].weight.detach().clone() for k in ex.lora_A},
                           [float(ex.lora_B[k][j].weight.detach().abs().sum()) for k in ex.lora_B for j in range(m.M)
                            if j != own])
        return orig(client)

    m.train = train
    res = sim.run_round(2)
    assert all(r.bytes_down == 0 for r in res.rows)
    for cid, (_own, a_own, other_b) in seen.items():
        for k, a in a_own.items():
            assert torch.equal(a, lora[cid]["A"][k])
        assert all(v == 0 for v in other_b)  # the other experts are fresh (B = 0)
    m.train = orig
    assert all(r.bytes_down > 0 for r in sim.run_round(3).rows)


def test_bad_input_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match="--fedlease-warmup 5 leaves no round for the experts in --rounds 5"):
        lora_config("fedlease", rounds=5)
    with pytest.raises(ConfigError, match="fedlease-routing"):
        lora_config("fedlease", fedlease_routing="sparse", fedlease_warmup=1)
    with pytest.raises(ConfigError, match="fedlease-max-clusters"):
        lora_config("fedlease", fedlease_max_clusters=1, fedlease_warmup=1)
    with pytest.raises(ConfigError, match="linear layers only"):
        prepare(lora_config("fedlease", backbone="resnet", targets="conv", fedlease_warmup=1), None, "cpu")


def test_five_round_smoke_run_learns():
    """Dirichlet(0.5) synthetic split, warm-up 2 then 3 mixture rounds: measured 0.63 per-client accuracy
    from about 0.1-0.2 untrained (majority-class guessing gives about 0.4)."""
    sim = lora_sim("fedlease", fedlease_warmup=2, rounds=5, eval_every=5, local_steps=4, lr=3e-3,
                   partition="dirichlet", alpha=0.5)
    before = [sim.evaluate(c) for c in sim.clients]
    first = sum(c / n for c, n in before) / len(before)
    rows = sim.run()
    last = rows[-1].accuracy()[0]
    assert last > 0.55 and last > first + 0.2, (first, last)
    assert rows[-1].global_accuracy() is None
    assert rows[1].metrics["fedlease_clusters"] == sim.method.M >= 2
    assert set(sim.method.assign) == set(range(5)) and sim.method.started == set(range(5))
    for r in rows[2:]:
        assert math.isfinite(r.metrics["agg_deviation"]) and r.metrics["agg_deviation"] > 0
