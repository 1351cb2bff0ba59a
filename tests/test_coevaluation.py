"""Co-evaluation: one training evaluated under several protocols, each stored as the run of its own.

The oracle is the definition: the rows a co-evaluated protocol gets are exactly those of a run made
under that protocol alone (every field but the wall-clock times), for every method, with validation
and batch-mean metrics, sequential and batched local training. A sweep with an eval_protocol axis
then trains once per training key and stores the same rows, ids and events as one that does not."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest
import torch
from conftest import TINY_BASE, make_sim, small_config

from fedbench.config import sibling_config, training_key
from fedbench.engine.simulation import Simulation, check_also_protocols
from fedbench.errors import ConfigError
from fedbench.runner import prepare, simulate

# in the default suite: a view (FedLoRA), push = all (FedProto), a global model (FedAvg); the rest nightly
MHPFL = ["fedlora", "fedproto", "fedavg"] + [pytest.param(m, marks=pytest.mark.slow)
                                             for m in ("standalone", "lg-fedavg", "fd", "fml", "fedkd", "fedgh")]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def _rows(r):
    """Everything a stored round holds but its times."""
    return ([(x.client, x.selected, x.bytes_up, x.bytes_down, x.train_macs, x.eval_macs, x.train_samples,
              x.correct, x.total, sorted(x.metrics.items())) for x in r.rows],
            r.round, r.server_macs, r.evaluated, sorted(r.metrics.items()))


def _cfg(method, protocol, **kw):
    base = dict(method=method, eval_protocol=protocol, clients=5, fraction=0.6, rounds=2, eval_val=True,
                eval_batch_size=7)
    if method == "fedavg":
        base["models"] = "cnn1"
    base.update(kw)
    return small_config(**base)


@pytest.mark.parametrize("method", MHPFL)
def test_coevaluated_rows_are_those_of_each_protocol_alone(method):
    alone = {p: [_rows(r) for r in make_sim(_cfg(method, p)).run()] for p in ("yi", "pfllib", "round-end")}
    cfg = _cfg(method, "yi")
    sim = Simulation(cfg, make_sim(cfg).data, torch.device("cpu"), also_protocols=("pfllib", "round-end"))
    assert sim.protocols == ("yi", "pfllib", "round-end")
    res = sim.run()
    assert [_rows(r) for r in res] == alone["yi"]
    for p in ("pfllib", "round-end"):
        assert [_rows(r.also[p]) for r in res] == alone[p], p
    # the protocols differ somewhere, or the oracle would be empty: yi evaluates only the participants
    assert alone["yi"] != alone["round-end"]
    assert any("acc_batch_mean" in dict(m) for r in alone["yi"] for *_, m in r[0])


def test_the_runs_own_protocol_may_be_any_of_them():
    """pfllib's run co-evaluating yi: same rows as yi's run co-evaluating pfllib, the other way round."""
    a = make_sim(_cfg("lg-fedavg", "yi"))
    cfg = _cfg("lg-fedavg", "pfllib")
    res_a = Simulation(a.cfg, a.data, torch.device("cpu"), also_protocols=("pfllib",)).run()
    res_b = Simulation(cfg, a.data, torch.device("cpu"), also_protocols=("yi", "pfllib")).run()
    assert [_rows(r) for r in res_a] == [_rows(r.also["yi"]) for r in res_b]
    assert [_rows(r.also["pfllib"]) for r in res_a] == [_rows(r) for r in res_b]
    assert all(set(r.also) == {"yi"} for r in res_b)  # the run's own protocol named again: dropped


@pytest.mark.parametrize("batching", ["on", "off"])
def test_federated_lora_yi_beside_round_end_batched_and_not(batching):
    from test_lora_family import lora_config
    kw = dict(clients=5, fraction=0.4, rounds=2, eval_every=1)
    alone = {}
    for p in ("yi", "round-end"):
        cfg = lora_config("fedit", eval_protocol=p, **kw)
        pp = prepare(cfg, None, "cpu")
        alone[p] = [_rows(r) for r in Simulation(cfg, pp.data, pp.device, prefetch=False, backbone=pp.backbone,
                                                 client_batching=batching).run()]
    cfg = lora_config("fedit", eval_protocol="round-end", **kw)
    pp = prepare(cfg, None, "cpu")
    sim = Simulation(cfg, pp.data, pp.device, prefetch=False, backbone=pp.backbone, client_batching=batching,
                     also_protocols=("yi",))
    res = sim.run()
    assert [_rows(r) for r in res] == alone["round-end"]
    assert [_rows(r.also["yi"]) for r in res] == alone["yi"]
    # pfllib is refused for the family, co-evaluated as much as alone
    with pytest.raises(ConfigError, match="pfllib"):
        check_also_protocols(cfg, ("pfllib",))


def test_times_split_so_that_one_protocol_is_the_plain_round():
    cfg = _cfg("standalone", "yi")
    sim = Simulation(cfg, make_sim(cfg).data, torch.device("cpu"), also_protocols=("round-end",))
    r = sim.run_round(1)
    for x in (r, r.also["round-end"]):
        assert x.train_s > 0 and x.eval_s > 0
        assert x.wall_s == pytest.approx(x.train_s + x.eval_s)
    assert r.train_s == r.also["round-end"].train_s  # one training, shared


def test_sibling_config_and_training_key():
    cfg = _cfg("fedlora", "yi")
    sib = sibling_config(cfg, "pfllib")
    assert sib.eval_protocol == "pfllib" and training_key(sib) == training_key(cfg)
    assert sib.run_hash("d") != cfg.run_hash("d")
    assert training_key(_cfg("fedlora", "yi", seed=1)) != training_key(cfg)
    assert sibling_config(cfg, "round-end").canonical_json() == _cfg("fedlora", "round-end").canonical_json()
    with pytest.raises(ConfigError, match="'best'"):
        sibling_config(cfg, "best")


def test_simulate_records_each_protocol_as_its_run():
    cfg = _cfg("fedgh", "yi", rounds=2)
    p = prepare(cfg, None, "cpu")
    rec = simulate(p, also_protocols=("pfllib",))
    (sib,) = rec.also
    assert sib.cfg.eval_protocol == "pfllib" and sib.run_id == sibling_config(cfg, "pfllib").run_hash(p.identity_digest)
    assert len(sib.rounds) == len(rec.rounds) == 2
    assert rec.versions["execution"]["co_evaluated"] == ["yi", "pfllib"]
    header = rec.header()
    assert header.rounds == [] and header.also[0].rounds == [] and len(sib.rounds) == 2


GRID = TINY_BASE + 'fraction = 0.6\n[axes]\nmethod = ["standalone", "fedgh"]\n' \
    'eval_protocol = ["yi", "pfllib", "round-end"]\n'


def _store(path):
    db = sqlite3.connect(path)
    out = {}
    for table, cols in (("client_rounds", "*"), ("client_metrics", "*"), ("round_metrics", "*"),
                        ("rounds", "run_id, round, server_macs, evaluated, acc_mean, acc_weighted")):
        out[table] = sorted(db.execute(f"SELECT {cols} FROM {table}").fetchall(), key=repr)
    runs = db.execute("SELECT run_id, status, config_json, command, versions_json FROM runs").fetchall()
    events = db.execute("SELECT run_id, event, detail FROM claim_log ORDER BY rowid").fetchall()
    claims = db.execute("SELECT COUNT(*) FROM claims").fetchone()[0]
    db.close()
    return out, runs, events, claims


def test_sweep_trains_once_per_training_and_stores_what_separate_runs_store(tmp_path):
    grid = tmp_path / "g.toml"
    grid.write_text(GRID)
    stores = {}
    for flag in ("--co-evaluate", "--no-co-evaluate"):
        res = tmp_path / f"{flag}.sqlite"
        r = subprocess.run([sys.executable, "-m", "fedbench", "sweep", str(grid), "--results", str(res), flag,
                            "--threads", "1"], capture_output=True, text=True, env=ENV, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        stores[flag] = (_store(res), r.stderr)
    (co, co_runs, co_events, co_claims), co_err = stores["--co-evaluate"]
    (sep, sep_runs, sep_events, _), sep_err = stores["--no-co-evaluate"]
    assert "6 to run, 2 trainings" in co_err and "trainings" not in sep_err
    assert co == sep  # every stored row identical (the times aside)
    assert sorted((r[0], r[1], r[2], r[3]) for r in co_runs) == sorted((r[0], r[1], r[2], r[3]) for r in sep_runs)
    assert {r[1] for r in co_runs} == {"complete"} and len(co_runs) == 6 and co_claims == 0
    shared = [json.loads(r[4])["execution"].get("co_evaluated") for r in co_runs]
    assert shared == [["yi", "pfllib", "round-end"]] * 6
    # two workers: each co-evaluated run says on which other run's training it was evaluated
    started = [d for _, e, d in co_events if e == "started"]
    assert sum("co-evaluated with" in d for d in started) == 4 and len(started) == 6
    assert all(e != "started" or "co-evaluated" not in d for _, e, d in sep_events)


def test_sweep_co_evaluates_only_what_is_left(tmp_path):
    """A run already complete in the store is skipped; its siblings still share one training."""
    res = tmp_path / "r.sqlite"
    one = subprocess.run([sys.executable, "-m", "fedbench", "run", "--dataset", "synthetic", "--clients", "5",
                          "--rounds", "2", "--batch-size", "128", "--fraction", "0.6", "--method", "standalone",
                          "--eval-protocol", "pfllib", "--results", str(res), "--quiet"],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    grid = tmp_path / "g.toml"
    grid.write_text(TINY_BASE + 'fraction = 0.6\nmethod = "standalone"\n[axes]\n'
                    'eval_protocol = ["yi", "pfllib", "round-end"]\n')
    r = subprocess.run([sys.executable, "-m", "fedbench", "sweep", str(grid), "--results", str(res)],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1 already complete, 2 to run, 1 trainings" in r.stderr
    _, runs, events, _ = _store(res)
    assert {s for _, s, *_ in runs} == {"complete"} and len(runs) == 3
    started = [d for _, e, d in events if e == "started"]  # the sweep's: one worker for the two runs left
    assert len(started) == 2 and sum("co-evaluated with" in d for d in started) == 1
