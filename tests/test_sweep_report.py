"""Sweeps (resumable, killable) and reports."""

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib

import pytest

from fedbench.cli import main
from fedbench.errors import ConfigError
from fedbench.sweep import parse_sweep

GRID = """
[sweep]
name = "kill-test"
[base]
dataset = "synthetic"
clients = 5
rounds = 2
batch_size = 128
[axes]
method = ["fedlora", "standalone"]
seed = [0, 1, 2, 3, 4, 5]
[[exclude]]
method = "standalone"
seed = [4, 5]
[[include]]
method = "fedavg"
models = "cnn5"
seed = 0
[[include]]
method = "fedavg"
models = "cnn5"
seed = 1
"""


def _db(path):
    return sqlite3.connect(path)


def test_grid_expansion_and_merging():
    doc = {"base": {"dataset": "synthetic", "clients": 5}, "axes": {"method": ["fedlora", "standalone"],
                                                                    "rank": [2, 8], "seed": [0, 1]},
           "exclude": [{"method": "fedlora", "rank": 8, "seed": [1]}]}
    sw = parse_sweep(doc)
    # fedlora: 2 ranks x 2 seeds - 1 excluded = 3; standalone: rank does not apply -> 2 seeds
    assert len(sw.configs) == 5 and sw.dropped == 2
    paired = parse_sweep({"base": {"dataset": "synthetic"}, "axes": {"clients,fraction": [[10, 1.0], [20, 0.5]]}})
    assert [(c.clients, c.fraction) for c in paired.configs] == [(10, 1.0), (20, 0.5)]


@pytest.mark.parametrize("doc,needle", [
    ({"axes": {"rnak": [1]}}, "unknown option 'rnak' in [axes] (did you mean rank?)"),
    ({"axes": {"seed": []}}, "axis 'seed' is empty"),
    ({"axes": {"seed": 3}}, "axis 'seed' must be a list"),
    ({"axes": {"method": ["fedlorra"]}}, "unknown method 'fedlorra'"),
    ({"base": {"rounds": "many"}}, "--rounds (run) must be an integer, got 'many'"),
    ({"grid": {}}, "unknown section [grid]"),
    ({"axes": {"clients,fraction": [[10]]}}, "paired axis"),
])
def test_bad_sweeps(doc, needle):
    with pytest.raises(ConfigError) as e:
        parse_sweep(doc)
    assert needle in str(e.value)


