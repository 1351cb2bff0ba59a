"""Evaluation protocols (--eval-protocol yi | pfllib | round-end): who is evaluated, when, with which model.

A probe method records the state a client is in whenever the engine asks it for a prediction, so the
moment of each protocol is pinned exactly; real methods then show that training is the same under
every protocol and only the measurement moves."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

from fedbench.config import RunConfig, config_from_dict, make_config
from fedbench.errors import ConfigError
from fedbench.methods.base import Method, load, snapshot
from fedbench.registry import register_method
from tests.conftest import make_sim, small_config


@register_method("probe-protocol")
class Probe(Method):
    """Each client's 'state' is a label: trained in round t -> ('trained', t); pushed -> ('pushed', t);
    the pfllib view -> ('viewed', t). ``predict`` logs (client, state) and predicts class 0."""

    push = "all"
    calls: list = []

    @dataclass
    class Params:
        pass

    def setup(self, server, clients):
        self.state = {c.id: ("init", 0) for c in clients}

    def client_update(self, client, broadcast):
        self.state[client.id] = ("trained", client.round)
        return torch.zeros(1)

    def server_update(self, server, uploads):
        return torch.full((1,), float(server.round))

    def receive(self, client, payload):
        self.state[client.id] = ("pushed", int(payload))

    def predict(self, client, x):
        Probe.calls.append((client.round, client.id, self.state[client.id]))
        return torch.zeros(x.shape[0], self.run.num_classes)


@register_method("probe-protocol-selected")
class ProbeSelected(Probe):
    push = "selected"

    def view(self, client, payload):
        self.state[client.id] = ("viewed", int(payload))


def _calls(method, protocol, **kw):
    Probe.calls = []
    cfg = small_config(method=method, eval_protocol=protocol, clients=5, fraction=0.4, rounds=3, **kw)
    sim = make_sim(cfg)
    res = sim.run()
    return Probe.calls, res, sim


def test_yi_evaluates_participants_right_after_training():
    calls, res, _ = _calls("probe-protocol", "yi")
    for r in res:
        sel = {row.client for row in r.rows if row.selected}
        evaluated = {row.client for row in r.rows if row.total is not None}
        assert evaluated == sel and len(sel) == 2
        assert {(c, s) for t, c, s in calls if t == r.round} == {(c, ("trained", r.round)) for c in sel}


def test_round_end_evaluates_everyone_after_the_push():
    calls, res, _ = _calls("probe-protocol", "round-end")
    for r in res:
        assert all(row.total is not None for row in r.rows)
        assert {s for t, _, s in calls if t == r.round} == {("pushed", r.round)}


def test_pfllib_evaluates_everyone_through_the_view_of_the_new_broadcast():
    calls, res, sim = _calls("probe-protocol-selected", "pfllib")
    for r in res:
        assert all(row.total is not None for row in r.rows)
        assert {s for t, _, s in calls if t == r.round} == {("viewed", r.round)}
        assert sum(row.bytes_down for row in r.rows) == 0 or all(  # the view is not communication
            row.bytes_down == 0 for row in r.rows if not row.selected)
    # round-end on the same method: no view, the clients as they stand (trained, or never touched)
    calls, res, _ = _calls("probe-protocol-selected", "round-end")
    assert ("viewed", 1) not in {s for _, _, s in calls}


def _training_trace(res, sim):
    rows = [(r.round, x.client, x.selected, x.bytes_up, x.bytes_down, x.train_macs, x.train_samples)
            for r in res for x in r.rows]
    params = {c.id: {k: v.clone() for k, v in c.module("model").state_dict().items()} for c in sim.clients}
    return rows, params, [r.server_macs for r in res]


@pytest.mark.parametrize("method", ["fedlora", "lg-fedavg", "fedproto"])
def test_training_is_the_same_under_every_protocol(method):
    traces = {}
    for protocol in ("yi", "pfllib", "round-end"):
        sim = make_sim(small_config(method=method, eval_protocol=protocol, clients=5, fraction=0.6, rounds=3))
        res = sim.run()
        traces[protocol] = _training_trace(res, sim)
    (rows, params, server), *others = traces.values()
    for o_rows, o_params, o_server in others:
        assert o_rows == rows and o_server == server
        for cid in params:
            for k in params[cid]:
                assert torch.equal(params[cid][k], o_params[cid][k]), (cid, k)


def test_pfllib_scores_fedlora_with_the_global_adapter_and_restores_the_client():
    cfg = small_config(method="fedlora", eval_protocol="pfllib", clients=5, fraction=0.4, rounds=2)
    sim = make_sim(cfg)
    sim.run_round(1)
    before = {c.id: snapshot(c.module("adapter")) for c in sim.clients}
    r = sim.run_round(2)
    for c in sim.clients:  # the view left no trace: each client keeps its own (trained or old) adapter
        after = snapshot(c.module("adapter"))
        if not r.rows[c.id].selected:
            assert all(torch.equal(before[c.id][k], after[k]) for k in after)
    # each client's stored accuracy is that of its model with the server's adapter installed
    for c in sim.clients:
        own = snapshot(c.module("adapter"))
        load(c.module("adapter"), snapshot(sim.server.module("adapter")))
        correct, total = sim.evaluator.client(sim.method, c)
        load(c.module("adapter"), own)
        assert (correct, total) == (r.rows[c.id].correct, r.rows[c.id].total)
    # and differs from round-end's (the client's own adapter) for some client
    own_scores = [sim.evaluator.client(sim.method, c)[0] for c in sim.clients]
    assert own_scores != [row.correct for row in r.rows]


def test_eval_val_and_batch_mean_are_stored():
    cfg = small_config(method="standalone", eval_protocol="yi", eval_val=True, eval_batch_size=7, rounds=1)
    sim = make_sim(cfg)
    r = sim.run_round(1)
    for row in r.rows:
        c = sim.clients[row.client]
        assert row.metrics["val_total"] == c.sizes["val"] > 0
        assert 0 <= row.metrics["val_correct"] <= c.sizes["val"]
        # batch-mean by hand: the mean over test batches of 7 of the batch accuracy
        idx = sim.data.index["test"][c.id]
        accs = []
        for s in range(0, len(idx), 7):
            b = idx[s:s + 7]
            with torch.no_grad():
                logits = sim.method.predict(c, sim.data.transform.eval(sim.data.images[b]))
            accs.append(float((logits.argmax(1) == sim.data.labels[b]).float().mean()))
        assert row.metrics["acc_batch_mean"] == pytest.approx(sum(accs) / len(accs), abs=1e-6)
    # not under the other protocols
    r = make_sim(small_config(method="standalone", eval_protocol="round-end", rounds=1)).run_round(1)
    assert all("acc_batch_mean" not in row.metrics and "val_total" not in row.metrics for row in r.rows)


def test_protocol_is_part_of_the_run_identity_and_legacy_ids_are_kept():
    base = dict(dataset="synthetic", clients=5, rounds=2, method="fedlora")
    ids = {p: make_config({**base, "eval_protocol": p}).run_hash("d") for p in ("yi", "pfllib", "round-end")}
    assert len(set(ids.values())) == 3
    legacy = json.loads(make_config({**base, "eval_protocol": "round-end"}).canonical_json())
    assert "eval_protocol" not in legacy  # runs stored before protocols had names keep their ids
    assert make_config(base).eval_protocol == "yi"  # auto: the MHPFL family's published protocol
    assert make_config({**base, "method": "fedit", "dataset": "synthetic"}).eval_protocol == "round-end"
    stored = make_config({**base, "eval_protocol": "round-end"}).to_dict()
    del stored["eval_protocol"]  # a config stored before protocols
    assert config_from_dict(stored).eval_protocol == "round-end"
    assert RunConfig(method="fedlora").protocol == "yi"


@pytest.mark.parametrize("values,needle", [
    ({"eval_protocol": "best"}, "--eval-protocol"),
    ({"eval_protocol": "pfllib", "method": "fedit"}, "pfllib"),
    ({"eval_val": True, "val_fraction": 0.0}, "--eval-val"),
])
def test_bad_protocol_options_are_one_line_errors(values, needle):
    with pytest.raises(ConfigError) as e:
        make_config({"dataset": "synthetic", "method": "fedlora", **values})
    assert needle in str(e.value) and "\n" not in str(e.value)
