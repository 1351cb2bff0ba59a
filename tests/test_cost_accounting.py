"""One-time sends kept apart from per-round traffic: the engine marks them (``bytes_down_once``), the store
keeps them (older stores gain the column, NULL: not recorded), the report leaves them out of every
per-round figure and of the bytes to target and shows them in their own column."""

from __future__ import annotations

import math
import sqlite3
from dataclasses import dataclass

import numpy as np
import pytest
from conftest import make_sim, small_config
from test_summaries import Round, add_run, frame
from test_summaries import Row as SummariesRow

from fedbench.report.plots import _zero_axis
from fedbench.report.tables import ONCE_UNKNOWN, cost_table
from fedbench.store import SCHEMA, Store

K = 10
HEAD = (500 * K + K) * 4  # LG-FedAvg's fc3 (500 -> K, with bias), fp32


def test_initial_push_is_marked_one_time():
    sim = make_sim(small_config(method="lg-fedavg", rounds=2))
    r1, r2 = sim.run_round(1), sim.run_round(2)
    for row in r1.rows:  # the initial head to every client, then the aggregated head to every client
        assert row.bytes_down_once == HEAD
        assert row.bytes_down == 2 * HEAD
    assert all(row.bytes_down_once == 0 and row.bytes_down == HEAD for row in r2.rows)


def test_selected_push_has_no_one_time_send():
    res = make_sim(small_config(method="fedlora", rank=2, fraction=0.6)).run_round(1)
    assert all(row.bytes_down_once == 0 for row in res.rows)
    assert sum(row.bytes_down > 0 for row in res.rows) == 3


@dataclass
class Row(SummariesRow):  # with the one-time bytes
    bytes_down_once: int = 0


def rounds_of(n: int) -> list[Round]:
    """2 clients, both train every round: 10 B up and 100 B down each per round, plus 1000 B down once each
    in round 1; client 0 gets 5/10 right in round 1, then 8/10; client 1 always 6/10."""
    out = []
    for t in range(1, n + 1):
        once = 1000 if t == 1 else 0
        out.append(Round(t, [Row(0, True, 10, 100 + once, correct=5 if t == 1 else 8, total=10, bytes_down_once=once),
                             Row(1, True, 10, 100 + once, correct=6, total=10, bytes_down_once=once)]))
    return out


def test_per_round_figures_leave_one_time_out_whatever_the_length(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    add_run(store, "short", rounds_of(2), method="lg-fedavg", protocol="round-end", seed=0)
    add_run(store, "long", rounds_of(6), method="lg-fedavg", protocol="round-end", seed=1)
    df = frame(store, target=0.7, stat="last")
    for _, r in df.iterrows():
        assert r["bytes_down_round"] == 200 and r["bytes_up_round"] == 20  # 2 clients x 100 / x 10
        assert r["bytes_once"] == 2000
        # the mean reaches 0.7 in round 2 ((0.8 + 0.6) / 2): rounds 1-2 of per-round traffic, 2 x 220
        assert r["rounds_to_target"] == 2 and r["bytes_to_target"] == 440
        assert r["down_to"] == "every client"
    from fedbench.summary import stored_summary
    for rid, n in (("short", 2), ("long", 6)):  # the run summary `fedbench run` prints
        summ = stored_summary(store, rid)
        assert summ["bytes_down_per_round"] == 200 and summ["bytes_once"] == 2000
        assert summ["bytes_down"] == 2000 + 200 * n
    t = cost_table(df, 0.7)
    row = t.rows[0]
    assert [c.text for c in row[2:6]] == ["every client", "2.00 kB", "20 B", "200 B"]
    assert "One-time bytes" in t.caption


def _old_store(path) -> None:
    """A store as fedbench wrote it before bytes_down_once existed, with one client row."""
    db = sqlite3.connect(path)
    db.executescript("\n".join(ln for ln in SCHEMA.splitlines() if "bytes_down_once" not in ln))
    db.execute("INSERT INTO client_rounds VALUES ('old', 1, 0, 1, 10, 100, 0, 0, 0, 5, 10)")
    db.commit()
    db.close()


def test_old_store_opens_with_the_column_added_as_not_recorded(tmp_path):
    path = tmp_path / "old.sqlite"
    _old_store(path)
    store = Store(path)
    cr = store.client_rounds("old")
    assert "bytes_down_once" in cr and cr["bytes_down_once"].isna().all()
    assert cr["bytes_down"].tolist() == [100]  # nothing else changed
    Store(path).close()  # opening again: nothing to add
    # a run stored before: one-time bytes unknown, said so in the table
    add_run(store, "new", rounds_of(2), method="lg-fedavg", protocol="round-end")
    store.db.execute("UPDATE client_rounds SET bytes_down_once = NULL WHERE run_id = 'new'")
    df = frame(store, stat="last")
    assert math.isnan(df.loc[df["run_id"] == "new", "bytes_once"].iloc[0])
    assert df.loc[df["run_id"] == "new", "bytes_down_round"].iloc[0] == (2 * 1100 + 2 * 100) / 2
    assert cost_table(df, None).rows[0][3].text == ONCE_UNKNOWN


def test_zero_cost_points_stay_on_the_log_axis():
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    note = _zero_axis(ax, np.array([0.0, 1e3, 1e6]))
    assert ax.get_xscale() == "symlog" and ax.get_xlim()[0] == -500 and "0: none" in note
    fig2, ax2 = plt.subplots()
    assert _zero_axis(ax2, np.array([1e3, 1e6])) == "" and ax2.get_xscale() == "log"
    plt.close(fig)
    plt.close(fig2)


@pytest.mark.parametrize("n", [2, 6])
def test_cumulative_bytes_include_the_one_time_send(tmp_path, n):
    from fedbench.report.frame import run_frame
    store = Store(tmp_path / "s.sqlite")
    add_run(store, "r", rounds_of(n), method="lg-fedavg", protocol="round-end")
    _, curves = run_frame(store, stat="last")
    c = curves["r"]
    assert c["cum_bytes"].tolist() == [2000 + 220 * t for t in range(1, n + 1)]


def test_warm_up_rounds_are_one_time():
    import pandas as pd

    from fedbench.registry import get_method
    from fedbench.report.frame import per_round_costs
    # 4 rounds, 1 client: rounds 1-2 a warm-up (5 B up each, 1e12 MACs each), rounds 3-4 federated (30 B up,
    # 40 B down, 3e12 MACs, server 1e12 MACs each)
    cr = pd.DataFrame({"round": [1, 2, 3, 4], "client": 0, "bytes_up": [5, 5, 30, 30], "bytes_down": [0, 0, 40, 40],
                       "bytes_down_once": [0, 0, 0, 0], "train_macs": [1e12, 1e12, 3e12, 3e12]})
    rounds = pd.DataFrame({"round": [1, 2, 3, 4], "server_macs": [0, 0, 1e12, 1e12]})
    got = per_round_costs(cr, rounds, 4, 2)
    assert got["bytes_up_round"] == 30 and got["bytes_down_round"] == 40  # over rounds 3-4, not 1-4
    assert got["client_tflop_round"] == 6 and got["server_tflop_round"] == 2  # 2 FLOP per MAC
    assert got["warmup_tflop"] == 4 and got["warmup_rounds"] == 2 and got["bytes_once"] == 10
    assert per_round_costs(cr, rounds, 4, 0)["bytes_up_round"] == 70 / 4
    fedlease = get_method("fedlease")
    assert fedlease.warmup_rounds(fedlease.Params(fedlease_warmup=3)) == 3
    assert get_method("fedit").warmup_rounds(get_method("fedit").Params()) == 0
