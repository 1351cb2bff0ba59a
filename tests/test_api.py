"""The Python API: the same runs, ids, store and messages as the command line, tables as DataFrames."""

import json

import pandas as pd
import pytest

import fedbench
from fedbench import api
from fedbench.callbacks import RunCallback
from fedbench.cli import main
from fedbench.errors import ConfigError
from fedbench.store import Store

# a tiny synthetic run: 4 clients, 2 rounds of 1 local step each
TINY = dict(dataset="synthetic", clients=5, rounds=2, local_steps=1, batch_size=32, method="fedavg", models="cnn1")


class Recorder(RunCallback):
    """Records the hooks' calls, and whether each round's rows were in the store when it was told."""

    def __init__(self):
        self.calls = []

    def on_run_start(self, run):
        self.calls.append(("start", run.run_id))

    def on_round_end(self, run, result):
        with _Reader(run.results) as store:
            stored = store.rounds(run.run_id)["round"].tolist()
        self.calls.append(("round", result.round, stored))

    def on_run_end(self, run, status, error):
        self.calls.append(("end", status, error))


class _Reader:
    def __init__(self, path):
        self.store = Store(path)

    def __enter__(self):
        return self.store

    def __exit__(self, *_):
        self.store.close()


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
    """A store with the tiny fedavg run under seeds 0 and 1, made through the API (seed 0 with a recorder)."""
    path = tmp_path_factory.mktemp("api") / "results.sqlite"
    rec = Recorder()
    first = fedbench.run(TINY, seed=0, results=path, callbacks=[rec])
    second = fedbench.run({**TINY, "seed": 1}, results=path)
    return path, first, second, rec


def test_run_result_is_the_store_and_the_cli_json(two_seeds, capsys):
    path, first, _, rec = two_seeds
    assert not first.reused and first.label == "fedavg" and first.config["seed"] == 0
    store = Store(path)
    try:
        pd.testing.assert_frame_equal(first.rounds, store.rounds(first.run_id))
        pd.testing.assert_frame_equal(first.client_rounds, store.client_rounds(first.run_id))
        pd.testing.assert_frame_equal(first.round_metrics, store.round_metrics(first.run_id))
    finally:
        store.close()
    assert len(first.rounds) == 2 and len(first.client_rounds) == 2 * 5
    assert first.costs["bytes_up"] == int(first.client_rounds["bytes_up"].sum())
    assert first.command.startswith("fedbench run --method fedavg")
    assert first.provenance["status"] == "complete" and first.provenance["versions"]["fedbench"]
    # the command line shows the stored run: same id, same summary, same config
    with pytest.raises(SystemExit) as e:
        main(["run", *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()], "--seed", "0",
              "--results", str(path), "--json"])
    assert e.value.code == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["run_id"] == first.run_id and shown["config"] == first.config
    assert {k: v for k, v in shown.items() if k not in ("run_id", "label", "config")} == first.summary
    again = fedbench.run(TINY, seed=0, results=path, say=lambda m: None)
    assert again.reused and again.run_id == first.run_id and again.summary == first.summary


def test_callbacks_see_each_round_after_it_is_stored(two_seeds):
    _, first, _, rec = two_seeds
    assert rec.calls == [("start", first.run_id), ("round", 1, [1]), ("round", 2, [1, 2]),
                         ("end", "complete", None)]


def test_results_filters_by_method_seed_setting_and_protocol(two_seeds):
    path, first, second, _ = two_seeds
    res = fedbench.open_results(path)
    assert set(res.runs()["run_id"]) == {first.run_id, second.run_id}
    rounds = res.rounds(seed=1)
    assert rounds["run_id"].unique().tolist() == [second.run_id] and rounds["round"].tolist() == [1, 2]
    assert list(rounds.columns[:7]) == list(api.RUN_COLUMNS)
    assert len(res.client_rounds(method="fedavg", seed=[0, 1])) == 2 * 2 * 5
    assert res.rounds(clients=5, protocol="yi")["run_id"].nunique() == 2
    assert res.rounds(clients=10).empty and res.rounds(method="fedkd").empty
    assert res.runs(sweep=None, method="fedavg")["run_id"].nunique() == 2  # None: no filter
    assert res.runs(lr=0.01)["run_id"].nunique() == 2  # a core option
    assert list(res.round_metrics(seed=0).columns) == [*api.RUN_COLUMNS, "round", "name", "value"]
    assert "acc_batch_mean" in set(res.client_metrics(seed=0)["name"])  # yi's batch-mean accuracy
    assert res.clients(seed=0)["client"].tolist() == [0, 1, 2, 3, 4]
    assert res.run(second.run_id).summary == second.summary
    summary = res.summary(seed=[0, 1])
    assert sorted(summary["seed"]) == [0, 1] and summary["accuracy"].between(0, 1).all()


