"""Summaries (spec §A.5) and cost to target (§A.6) pinned on hand-made stores: rows written through the
store's API with chosen correct/total counts, so every expected number is computed by hand below."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest

from fedbench.cli import main
from fedbench.config import make_config
from fedbench.errors import ConfigError
from fedbench.report.build import build_report
from fedbench.report.frame import add_names, run_frame
from fedbench.report.tables import accuracy_table, cost_table, fairness_table, summary_legend
from fedbench.store import Store
from fedbench.summary import (
    Summary,
    client_states,
    resolve,
    round_series,
    stored_summary,
    summarize_accuracy,
    worst_fraction_mean,
)


@dataclass
class Row:
    client: int
    selected: bool
    bytes_up: int = 0
    bytes_down: int = 0
    train_macs: int = 0
    eval_macs: int = 0
    train_samples: int = 0
    correct: int | None = None
    total: int | None = None
    metrics: dict = field(default_factory=dict)


@dataclass
class Round:
    round: int
    rows: list
    server_macs: int = 0
    wall_s: float = 1.0
    train_s: float = 0.5
    eval_s: float = 0.5
    evaluated: bool = True
    metrics: dict = field(default_factory=dict)

    def accuracy(self):
        return None, None  # the report never reads rounds.acc_mean / acc_weighted


def add_run(store: Store, run_id: str, rounds: list[Round], method: str = "standalone", protocol: str | None = None,
            seed: int = 0, **cfg_values) -> None:
    cfg = make_config({"method": method, "dataset": "synthetic", "clients": len(rounds[0].rows), "seed": seed,
                       **cfg_values}).to_dict()
    if protocol is not None:
        cfg["eval_protocol"] = protocol
    else:  # absent: a run stored before the key existed (round-end)
        cfg.pop("eval_protocol", None)
    fake = SimpleNamespace(method=method, dataset="synthetic", canonical_json=lambda: json.dumps(cfg, sort_keys=True))
    n = len(rounds[0].rows)
    clients = [{"client": k, "arch": "cnn1", "n_train": 10, "n_val": 5, "n_test": 10, "class_counts": {}}
               for k in range(n)]
    store.start_run(run_id, fake, method, "digest", "pdigest", {}, "cpu", f"fedbench run {run_id}", clients)
    for r in rounds:
        store.write_round(run_id, r)
    store.finish_run(run_id)


def frame(store, **kw):
    df, _ = run_frame(store, **kw)
    return add_names(df)


# --------------------------------------------------------------------------- yi: carry-forward mean

# 4 clients, 2 participants per round, each evaluated right after its training (yi):
#   round 1: c0 6/10, c1 8/10                       (c2, c3 never evaluated yet)
#   round 2: c2 5/10, c3 10/10                      (c0 carries 0.6, c1 carries 0.8)
#   round 3: c0 10/10, c2 7/10                      (c1 carries 0.8, c3 carries 1.0)
YI = {1: {0: (6, 10, 0.55), 1: (8, 10, 0.75)}, 2: {2: (5, 10, 0.45), 3: (10, 10, 1.0)},
      3: {0: (10, 10, 1.0), 2: (7, 10, 0.65)}}


def yi_rounds() -> list[Round]:
    out = []
    for t, ev in YI.items():
        rows = []
        for c in range(4):
            if c in ev:
                cor, tot, bm = ev[c]
                rows.append(Row(c, True, 100, 100, 10, correct=cor, total=tot, metrics={"acc_batch_mean": bm}))
            else:
                rows.append(Row(c, False, 0, 100))
        out.append(Round(t, rows))
    return out


def test_yi_carries_last_known_accuracy_and_counts_never_evaluated(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    add_run(store, "yi", yi_rounds(), protocol="yi")
    cr, cm = store.client_rounds("yi"), store.client_metrics("yi")
    series = round_series(client_states(cr, cm, "all"), "unweighted")
    per_round = [(0.6 + 0.8) / 2, (0.6 + 0.8 + 0.5 + 1.0) / 4, (1.0 + 0.8 + 0.7 + 1.0) / 4]
    assert series["accuracy"].tolist() == pytest.approx(per_round)
    assert series["never"].tolist() == [2, 0, 0] and series["defined"].tolist() == [2, 4, 4]
    # the yi convention: all clients with carry, mean of the last 10 rounds (here all 3), unweighted
    s, _, _ = summarize_accuracy(cr, cm, resolve("yi"))
    assert s["accuracy"] == pytest.approx(np.mean(per_round))
    assert (s["never_min"], s["never_max"], s["defined_min"], s["population_max"]) == (0, 2, 2, 4)
    # participants only: no carry
    sel, _, _ = summarize_accuracy(cr, cm, resolve("yi", population="selected"))
    assert sel["accuracy"] == pytest.approx(np.mean([0.7, 0.75, 0.85]))
    # the authors' batch-mean accuracy, carried the same way
    bm, _, _ = summarize_accuracy(cr, cm, resolve("yi", weighting="batch-mean", statistic="last"))
    assert bm["accuracy"] == pytest.approx((1.0 + 0.75 + 0.65 + 1.0) / 4)
    # fedbench run's printout reports the protocol's number with the never-evaluated count
    rep = stored_summary(store, "yi")["reported"]
    assert rep["accuracy"] == pytest.approx(np.mean(per_round)) and rep["defined"] == "2–4/4 (0–2 never evaluated)"
    assert "protocol yi" in rep["summary"] and "last known accuracy" in rep["summary"]


# --------------------------------------------------------------------------- pfllib: best round, weighted

# 2 clients, all evaluated every round (pfllib), c0 has 100 test samples and c1 10:
#   round 1: 80/100, 2/10   unweighted 0.5  weighted 82/110
#   round 2: 60/100, 10/10  unweighted 0.8  weighted 70/110
#   round 3: 70/100, 5/10   unweighted 0.6  weighted 75/110
# Bytes up per client vary by round (100, 1000, 10), so cumulative and average x rounds differ.
PF = {1: ((80, 100), (2, 10)), 2: ((60, 100), (10, 10)), 3: ((70, 100), (5, 10))}
UP = {1: 100, 2: 1000, 3: 10}
MACS = {1: 1e9, 2: 5e9, 3: 2e9}
SERVER = {1: 0, 2: 3e9, 3: 0}


def pf_rounds(scale: float = 1.0) -> list[Round]:
    return [Round(t, [Row(c, True, int(UP[t] * scale), 50, int(MACS[t] * scale), correct=cor, total=tot)
                      for c, (cor, tot) in enumerate(PF[t])], server_macs=int(SERVER[t] * scale))
            for t in PF]


def test_pfllib_reports_the_best_round_sample_weighted(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    add_run(store, "pf", pf_rounds(), protocol="pfllib")
    df = frame(store)
    r = df.iloc[0]
    assert r["accuracy"] == pytest.approx(82 / 110) and r["selected_rounds"] == [1]
    assert (r["population"], r["statistic"], r["weighting"]) == ("all", "best", "weighted")
    # the same run asked for round-end's convention: last 10 (3) rounds, unweighted
    df2 = frame(store, stat="last10", weighting="unweighted")
    assert df2.iloc[0]["accuracy"] == pytest.approx((0.5 + 0.8 + 0.6) / 3)
    t = accuracy_table(df)
    assert "Summary: protocol pfllib, all, best, weighted" in t.caption
    (legend,) = summary_legend(df)  # what the short name means, once per page
    assert legend.startswith("protocol pfllib, all, best, weighted: ")
    assert "sample-weighted" in legend and "best round" in legend
    assert t.rows[0][1].text == "protocol pfllib, all, best, weighted"


def test_rounds_to_target_follow_the_weighting(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    add_run(store, "pf", pf_rounds(), protocol="pfllib")
    w = frame(store, weighting="weighted", target=0.7).iloc[0]
    u = frame(store, weighting="unweighted", target=0.7).iloc[0]
    assert w["rounds_to_target"] == 1   # 82/110 = 0.745 at round 1
    assert u["rounds_to_target"] == 2   # unweighted: 0.5, then 0.8
    assert frame(store, weighting="unweighted", target=0.95).iloc[0]["rounds_to_target"] is None


def test_cost_to_target_is_the_cumulative_stored_cost(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    add_run(store, "pf", pf_rounds(), protocol="pfllib")
    r = frame(store, weighting="unweighted", target=0.7).iloc[0]
    # rounds 1 and 2, both clients: up 100 + 1000 each, down 50 + 50 each
    cumulative = 2 * (100 + 1000) + 2 * (50 + 50)
    average_x_rounds = (2 * (100 + 1000 + 10) + 2 * 3 * 50) / 3 * 2
    assert r["bytes_to_target"] == cumulative and cumulative != pytest.approx(average_x_rounds)
    assert r["client_tflop_to_target"] == pytest.approx(2 * 2 * (1e9 + 5e9) / 1e12)
    assert r["server_tflop_to_target"] == pytest.approx(2 * 3e9 / 1e12)
    assert r["bytes_round"] == pytest.approx((2 * (100 + 1000 + 10) + 2 * 3 * 50) / 3)


def test_cost_ratio_against_the_best_baseline_uses_cumulative_costs(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    add_run(store, "focus", pf_rounds(scale=0.5), method="fedlora", protocol="pfllib")
    add_run(store, "base", pf_rounds(), method="standalone", protocol="pfllib")
    # a worse baseline that never reaches the target: not the best-accuracy baseline, not in the ratio
    worse = [Round(t, [Row(c, True, 1, 1, 1, correct=1, total=10) for c in range(2)]) for t in (1, 2, 3)]
    add_run(store, "worse", worse, method="fml", protocol="pfllib")
    df = frame(store, weighting="unweighted", target=0.7)
    t = cost_table(df, 0.7, "fedlora")
    note = t.notes[0]
    assert "best-accuracy baseline standalone" in note
    base_bytes, mine_bytes = 2 * 1100 + 200, 2 * 550 + 200
    assert f"communication to target (per-round sends) {base_bytes / mine_bytes:.2f}× lower" in note
    assert "computation to target (client + server) 2.00× lower" in note
    fml = [row for row in t.rows if row[0].text == "fml"][0]
    assert fml[8].text == "not reached (1 seeds)" and fml[9].text == "not reached"


def test_no_cost_ratio_when_a_side_did_not_reach_the_target_in_every_seed(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    add_run(store, "focus", pf_rounds(scale=0.5), method="fedlora", protocol="pfllib")
    add_run(store, "base0", pf_rounds(), method="standalone", protocol="pfllib", seed=0)
    low = [Round(t, [Row(c, True, 1, 1, 1, correct=6, total=10) for c in range(2)]) for t in (1, 2, 3)]
    add_run(store, "base1", low, method="standalone", protocol="pfllib", seed=1)
    t = cost_table(frame(store, weighting="unweighted", target=0.7), 0.7, "fedlora")
    assert "no cost-to-target ratio" in t.notes[0] and "standalone in 1/2" in t.notes[0]
    base = [row for row in t.rows if row[0].text == "standalone"][0]
    assert "(1/2 seeds)" in base[8].text


# --------------------------------------------------------------------------- val-selected round

def test_val_statistic_picks_the_round_by_validation_not_test(tmp_path):
    # 1 client, round-end; test 0.4, 0.6, 0.8; validation 0.5, 0.9, 0.9 (tie: the earlier round, 2)
    test = {1: 4, 2: 6, 3: 8}
    val = {1: 5, 2: 9, 3: 9}
    rounds = [Round(t, [Row(0, True, correct=test[t], total=10,
                            metrics={"val_correct": val[t], "val_total": 10})]) for t in (1, 2, 3)]
    store = Store(tmp_path / "s.sqlite")
    add_run(store, "v", rounds)
    r = frame(store, stat="val").iloc[0]
    assert r["accuracy"] == pytest.approx(0.6) and r["selected_rounds"] == [2]
    assert frame(store, stat="best").iloc[0]["accuracy"] == pytest.approx(0.8)


def test_val_statistic_refused_for_a_run_without_validation_rows(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    add_run(store, "pf", pf_rounds(), protocol="pfllib")
    with pytest.raises(ConfigError, match="no validation rows"):
        run_frame(store, stat="val")


# --------------------------------------------------------------------------- fairness

@pytest.mark.parametrize("n,worst", [(10, 1), (30, 3), (50, 5)])
def test_worst_ten_percent_is_the_mean_of_the_lowest_ceil_tenth(tmp_path, n, worst):
    correct = [(7 * k) % n for k in range(n)]  # a permutation of 0..n-1, over n test samples each
    store = Store(tmp_path / "s.sqlite")
    add_run(store, "f", [Round(1, [Row(c, True, correct=correct[c], total=n) for c in range(n)])])
    r = frame(store).iloc[0]
    acc = np.arange(n) / n
    assert r["fair_worst10"] == pytest.approx(acc[:worst].mean())
    assert r["fair_min"] == 0.0 and r["fair_std"] == pytest.approx(acc.std())
    assert worst_fraction_mean(acc) == pytest.approx(acc[:math.ceil(n / 10)].mean())
    t = fairness_table(r.to_frame().T)
    assert t.rows[0][3].text == f"{100 * acc[:worst].mean():.2f}" and t.rows[0][5].text == f"{n}/{n}"


# --------------------------------------------------------------------------- undefined predictions

def test_undefined_predictions_are_counted_not_dropped(tmp_path):
    # FedProto-like: round 1 no client has prototypes (correct NULL, total set); round 2 one of two does
    rounds = [Round(1, [Row(0, True, total=10), Row(1, True, total=10)]),
              Round(2, [Row(0, True, correct=7, total=10), Row(1, True, total=10)])]
    store = Store(tmp_path / "s.sqlite")
    add_run(store, "p", rounds, method="fedproto")
    df = frame(store)
    r = df.iloc[0]
    assert r["accuracy"] == pytest.approx(0.7)  # mean of the last 10: round 1 has no defined accuracy
    assert (r["defined_min"], r["defined_max"], r["population_max"]) == (0, 1, 2)
    assert any("Defined predictions: fedproto" in n and "0–1/2" in n for n in accuracy_table(df).notes)
    assert fairness_table(df).rows[0][5].text == "0–1/2"
    last = frame(store, stat="last").iloc[0]
    assert (last["defined_min"], last["population_max"]) == (1, 2)


# --------------------------------------------------------------------------- protocols side by side

def test_runs_of_different_protocols_are_never_averaged(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    add_run(store, "yi", yi_rounds(), protocol="yi")
    pf4 = [Round(t, [Row(c, True, correct=5, total=10) for c in range(4)]) for t in (1, 2, 3)]
    add_run(store, "pf", pf4, protocol="pfllib")
    add_run(store, "old", pf4)  # no eval_protocol key: round-end
    df = frame(store)
    assert set(df["eval_protocol"]) == {"yi", "pfllib", "round-end"}
    t = accuracy_table(df)
    assert sorted(t.header[1:]) == ["eval_protocol=pfllib", "eval_protocol=round-end", "eval_protocol=yi"]
    assert all(c.text.endswith("(n = 1)") for c in t.rows[1][1:])  # one run per cell: nothing averaged
    summaries = {h: c.text for h, c in zip(t.header[1:], t.rows[0][1:], strict=True)}
    assert summaries["eval_protocol=yi"] == "protocol yi, all, last10, unweighted"
    assert summaries["eval_protocol=pfllib"] == "protocol pfllib, all, best, weighted"
    assert "Summaries differ by column" in t.caption
    # batch-mean asked of a store holding non-yi runs names the run's protocol; --protocol yi selects
    with pytest.raises(ConfigError, match="protocol 'pfllib'"):
        run_frame(store, weighting="batch-mean")
    assert len(frame(store, weighting="batch-mean", protocol="yi")) == 1


def test_batch_mean_refused_for_non_yi_runs():
    for p in ("pfllib", "round-end"):
        with pytest.raises(ConfigError, match=f"protocol '{p}'"):
            resolve(p, weighting="batch-mean")
    assert resolve("yi", weighting="batch-mean") == Summary("yi", "all", "last10", "batch-mean")


# --------------------------------------------------------------------------- the CLI

def _digest(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("flag,value,allowed", [
    ("--statistic", "median", "protocol, last, best, last10, val"),
    ("--population", "sampled", "protocol, all, selected"),
    ("--weighting", "pooled", "protocol, unweighted, weighted, batch-mean"),
    ("--protocol", "fedml", "yi, pfllib, round-end"),
])
def test_report_rejects_unknown_summary_options(tmp_path, capsys, flag, value, allowed):
    res = tmp_path / "s.sqlite"
    store = Store(res)
    add_run(store, "pf", pf_rounds(), protocol="pfllib")
    store.close()
    before = _digest(res)
    out = tmp_path / "rep"
    with pytest.raises(SystemExit) as e:
        main(["report", "--results", str(res), "--out", str(out), flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert f"unknown {flag} '{value}'; choose from: {allowed}" in err[0]
    assert _digest(res) == before and not out.exists()


def test_report_refuses_batch_mean_for_pfllib_in_one_line(tmp_path, capsys):
    res = tmp_path / "s.sqlite"
    store = Store(res)
    add_run(store, "pf", pf_rounds(), protocol="pfllib")
    store.close()
    out = tmp_path / "rep"
    with pytest.raises(SystemExit) as e:
        main(["report", "--results", str(res), "--out", str(out), "--weighting", "batch-mean"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "protocol 'pfllib'" in err[0] and not out.exists()


def test_report_writes_fairness_and_names_the_summary(tmp_path, capsys):
    store = Store(tmp_path / "s.sqlite")
    add_run(store, "yi", yi_rounds(), protocol="yi")
    add_run(store, "pf", pf_rounds(), protocol="pfllib")
    out = tmp_path / "rep"
    info = build_report(store, out, target=0.7, focus=None, command="fedbench report (test)")
    for name in ("accuracy", "fairness", "costs"):
        assert all((out / f"{name}.{ext}").exists() for ext in ("md", "html", "tex", "csv"))
    md = (out / "report.md").read_text()
    assert "protocol yi; population: all clients" in md and "protocol pfllib" in md
    assert "2–4/4 (0–2 never evaluated)" in (out / "fairness.md").read_text()
    assert "summary" in (out / "accuracy.csv").read_text()
    assert info["runs"] == 2


def test_line_panels_take_rows_concatenated_from_runs(tmp_path):
    """Per-run curves concatenated keep repeated index labels (0..n per run), and a round may have no defined
    accuracy (NaN: FedProto before prototypes under yi); the plot must not care."""
    import pandas as pd

    from fedbench.report.plots import _line_panels
    a = pd.DataFrame({"round": [1, 2, 3], "accuracy": [float("nan"), 0.2, 0.3], "variant": "x", "setting": "s",
                      "run_id": "a"})
    b = pd.DataFrame({"round": [1, 2], "accuracy": [0.2, 0.4], "variant": "y", "setting": "s", "run_id": "b"})
    c = pd.DataFrame({"round": [1, 2, 3], "accuracy": [0.3, 0.1, 0.2], "variant": "x", "setting": "s",
                      "run_id": "c"})
    (path,) = _line_panels(pd.concat([a, b, c]), "accuracy", "acc", tmp_path / "p.png")
    assert path.exists()


def test_a_field_stored_configs_leave_out_at_its_default_reads_as_the_default(tmp_path):
    """fused_sgd is a late field: a config at its default (False) does not store it. The setting names
    it False, beside the run that set it True (was: 'homogeneous', the federated-LoRA ranks' word)."""
    store = Store(tmp_path / "s.sqlite")
    rounds = [Round(1, [Row(c, True, correct=5, total=10) for c in range(2)])]
    add_run(store, "plain", rounds, protocol="round-end")
    add_run(store, "fused", rounds, protocol="round-end", fused_sgd=True)
    cfg = json.loads(store.db.execute("SELECT config_json FROM runs WHERE run_id='plain'").fetchone()[0])
    del cfg["fused_sgd"]  # as canonical_json stores it
    store.db.execute("UPDATE runs SET config_json=? WHERE run_id='plain'", (json.dumps(cfg),))
    store.db.commit()
    df = frame(store)
    assert sorted(df["setting"]) == ["fused_sgd=False", "fused_sgd=True"]


# --------------------------------------------------------------------------- summaries at their real length

# A round-end run of 16 rounds, evaluated in 14 of them (rounds 5 and 11 train only), so that "the last
# 10 evaluated rounds" is a window: rounds 6, 7, 8, 9, 10, 12, 13, 14, 15, 16. Two clients, c0 with 10
# test samples and c1 with 30, so the two weightings differ:
#   unweighted = (c0/10 + c1/30) / 2 = (3 c0 + c1) / 60        weighted = (c0 + c1) / 40
# Every round's value is distinct under both weightings; the unweighted best is round 2, the weighted
# best round 4, the validation best round 3: all three outside the last-10 window.
LONG_EVALUATED = [1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16]
LONG_TEST = {1: (4, 22), 2: (10, 18), 3: (1, 17), 4: (6, 29), 6: (6, 14), 7: (1, 5), 8: (4, 15), 9: (2, 13),
             10: (5, 6), 12: (8, 5), 13: (4, 10), 14: (1, 7), 15: (3, 21), 16: (1, 6)}
#                  round:  1   2   3   4   6   7   8   9  10  12  13  14  15  16
LONG_U60 = dict(zip(LONG_EVALUATED, [34, 48, 20, 47, 32, 8, 27, 19, 21, 29, 22, 10, 30, 9], strict=True))  # 3 c0 + c1
LONG_W40 = dict(zip(LONG_EVALUATED, [26, 28, 18, 35, 20, 6, 19, 15, 11, 13, 14, 8, 24, 7], strict=True))   # c0 + c1
# validation: c0 of 10, c1 of 20; round 3 (10/10, 20/20) is the only perfect one, every other round at most 13/30
LONG_VAL = {t: ((10, 20) if t == 3 else (1 + t % 5, 2 + t % 7)) for t in LONG_EVALUATED}
# the global model on the union of test splits, out of 100
LONG_GLOBAL = dict(zip(LONG_EVALUATED, [40, 71, 45, 52, 60, 38, 55, 47, 63, 50, 58, 44, 66, 49], strict=True))


def long_rounds() -> list[Round]:
    out = []
    for t in range(1, 17):
        if t not in LONG_TEST:
            out.append(Round(t, [Row(c, True, 10, 10, 1) for c in range(2)], evaluated=False))
            continue
        (a, b), (va, vb) = LONG_TEST[t], LONG_VAL[t]
        rows = [Row(0, True, 10, 10, 1, correct=a, total=10, metrics={"val_correct": va, "val_total": 10}),
                Row(1, True, 10, 10, 1, correct=b, total=30, metrics={"val_correct": vb, "val_total": 20})]
        out.append(Round(t, rows, metrics={"global_correct": LONG_GLOBAL[t], "global_total": 100}))
    return out


@pytest.fixture
def long_store(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    add_run(store, "long", long_rounds())
    return store


def test_long_store_round_series_has_the_hand_values(long_store):
    cr = long_store.client_rounds("long")
    states = client_states(cr, long_store.client_metrics("long"), "all")
    u, w = round_series(states, "unweighted"), round_series(states, "weighted")
    assert u.index.tolist() == LONG_EVALUATED  # rounds 5 and 11 evaluated nobody: no evaluation round
    assert u["accuracy"].tolist() == pytest.approx([LONG_U60[t] / 60 for t in LONG_EVALUATED])
    assert w["accuracy"].tolist() == pytest.approx([LONG_W40[t] / 40 for t in LONG_EVALUATED])


@pytest.mark.parametrize("stat,weighting,rounds,expected", [
    # the last 10 evaluated rounds, 6..16 without 11: (32+8+27+19+21+29+22+10+30+9)/60/10 = 207/600
    ("last10", "unweighted", [6, 7, 8, 9, 10, 12, 13, 14, 15, 16], 207 / 600),
    # (20+6+19+15+11+13+14+8+24+7)/40/10 = 137/400
    ("last10", "weighted", [6, 7, 8, 9, 10, 12, 13, 14, 15, 16], 137 / 400),
    ("last", "unweighted", [16], 9 / 60),
    ("last", "weighted", [16], 7 / 40),
    ("best", "unweighted", [2], 48 / 60),   # round 2: (30 + 18)/60, before the window
    ("best", "weighted", [4], 35 / 40),     # round 4: (6 + 29)/40, before the window
    # validation best at round 3 under both weightings: its test accuracy (3 + 17)/60 and (1 + 17)/40
    ("val", "unweighted", [3], 20 / 60),
    ("val", "weighted", [3], 18 / 40),
])
def test_each_statistic_on_a_store_of_fourteen_evaluated_rounds(long_store, stat, weighting, rounds, expected):
    s, _, _ = summarize_accuracy(long_store.client_rounds("long"), long_store.client_metrics("long"),
                                 Summary("round-end", "all", stat, weighting))
    assert s["rounds"] == rounds
    assert s["accuracy"] == pytest.approx(expected, rel=1e-12)


def test_fairness_is_averaged_over_the_last_ten_rounds_only(long_store):
    # per round, per client (in 30ths): c0 = 3 c0_correct, c1 = c1_correct; two clients: std = |c0 - c1| / 2,
    # worst 10 % = the lowest one = the minimum. Rounds 6..16 without 11:
    #   c0: 18  3 12  6 15 24 12  3  9  3       c1: 14  5 15 13  6  5 10  7 21  6
    #   |c0 - c1|: 4 2 3 7 9 19 2 4 12 3 (sum 65)    min: 14 3 12 6 6 5 10 3 9 3 (sum 71)
    r = frame(long_store).iloc[0]
    assert r["selected_rounds"] == [6, 7, 8, 9, 10, 12, 13, 14, 15, 16]
    assert r["fair_std"] == pytest.approx(65 / 30 / 2 / 10, rel=1e-12)
    assert r["fair_min"] == pytest.approx(71 / 30 / 10, rel=1e-12)
    assert r["fair_worst10"] == pytest.approx(71 / 30 / 10, rel=1e-12)


def test_run_summary_of_the_long_store(long_store):
    s = stored_summary(long_store, "long")
    assert s["rounds"] == 16 and s["evaluations"] == 14
    assert s["acc_last10_unweighted"] == pytest.approx(207 / 600, rel=1e-12)
    assert s["acc_last10_weighted"] == pytest.approx(137 / 400, rel=1e-12)
    assert s["acc_best_unweighted"] == pytest.approx(48 / 60) and s["acc_best_weighted"] == pytest.approx(35 / 40)
    assert s["acc_last_unweighted"] == pytest.approx(9 / 60) and s["acc_val_weighted"] == pytest.approx(18 / 40)
    # the global model: last 10 of its 14 evaluations, (60+38+55+47+63+50+58+44+66+49)/100/10
    assert s["acc_last10_global"] == pytest.approx(530 / 1000, rel=1e-12)
    assert s["acc_last_global"] == pytest.approx(0.49) and s["acc_best_global"] == pytest.approx(0.71)
    rep = s["reported"]  # round-end's convention: all clients, last 10, unweighted
    assert rep["accuracy"] == pytest.approx(207 / 600, rel=1e-12)
    assert rep["rounds"] == [6, 7, 8, 9, 10, 12, 13, 14, 15, 16]


# A yi run of 14 rounds, two clients taking turns: c0 trains and is evaluated in the odd rounds (of 10
# test samples), c1 in the even ones (of 20). Under population "all" the other client carries its last
# accuracy, so round 5 (the first of the last 10) carries c1's round-4 accuracy from before the window.
YI_C0 = {1: 3, 3: 7, 5: 5, 7: 9, 9: 2, 11: 7, 13: 9}
YI_C1 = {2: 10, 4: 16, 6: 5, 8: 13, 10: 18, 12: 7, 14: 15}
# all, unweighted, in 40ths: 2 c0_latest + c1_latest (round 1: c0 alone, 2 x 6/20 = 12/40)
#   round:  1   2   3   4   5   6   7   8   9  10  11  12  13  14
#           12 16  24  30  26  15  23  31  17  22  32  21  25  33
YI_ALL40 = [12, 16, 24, 30, 26, 15, 23, 31, 17, 22, 32, 21, 25, 33]
BATCH_MEAN_GAP = 0.05  # each stored batch-mean accuracy sits this far below the client's accuracy


def yi_long_rounds() -> list[Round]:
    out = []
    for t in range(1, 15):
        c, cor, tot = (0, YI_C0[t], 10) if t % 2 else (1, YI_C1[t], 20)
        rows = [Row(k, False, 0, 10) for k in range(2)]
        rows[c] = Row(c, True, 10, 10, 1, correct=cor, total=tot, metrics={"acc_batch_mean": cor / tot - BATCH_MEAN_GAP})
        out.append(Round(t, rows))
    return out


def test_yi_last_ten_carries_a_client_from_before_the_window(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    add_run(store, "yi", yi_long_rounds(), protocol="yi")
    cr, cm = store.client_rounds("yi"), store.client_metrics("yi")
    series = round_series(client_states(cr, cm, "all"), "unweighted")
    assert series["accuracy"].tolist() == pytest.approx([v / 40 for v in YI_ALL40])
    window = list(range(5, 15))
    s, _, _ = summarize_accuracy(cr, cm, resolve("yi"))
    # (26+15+23+31+17+22+32+21+25+33)/40/10
    assert s["rounds"] == window and s["accuracy"] == pytest.approx(245 / 400, rel=1e-12)
    # the authors' batch-mean accuracy: every stored value 0.05 below the accuracy, carried the same way
    bm, _, _ = summarize_accuracy(cr, cm, resolve("yi", weighting="batch-mean"))
    assert bm["accuracy"] == pytest.approx(245 / 400 - BATCH_MEAN_GAP, rel=1e-12)
    # participants only, no carry, in 20ths: rounds 5..14 are 10 5 18 13 4 18 14 7 18 15 (sum 122)
    sel, _, _ = summarize_accuracy(cr, cm, resolve("yi", population="selected"))
    assert sel["rounds"] == window and sel["accuracy"] == pytest.approx(122 / 200, rel=1e-12)
