"""LG-FedAvg, FD, FedProto and FedGH (spec C.4, C.5, C.6, C.9): payloads, losses, server rules, costs.

Runs are tiny synthetic ones (5 clients, batch 32) shared between tests through a module-level cache.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import make_sim, own_class_guess, small_config

from baselines.fd import FD, aggregate_logits, fd_loss
from baselines.fedgh import FedGH
from baselines.fedproto import FedProto, aggregate_protos, fedproto_loss
from baselines.lg_fedavg import LGFedAvg
from fedbench.metering.comm import payload_bytes
from fedbench.methods.base import Upload, snapshot
from fedbench.models.cnn import CNN_WIDTHS, REP_DIM
from fedbench.registry import get_method

K = 10  # synthetic dataset
F32, I64 = 4, 8
ID = 1  # a class id on the wire: uint8 for K <= 256 (class_id_dtype)

# method -> (config options, rounds of the shared run)
RUNS = {
    "lg-fedavg": (dict(fraction=0.6), 2),  # 3 of 5 clients a round: the head still goes to all 5
    "fd": (dict(), 2),
    "fedproto": (dict(fraction=0.6), 2),   # 3 of 5 a round: the prototypes still go to all 5
    "fedgh": (dict(fraction=0.6), 2),
}
_cache: dict = {}


def simulate(method: str, rounds: int, **kw):
    sim = make_sim(small_config(method=method, rounds=rounds, **kw))
    return sim, [sim.run_round(t) for t in range(1, rounds + 1)]


def shared(method: str):
    if method not in _cache:
        kw, rounds = RUNS[method]
        _cache[method] = simulate(method, rounds, **kw)
    return _cache[method]


def seen(sim, k: int) -> int:
    return len(sim.clients[k].classes)


def union(sim, ids) -> int:
    return len(torch.unique(torch.cat([sim.clients[k].classes for k in ids])))


def selected(r) -> list[int]:
    return [row.client for row in r.rows if row.selected]


# --- registration --------------------------------------------------------------------------------

def test_entry_points_resolve_to_the_classes():
    assert get_method("lg-fedavg") is LGFedAvg
    assert get_method("fd") is FD
    assert get_method("fedproto") is FedProto
    assert get_method("fedgh") is FedGH
    for cls in (LGFedAvg, FD, FedProto, FedGH):
        assert cls.heterogeneous
    assert LGFedAvg.push == FedGH.push == FedProto.push == "all"
    # a shared option name keeps one python type
    lam = {f.name: f.type for f in dataclasses.fields(FD.Params)}["lam"]
    assert lam == {f.name: f.type for f in dataclasses.fields(FedProto.Params)}["lam"]


# --- 1. payloads: shapes and exact bytes (spec C.1) ----------------------------------------------

def test_lg_fedavg_payload_head_up_from_participants_down_to_all():
    sim, results = shared("lg-fedavg")
    head = (REP_DIM * K + K) * F32
    for t, r in enumerate(results, 1):
        sel = selected(r)
        assert len(sel) == 3
        for row in r.rows:
            assert row.bytes_up == (head if row.selected else 0)
            # round 1: the initial head before training, then the aggregate; to every client
            assert row.bytes_down == (2 * head if t == 1 else head)
    assert sim.broadcast["weight"].shape == (K, REP_DIM) and sim.broadcast["bias"].shape == (K,)


def test_lg_fedavg_initial_head_written_into_every_client_before_round_1():
    sim = make_sim(small_config(method="lg-fedavg", rounds=1, fraction=0.6))
    init = {k: v.clone() for k, v in sim.broadcast.items()}  # server_init's broadcast
    own = [snapshot(c.module("model").fc3) for c in sim.clients]
    assert all(torch.equal(init[k], own[0][k]) for k in init)  # HtFLlib: client 0's initial head
    assert any(not torch.equal(init["weight"], o["weight"]) for o in own[1:])  # others start elsewhere
    at_train, first = {}, {}
    orig_update, orig_receive = sim.method.client_update, sim.method.receive

    def update_spy(client, b):
        at_train[client.id] = snapshot(client.module("model").fc3)
        return orig_update(client, b)

    def receive_spy(client, head):
        orig_receive(client, head)
        first.setdefault(client.id, snapshot(client.module("model").fc3))

    sim.method.client_update, sim.method.receive = update_spy, receive_spy
    r = sim.run_round(1)
    assert set(first) == {c.id for c in sim.clients}  # every client, selected or not
    for got in [*first.values(), *at_train.values()]:
        assert all(torch.equal(got[k], init[k]) for k in init)  # participants train from it
    assert set(at_train) == set(selected(r)) and len(at_train) == 3


def test_fd_payload_per_class_logits_with_class_ids():
    sim, (r1, r2) = shared("fd")
    for r in (r1, r2):
        for row in r.rows:
            s = seen(sim, row.client)
            assert row.bytes_up == s * K * F32 + s * ID
    m = union(sim, selected(r1))
    for row in r1.rows:
        assert row.bytes_down == 0  # nothing to distil from before the first aggregation
    for row in r2.rows:
        assert row.bytes_down == m * K * F32 + m * ID
    b = sim.broadcast
    assert b["logits"].shape == (union(sim, selected(r2)), K) and b["classes"].dtype == torch.uint8


def test_fd_exclude_self_broadcast_is_sums_and_counts():
    ups = [{"classes": torch.tensor([0, 2]), "logits": torch.randn(2, 3)},
           {"classes": torch.tensor([2]), "logits": torch.randn(1, 3)}]
    b = aggregate_logits(ups, 3, sums_only=True)
    assert payload_bytes(b) == 2 * 3 * F32 + 2 * I64 + 2 * ID  # sums, counts (int64), class ids


def test_fedproto_payload_prototypes_up_from_participants_down_to_all():
    sim, results = shared("fedproto")
    for r in results:
        m = union(sim, selected(r))  # this round's aggregate, sent to every client after aggregation
        assert any(not row.selected for row in r.rows)
        for row in r.rows:
            s = seen(sim, row.client)
            assert row.bytes_up == (s * REP_DIM * F32 + s * ID if row.selected else 0)
            assert row.bytes_down == m * REP_DIM * F32 + m * ID
    assert sim.broadcast["protos"].shape == (union(sim, selected(results[-1])), REP_DIM)


def test_fedgh_payload_prototypes_up_header_down_to_all():
    sim, (r1, r2) = shared("fedgh")
    header = (REP_DIM * K + K) * F32
    for r in (r1, r2):
        for row in r.rows:
            s = seen(sim, row.client)
            assert row.bytes_up == (s * REP_DIM * F32 + s * ID if row.selected else 0)
    assert any(not row.selected for row in r1.rows)
    for row in r1.rows:
        assert row.bytes_down == 2 * header  # initial header before round 1, trained header after it
    for row in r2.rows:
        assert row.bytes_down == header


# --- 2. local losses by hand ---------------------------------------------------------------------

def _log_softmax(v):
    z = math.log(sum(math.exp(a) for a in v))
    return [a - z for a in v]


def test_fd_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 2])
    table = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    has = torch.tensor([True, False, False])  # class 2 has no global logit: contributes 0
    lam, T = 0.5, 2.0
    ce = -(_log_softmax([2, 0, 1])[0] + _log_softmax([0, 1, 0])[2]) / 2
    logp = _log_softmax([0.5, 0.0, 0.0])
    logq = _log_softmax([1.0, 0.0, 0.5])
    kl0 = sum(math.exp(a) * (a - b) for a, b in zip(logp, logq, strict=True))
    expected = ce + lam * (kl0 + 0.0) / 2
    assert fd_loss(logits, y, table, has, lam, T).item() == pytest.approx(expected, rel=1e-6)
    assert fd_loss(logits, y, None, None, lam, T).item() == pytest.approx(ce, rel=1e-6)


def test_fedproto_loss_by_hand():
    logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    h = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)
    y = torch.tensor([0, 1])
    protos = torch.tensor([[0.0, 2.0, 5.0], [7.0, 7.0, 7.0], [0.0, 0.0, 0.0]])
    has = torch.tensor([True, False, True])  # sample 1's class has no prototype: 0 in the MSE
    lam = 2.0
    ce = -(_log_softmax([1, 0, 0])[0] + _log_softmax([0, 0, 3])[1]) / 2
    mse = ((1 - 0) ** 2 + 0 + (3 - 5) ** 2 + 0 + 0 + 0) / 6  # mean over batch x dim
    loss = fedproto_loss(logits, h, y, protos, has, lam)
    assert loss.item() == pytest.approx(ce + lam * mse, rel=1e-6)
    loss.backward()
    assert torch.all(h.grad[1] == 0)  # no pull on the sample without a prototype


# --- 3. server rules on hand-made uploads --------------------------------------------------------

def _ups(*payloads, weights=None):
    weights = weights or [1 / len(payloads)] * len(payloads)
    return [Upload(k, w, p) for k, (w, p) in enumerate(zip(weights, payloads, strict=True))]


def test_fedproto_server_uniform_and_count_weighted_means():
    a = {"classes": torch.tensor([0, 2]), "protos": torch.tensor([[1.0, 1.0], [2.0, 2.0]]),
         "counts": torch.tensor([10, 30])}
    b = {"classes": torch.tensor([2, 3]), "protos": torch.tensor([[4.0, 4.0], [6.0, 6.0]]),
         "counts": torch.tensor([10, 5])}
    run = SimpleNamespace(num_classes=4)
    uni = FedProto(FedProto.Params(), run).server_update(None, _ups(a, b, weights=[0.9, 0.1]))
    assert uni["classes"].tolist() == [0, 2, 3]  # class 1: nobody holds it, no prototype
    assert torch.allclose(uni["protos"], torch.tensor([[1.0, 1.0], [3.0, 3.0], [6.0, 6.0]]))
    cnt = FedProto(FedProto.Params(proto_weight="count"), run).server_update(None, _ups(a, b))
    assert torch.allclose(cnt["protos"][1], torch.tensor([2.5, 2.5]))  # (30*2 + 10*4) / 40
    assert torch.allclose(aggregate_protos([a, b], 4, "count")["protos"], cnt["protos"])


def test_fd_server_unweighted_mean_and_exclude_self():
    a = {"classes": torch.tensor([0, 1]), "logits": torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])}
    b = {"classes": torch.tensor([1]), "logits": torch.tensor([[0.0, 4.0, 2.0]])}
    run = SimpleNamespace(num_classes=3)
    g = FD(FD.Params(), run).server_update(None, _ups(a, b, weights=[0.9, 0.1]))
    assert g["classes"].tolist() == [0, 1]
    assert torch.allclose(g["logits"], torch.tensor([[1.0, 0.0, 0.0], [0.0, 3.0, 1.0]]))

    fd = FD(FD.Params(fd_exclude_self=True), run)
    fd.last_up = {0: (1, a), 1: (1, b)}  # both uploaded in round 1
    bc = fd.server_update(None, _ups(a, b))
    table, has = fd.targets(SimpleNamespace(id=0, round=2), bc)
    assert has.tolist() == [False, True, False]  # class 0 is client 0's alone
    assert torch.allclose(table[1], b["logits"][0])  # only the other client's logits
    table, has = fd.targets(SimpleNamespace(id=1, round=2), bc)
    assert has.tolist() == [True, True, False]
    assert torch.allclose(table[1], a["logits"][1])
    # a client that did not take part in the round behind the broadcast removes nothing
    table, has = fd.targets(SimpleNamespace(id=0, round=3), bc)
    assert torch.allclose(table[1], torch.tensor([0.0, 3.0, 1.0]))


def test_server_rules_read_class_ids_in_the_wire_dtype():
    """Ids arrive as uint8 (K <= 256); used as an index unconverted, uint8 would be a boolean mask."""
    a = {"classes": torch.tensor([0, 2]), "protos": torch.tensor([[1.0, 1.0], [2.0, 2.0]]),
         "logits": torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]]), "counts": torch.tensor([1, 3])}
    b = {"classes": torch.tensor([2, 3]), "protos": torch.tensor([[4.0, 4.0], [6.0, 6.0]]),
         "logits": torch.tensor([[0.0, 0.0, 4.0, 0.0], [0.0, 0.0, 0.0, 6.0]]), "counts": torch.tensor([1, 1])}
    wire = [{**u, "classes": u["classes"].to(torch.uint8)} for u in (a, b)]
    for weight in ("uniform", "count"):
        want, got = aggregate_protos([a, b], 4, weight), aggregate_protos(wire, 4, weight)
        assert got["classes"].dtype == torch.uint8 and got["classes"].tolist() == [0, 2, 3]
        assert torch.equal(got["protos"], want["protos"])
    got, want = aggregate_logits(wire, 4), aggregate_logits([a, b], 4)
    assert got["classes"].tolist() == [0, 2, 3] and torch.equal(got["logits"], want["logits"])
    assert torch.equal(got["logits"][1], torch.tensor([0.0, 0.0, 3.0, 0.0]))


def test_lg_fedavg_server_weighted_mean_of_heads():
    h1 = {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}
    h2 = {"weight": 5 * torch.ones(2, 3), "bias": 4 * torch.ones(2)}
    g = LGFedAvg(LGFedAvg.Params(), SimpleNamespace(num_classes=2)).server_update(
        None, _ups(h1, h2, weights=[0.25, 0.75]))
    assert torch.allclose(g["weight"], torch.full((2, 3), 4.0))
    assert torch.allclose(g["bias"], torch.full((2,), 3.0))


def test_fedgh_server_step_matches_hand_computed_sgd():
    sim = make_sim(small_config(method="fedgh", rounds=1))
    header = sim.server.module("header")
    W0, b0 = header.weight.detach().clone(), header.bias.detach().clone()
    gen = torch.Generator().manual_seed(0)
    P = torch.rand(4, REP_DIM, generator=gen)
    labels = torch.tensor([0, 3, 3, 7])
    ups = _ups({"classes": labels[:2], "protos": P[:2]}, {"classes": labels[2:], "protos": P[2:]})
    out = sim.method.server_update(sim.server, ups)  # 4 pairs < batch 32: one step

    S = torch.softmax(P @ W0.T + b0, dim=1)
    G = (S - F.one_hot(labels, K).float()) / 4  # d mean-CE / d logits
    gW, gb = G.T @ P, G.sum(0)
    assert torch.cat([gW.flatten(), gb]).norm() < sim.cfg.clip  # the clip does not act
    lr, wd = 0.01, sim.cfg.weight_decay  # fresh optimiser: momentum buffer = first gradient
    assert torch.allclose(out["weight"], W0 - lr * (gW + wd * W0), atol=1e-6)
    assert torch.allclose(out["bias"], b0 - lr * (gb + wd * b0), atol=1e-6)

    # more server epochs keep lowering CE on the uploaded prototypes
    before = F.cross_entropy(P @ out["weight"].T + out["bias"], labels).item()
    sim.method.hp = dataclasses.replace(sim.method.hp, server_epochs=20, server_lr=0.1)
    out = sim.method.server_update(sim.server, ups)
    assert F.cross_entropy(P @ out["weight"].T + out["bias"], labels).item() < before


# --- 4. determinism and a smoke run --------------------------------------------------------------

@pytest.mark.parametrize("method", list(RUNS))
def test_same_seed_same_metrics(method):
    _, ref = shared(method)
    kw, rounds = RUNS[method]
    sim = make_sim(small_config(method=method, rounds=rounds, **kw))
    for t in (1, 2):
        r = sim.run_round(t)
        assert r.rows == ref[t - 1].rows
        assert r.server_macs == ref[t - 1].server_macs


@pytest.mark.parametrize("method", list(RUNS))
def test_smoke_learns_beyond_guessing_own_classes(method):
    sim, results = simulate(method, 3)  # every client every round
    acc, _ = results[-1].accuracy()
    guess = own_class_guess(sim)  # ~0.5 under the 2-class split: chance 1/10 is no bar
    assert acc is not None and acc >= guess + 0.2, (method, acc, guess)


# --- 5. FedProto evaluation ----------------------------------------------------------------------

def test_fedproto_undefined_before_prototypes():
    sim = make_sim(small_config(method="fedproto", rounds=1, fraction=0.6, eval_initial=True,
                                eval_protocol="round-end"))
    for c in sim.clients:  # before the first aggregation nobody holds a prototype: undefined, not 0
        assert sim.evaluate(c) == (None, c.sizes["test"])
    r1 = sim.run_round(1)
    assert all("initial_accuracy" not in row.metrics for row in r1.rows)  # undefined is not stored as 0
    assert all(row.correct is not None for row in r1.rows)  # after round 1's aggregation: every client
    head = make_sim(small_config(method="fedproto", rounds=1, eval_initial=True, proto_infer="head"))
    assert all("initial_accuracy" in row.metrics for row in head.run_round(1).rows)
    # yi evaluates right after local training, before round 1's aggregation: no prototype exists yet
    yi = make_sim(small_config(method="fedproto", rounds=1, fraction=0.6, eval_protocol="yi")).run_round(1)
    assert all(row.correct is None and (row.total is not None) == row.selected for row in yi.rows)


def test_fedproto_every_client_predicts_and_trains_with_the_latest_prototypes(monkeypatch):
    import baselines.fedproto as fedproto_mod
    from baselines.fedproto import dense
    sim = make_sim(small_config(method="fedproto", rounds=2, fraction=0.6, eval_protocol="round-end"))
    broadcasts, used = [], []
    orig_server, orig_loss = sim.method.server_update, fedproto_mod.fedproto_loss

    def server_spy(server, ups):
        broadcasts.append(orig_server(server, ups))
        return broadcasts[-1]

    def loss_spy(logits, h, y, protos, has, lam):
        used.append((sim.server.round, protos, has))
        return orig_loss(logits, h, y, protos, has, lam)

    sim.method.server_update = server_spy
    monkeypatch.setattr(fedproto_mod, "fedproto_loss", loss_spy)
    ever_selected: set[int] = set()
    for t in (1, 2):
        r = sim.run_round(t)
        ever_selected |= set(selected(r))
        table, mask = dense(broadcasts[-1]["classes"], broadcasts[-1]["protos"], K)
        for c in sim.clients:  # selected or not: the prototypes held are this round's aggregate
            held, held_mask = sim.method.held[c.id]
            assert torch.equal(held, table) and torch.equal(held_mask, mask)
        never = [c for c in sim.clients if c.id not in ever_selected]
        if t == 1:
            assert never  # some client has not trained yet ...
        for c in never:  # ... and still predicts: the nearest of round t's prototypes
            assert r.rows[c.id].correct is not None
            x = sim.data.transform.eval(sim.data.images[sim.data.index["test"][c.id][:16]])
            with torch.no_grad():
                h = c.module("model").features(x)
                pred = sim.method.predict(c, x).argmax(1)
            d = torch.cdist(h, table)
            d[:, ~mask] = float("inf")
            assert torch.equal(pred, d.argmin(1))
    # participants train with the prototypes they hold: none in round 1, round 1's aggregate in round 2
    assert {t for t, _, _ in used} == {1, 2}
    t1 = dense(broadcasts[0]["classes"], broadcasts[0]["protos"], K)
    for t, protos, has in used:
        if t == 1:
            assert protos is None and has is None
        else:
            assert torch.equal(protos, t1[0]) and torch.equal(has, t1[1])


def test_fedproto_nearest_prototype_is_argmin_distance():
    sim, _ = shared("fedproto")
    c = sim.clients[0]
    x = sim.data.transform.eval(sim.data.images[sim.data.index["test"][0][:16]])
    protos, mask = sim.method.held[0]
    with torch.no_grad():
        h = c.module("model").features(x)
        pred = sim.method.predict(c, x).argmax(1)
    d = torch.cdist(h, protos)
    d[:, ~mask] = float("inf")
    assert torch.equal(pred, d.argmin(1))


def test_fedproto_head_inference_count_weights_after_collection():
    sim, (r1,) = simulate("fedproto", 1, proto_infer="head", proto_weight="count", proto_collect="after")
    for row in r1.rows:
        assert row.correct is not None  # the head is defined from the start
        s = seen(sim, row.client)
        assert row.bytes_up == s * REP_DIM * F32 + s * ID + s * I64  # + class counts (int64)
        assert row.train_samples == sim.clients[row.client].n_train  # the collection pass does not train
    assert "infer=head" in FedProto.label(sim.method.hp)


def test_fedproto_count_weights_are_the_clients_class_counts():
    """n_{k,c} is the client's training samples of class c, whatever the local schedule (with
    --local-steps a pass sees neither every sample nor each the same number of times)."""
    for kw in (dict(epochs=2), dict(epochs=2, local_steps=3), dict(proto_collect="after", local_steps=3)):
        sim = make_sim(small_config(method="fedproto", rounds=1, proto_weight="count", **kw))
        ups = []
        orig = sim.method.server_update
        sim.method.server_update = lambda server, u, orig=orig, ups=ups: (ups.extend(u), orig(server, u))[1]
        sim.run_round(1)
        for u in ups:
            c = sim.clients[u.client]
            ids = u.payload["classes"].long()
            assert torch.equal(ids, c.classes)
            assert torch.equal(u.payload["counts"], c.label_counts[ids]), kw


# --- 6. FedGH costs ------------------------------------------------------------------------------

def _features_macs(arch: str) -> int:
    """Per-sample multiply-adds of conv1..fc2 (5x5 kernels, no padding, 2x2 pooling)."""
    c1, c2, f1 = CNN_WIDTHS[arch]
    return 28 * 28 * c1 * 3 * 25 + 10 * 10 * c2 * c1 * 25 + c2 * 25 * f1 + f1 * REP_DIM


def test_fedgh_server_and_prototype_flops():
    sim, results = shared("fedgh")
    _, lg = shared("lg-fedavg")  # same seed and sampling, same CE training, no prototype pass
    for r, r_lg in zip(results, lg, strict=True):
        pairs = sum(seen(sim, k) for k in selected(r))
        assert r.server_macs > 0
        assert r.server_macs == 2 * pairs * REP_DIM * K  # header forward + weight gradient, 1 epoch
        assert r_lg.server_macs == 0
        for row, row_lg in zip(r.rows, r_lg.rows, strict=True):
            assert row.selected == row_lg.selected
            extra = sim.clients[row.client].n_train * _features_macs(sim.clients[row.client].arch)
            assert row.train_macs == row_lg.train_macs + (extra if row.selected else 0)