def test_report_of_a_selection(two_seeds, tmp_path):
    path, first, _, _ = two_seeds
    rep = fedbench.open_results(path).report(tmp_path / "rep", seed=0)
    assert rep.runs == 1 and (tmp_path / "rep" / "report.html").is_file() and rep.figures
    assert pd.read_csv(tmp_path / "rep" / "runs.csv")["run_id"].tolist() == [first.run_id]
    assert "fairness" in rep.tables


BAD_API = [
    (lambda p: fedbench.run(TINY, method="fedlorra", results=p), "unknown method 'fedlorra'; choose from:",
     ["run", "--method", "fedlorra"]),
    (lambda p: fedbench.run(TINY, device="tpu", results=p), "unknown --device 'tpu'; choose from: auto, cpu, cuda",
     ["run", "--device", "tpu"]),
    (lambda p: fedbench.run(TINY, lr=-1.0, results=p), "--lr (run) must be", ["run", "--lr", "-1"]),
    (lambda p: fedbench.run(TINY, track=["neptune"], results=p), "unknown --track tracker 'neptune'",
     ["run", "--track", "neptune"]),
    (lambda p: api.report(p, seed=0, target=2.0), "--target must be a fraction in (0, 1], got 2.0",
     ["report", "--target", "2"]),
    (lambda p: fedbench.open_results(p.parent / "none.sqlite"), "does not exist",
     ["report", "--results", "none.sqlite"]),
    (lambda p: api.sweep(results=p), "give a sweep FILE or --axis/--base options", ["sweep"]),
    (lambda p: api.sweep({"axes": {"seeed": [0, 1]}}, base=TINY, results=p, dry_run=True),
     "unknown option 'seeed' in [axes] (did you mean seed?)", None),
]


@pytest.mark.parametrize("call,needle,cli", BAD_API)
def test_bad_input_raises_config_error_with_the_cli_line(two_seeds, tmp_path, capsys, monkeypatch, call, needle, cli):
    path = two_seeds[0]
    before = path.read_bytes()
    with pytest.raises(ConfigError) as e:
        call(path)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert path.read_bytes() == before
    if cli is None:
        return
    monkeypatch.chdir(tmp_path)
    args = [*cli] if cli[0] != "run" else [*cli, "--results", str(path)]
    if cli[0] == "report" and "--results" not in cli:
        args += ["--results", str(path)]
    with pytest.raises(SystemExit) as ex:
        main(args)
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_unknown_filter_names_the_closest(two_seeds):
    with pytest.raises(ConfigError, match=r"unknown filter 'sed'.*\(did you mean seed\?\)"):
        fedbench.open_results(two_seeds[0]).rounds(sed=0)
    with pytest.raises(ConfigError, match=r"no complete runs in .* for method 'fedkd'"):
        fedbench.open_results(two_seeds[0]).report("unused", method="fedkd")


def test_sweep_dry_run_plans_the_grid_ids(two_seeds, tmp_path):
    path, first, second, _ = two_seeds
    fresh = api.sweep({"sweep": {"name": "s"}, "base": TINY, "axes": {"seed": [0, 1, 2]}},
                           results=tmp_path / "new.sqlite", dry_run=True)
    assert fresh.jobs is None and [c.seed for c in fresh.configs] == [0, 1, 2]
    planned = api.sweep(None, base=TINY, axes={"seed": [0, 1, 2]}, results=path, dry_run=True)
    assert planned.run_ids[:2] == [first.run_id, second.run_id]
    assert [j.state for j in planned.jobs] == ["skipped", "skipped", "pending"]
    assert not (tmp_path / "new.sqlite").exists()


def test_import_fedbench_stays_light():
    import subprocess
    import sys
    code = "import sys, fedbench; print(sorted(m for m in ('torch', 'pandas', 'typer') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert fedbench.run is api.run and fedbench.open_results is api.open_results and fedbench.export is api.export


def test_a_failing_callback_stops_the_run_stored_as_failed(tmp_path):
    class Stop(Recorder):
        def on_round_end(self, run, result):
            raise RuntimeError("tracker down")

    class Late(Recorder):
        def on_run_start(self, run):
            raise RuntimeError("never started")

    rec, late = Stop(), Late()
    with pytest.raises(RuntimeError, match="tracker down"):
        fedbench.run(TINY, rounds=1, results=tmp_path / "r.sqlite", callbacks=[rec])
    (run_id,) = fedbench.open_results(tmp_path / "r.sqlite").runs(status="failed")["run_id"]
    assert rec.calls == [("start", run_id), ("end", "failed", "RuntimeError: tracker down")]
    with pytest.raises(RuntimeError, match="never started"):  # told of no end: it never started
        fedbench.run(TINY, rounds=1, results=tmp_path / "r.sqlite", callbacks=[rec, late])
    assert rec.calls[-1] == ("end", "failed", "RuntimeError: never started") and late.calls == []