def test_bad_sweep_file_exits_2_before_any_run(tmp_path, capsys):
    f = tmp_path / "bad.toml"
    f.write_text('[base]\ndataset = "synthetic"\n[axes]\nmethod = ["fedlora", "nosuch"]\n')
    res = tmp_path / "r.sqlite"
    with pytest.raises(SystemExit) as e:
        main(["sweep", str(f), "--results", str(res)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown method 'nosuch'" in err[0]
    assert not res.exists()
    f.write_text("[axes\n")
    with pytest.raises(SystemExit) as e:
        main(["sweep", str(f), "--results", str(res)])
    assert e.value.code == 2 and "not valid TOML" in capsys.readouterr().err


def test_only_keeps_a_slice_of_the_grid_with_its_ids(tmp_path, capsys):
    from fedbench.sweep import select
    sw = parse_sweep(tomllib.loads(GRID))
    part = select(sw, {"seed": [1, 4], "method": ["fedlora", "fedavg"]})
    assert [(c.method, c.seed) for c in part.configs] == [("fedlora", 1), ("fedlora", 4), ("fedavg", 1)]
    assert all(any(c.canonical_json() == w.canonical_json() for w in sw.configs) for c in part.configs)
    # a method option matches only where the method has it; includes are selected like product points
    assert [c.method for c in select(sw, {"models": ["cnn5"]}).configs] == ["fedavg", "fedavg"]
    assert {c.method for c in select(sw, {"rank": [8]}).configs} == {"fedlora"}
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID)
    res = tmp_path / "r.sqlite"
    with pytest.raises(SystemExit) as e:
        main(["sweep", str(grid), "--results", str(res), "--only", "seed=4,5", "--dry-run"])
    assert e.value.code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("2 runs") and all("--seed 4" in x or "--seed 5" in x for x in lines[:-1])
    for bad, needle in ((["--only", "sed=1"], "unknown option 'sed' (did you mean seed?)"),
                        (["--only", "seed=99"], "no run of sweep 'kill-test' has seed=99"),
                        (["--only", "seed"], "--only 'seed': expected KEY=V1,V2")):
        with pytest.raises(SystemExit) as e:
            main(["sweep", str(grid), "--results", str(res), *bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and needle in err[0], err
    assert not res.exists()


def test_sweep_killed_with_sigkill_resumes_without_rerun(tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID)
    res = tmp_path / "r.sqlite"
    cmd = [sys.executable, "-m", "fedbench", "sweep", str(grid), "--results", str(res), "--jobs", "2"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # fedlora 6 seeds + standalone 4 seeds + fedavg (cnn5) 2 seeds
    dry = subprocess.run(cmd + ["--dry-run"], capture_output=True, text=True, env=env)
    assert "12 runs" in dry.stdout, dry.stdout + dry.stderr
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    complete = 0
    while time.time() < deadline:
        time.sleep(0.5)
        if res.exists():
            try:
                complete = _db(res).execute("SELECT COUNT(*) FROM runs WHERE status='complete'").fetchone()[0]
            except sqlite3.OperationalError:
                continue
        if complete >= 3:
            break
    assert complete >= 3, "sweep made no progress"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)  # children die with their parent (PR_SET_PDEATHSIG)
    db = _db(res)
    before = dict(db.execute("SELECT run_id, finished_at FROM runs WHERE status='complete'").fetchall())
    assert 3 <= len(before) < 12
    db.close()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{len(before)} already complete" in again.stderr
    db = _db(res)
    after = dict(db.execute("SELECT run_id, finished_at FROM runs WHERE status='complete'").fetchall())
    assert len(after) == 12
    for rid, t in before.items():
        assert after[rid] == t, "a completed run was run again"
    for rid in after:
        n_rounds = db.execute("SELECT COUNT(*) FROM rounds WHERE run_id=?", (rid,)).fetchone()[0]
        n_rows = db.execute("SELECT COUNT(*) FROM client_rounds WHERE run_id=?", (rid,)).fetchone()[0]
        assert (n_rounds, n_rows) == (2, 2 * 5)
    assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 12
    # the killed sweep's claims were taken over (its process is gone), none is left behind
    assert db.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0
    assert db.execute("SELECT COUNT(*) FROM claim_log WHERE event = 'complete'").fetchone()[0] == 12
    # a third start finds nothing to do
    third = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert "12 already complete" in third.stderr and third.returncode == 0

    # the report over this store: four formats, plots, LaTeX that is a well-formed table body
    out = tmp_path / "rep"
    with pytest.raises(SystemExit) as e:
        main(["report", "--results", str(res), "--out", str(out), "--target", "0.55"])
    assert e.value.code == 0
    for name in ("accuracy", "costs"):
        for ext in ("md", "html", "tex", "csv"):
            assert (out / f"{name}.{ext}").stat().st_size > 50
    assert (out / "accuracy_rounds.png").exists() and (out / "accuracy_vs_bytes.png").exists()
    tex = (out / "accuracy.tex").read_text()
    assert tex.count(r"\begin{tabular}") == 1 and r"\toprule" in tex and r"\bottomrule" in tex
    body = [ln for ln in tex.splitlines() if ln.endswith(r"\\")]
    assert len({ln.count("&") for ln in body}) == 1
    if shutil.which("pdflatex"):
        doc = tmp_path / "t.tex"
        doc.write_text("\\documentclass{article}\\usepackage{booktabs}\\begin{document}\n" + tex + "\\end{document}\n")
        r = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-output-directory", str(tmp_path), str(doc)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-2000:]
    md = (out / "report.md").read_text()
    assert "Made by: `fedbench report" in md and "mean of the last 10 evaluated rounds" in md


def test_failed_run_is_recorded_and_sweep_goes_on(tmp_path):
    grid = tmp_path / "g.toml"
    grid.write_text('[base]\ndataset = "synthetic"\nclients = 5\nrounds = 1\nmethod = "standalone"\n'
                    'partition = "dirichlet"\n[axes]\nmin_size = [10, 2000]\n')
    res = tmp_path / "r.sqlite"
    r = subprocess.run([sys.executable, "-m", "fedbench", "sweep", str(grid), "--results", str(res)],
                       capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=300)
    assert r.returncode == 1, r.stderr
    rows = _db(res).execute("SELECT status, error FROM runs ORDER BY status").fetchall()
    assert [s for s, _ in rows] == ["complete", "failed"]
    assert "min-size=2000" in rows[1][1]
    # stderr is not a terminal here: a progress line each time a run ends (a live display would print nothing)
    progress = [x for x in r.stderr.splitlines() if x.startswith("sweep g: done")]
    assert len(progress) >= 2 and "done 1  running 0  failed 1  pending 0" in progress[-1], r.stderr
    assert "elapsed" in progress[-1] and "ETA" in progress[-1]
