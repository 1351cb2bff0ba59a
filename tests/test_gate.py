"""`fedbench compare`, the nightly's regression gate: a store against a reference report's seed band."""

import shutil
import sqlite3

import pandas as pd
import pytest

from fedbench.cli import main
from fedbench.report.gate import compare

SUMMARY = {"statistic": "last", "population": "all", "weighting": "unweighted"}


def _rows(method, rank, accs, seeds=None):
    seeds = seeds if seeds is not None else range(len(accs))
    return [{"method": method, "hp_rank": rank, "lr": 0.01, "seed": s, "accuracy": a, **SUMMARY,
             "variant": f"{method} (rank={rank})", "setting": "clients=10"} for s, a in zip(seeds, accs, strict=True)]


def test_band_is_min_max_over_seeds_widened_by_the_tolerance():
    ref = pd.DataFrame(_rows("a", 2, [0.80, 0.84]) + _rows("b", 2, [0.50]))
    # band of a: [0.80 - 0.01, 0.84 + 0.01] = [0.79, 0.85]; of b (one seed): [0.49, 0.51]
    cases = {  # candidate accuracies of cell a over its seeds -> their mean, and the verdict
        "within (mean 0.795)": ([0.78, 0.81], False),
        "below (mean 0.785)": ([0.77, 0.80], True),
        "above (mean 0.86)": ([0.86], True),
        "one seed inside the band, the other a seed never seen: mean 0.82": ([0.80, 0.84], False),
    }
    for what, (accs, offends) in cases.items():
        cand = pd.DataFrame(_rows("a", 2, accs, seeds=[7, 8][:len(accs)]) + _rows("b", 2, [0.505])
                            + _rows("a", 4, [0.1]))  # rank 4: a cell the reference lacks
        checks, unjudged = compare(ref, cand, tolerance=0.01)
        a, b = checks
        assert a.low == pytest.approx(0.79) and a.high == pytest.approx(0.85) and a.reference_seeds == 2
        assert a.value == pytest.approx(sum(accs) / len(accs)) and a.candidate_seeds == len(accs)
        assert a.offends is offends, what
        assert (b.low, b.high) == (pytest.approx(0.49), pytest.approx(0.51)) and not b.offends
        assert unjudged == 1
    checks, _ = compare(ref, pd.DataFrame(_rows("a", 2, [0.8])), tolerance=0.01)
    assert checks[1].value is None and checks[1].offends and "no complete run" in checks[1].line()
    assert "below the reference band [79.00, 85.00] %" in compare(ref, pd.DataFrame(_rows("a", 2, [0.7])), 0.01)[0][0].line()


TINY = ["--dataset", "synthetic", "--clients", "5", "--rounds", "2", "--batch-size", "64", "--quiet",
        "--device", "cpu"]
RUNS = [["--method", "standalone", "--seed", "0"], ["--method", "standalone", "--seed", "1"],
        ["--method", "fedavg", "--models", "cnn1", "--seed", "0"], ["--method", "fedavg", "--models", "cnn1", "--seed", "1"]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A store of two methods x two seeds and its report (the committed reference of a nightly)."""
    d = tmp_path_factory.mktemp("gate")
    store = d / "ref.sqlite"
    for args in RUNS:
        with pytest.raises(SystemExit) as e:
            main(["run", *args, *TINY, "--results", str(store)])
        assert e.value.code == 0
    with pytest.raises(SystemExit) as e:
        main(["report", "--results", str(store), "--out", str(d / "report"), "--statistic", "last"])
    assert e.value.code == 0
    return store, d / "report" / "runs.csv"


def _gate(capsys, *args) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as e:
        main(["compare", *map(str, args)])
    return e.value.code, capsys.readouterr().out.splitlines()


def test_gate_passes_on_the_reference_store(capsys, reference):
    store, runs_csv = reference
    code, lines = _gate(capsys, runs_csv, "--results", store)
    assert code == 0 and lines == [lines[-1]]
    assert lines[-1].startswith("compare: 0 of 2 reference cells outside the band")
    code, _ = _gate(capsys, runs_csv.parent, "--runs", runs_csv)  # a report folder and a runs.csv work too
    assert code == 0


def test_gate_fails_on_a_store_with_a_degraded_method(capsys, reference, tmp_path):
    store, runs_csv = reference
    ref = pd.read_csv(runs_csv)
    fedavg = ref.loc[ref["method"] == "fedavg", "accuracy"]
    assert fedavg.min() > 0.1  # so that halving every correct count leaves the band of 2 points
    degraded = tmp_path / "degraded.sqlite"
    shutil.copy(store, degraded)
    with sqlite3.connect(degraded) as db:  # FedAvg now gets half as many test samples right
        db.execute("UPDATE client_rounds SET correct = correct / 2 WHERE run_id IN "
                   "(SELECT run_id FROM runs WHERE method = 'fedavg')")
    code, lines = _gate(capsys, runs_csv, "--results", degraded)
    assert code == 1
    offending = [ln for ln in lines if ln.startswith("outside: ")]
    assert len(offending) == 1 and offending[0].startswith("outside: fedavg") and " is below the reference band" \
        in offending[0], lines
    assert lines[-1].startswith("compare: 1 of 2 reference cells outside the band")
    code, _ = _gate(capsys, runs_csv, "--results", degraded, "--tolerance", "0.6")  # a band wide enough
    assert code == 0


@pytest.mark.parametrize("args,needle", [
    (["--runs", "R", "--results", "S"], "give the candidate as --results STORE or as --runs RUNS.CSV"),
    ([], "give the candidate as --results STORE or as --runs RUNS.CSV"),
    (["--results", "nowhere.sqlite"], "--results nowhere.sqlite does not exist"),
    (["--runs", "R", "--tolerance", "-1"], "--tolerance must be >= 0, got -1.0"),
])
def test_gate_bad_input_one_line_exit2(capsys, reference, args, needle):
    _, runs_csv = reference
    args = [str(runs_csv) if a == "R" else a for a in args]
    with pytest.raises(SystemExit) as e:
        main(["compare", str(runs_csv), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_gate_refuses_a_missing_reference(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["compare", str(tmp_path / "none.csv"), "--runs", str(tmp_path / "none.csv")])
    assert e.value.code == 2
    assert "does not exist" in capsys.readouterr().err
