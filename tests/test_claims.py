"""One store, many writers: claims, takeover of a dead owner's runs, concurrent sweeps, retries."""

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from conftest import small_config, tiny_sweep

from fedbench.cli import main
from fedbench.engine.simulation import ClientRow, RoundResult
from fedbench.store import HOST, ClaimBusy, ClaimLost, Store

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
GRID = tiny_sweep('method = "standalone"\n[axes]\nseed = [0, 1, 2, 3]\n', "shared")


def _round(t: int) -> RoundResult:
    return RoundResult(t, 0.1, 0.05, 0.05, 0, True, [ClientRow(0, True, correct=3, total=4)])


def _start(store: Store, run_id: str, cfg) -> None:
    store.start_run(run_id, cfg, "label", "digest", "pdigest", {}, "cpu", "cmd", [], None)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _events(path, run_id=None) -> list[tuple[str, str, str]]:
    db = sqlite3.connect(path)
    q = "SELECT run_id, owner, event FROM claim_log" + (" WHERE run_id = ?" if run_id else "") + " ORDER BY rowid"
    rows = db.execute(q, (run_id,) if run_id else ()).fetchall()
    db.close()
    return rows


def test_claims_fence_writers_and_take_over_dead_owners(tmp_path):
    path, cfg = tmp_path / "r.sqlite", small_config()
    a, b = Store(path), Store(path)
    assert a.claim("r1") == "claimed" and b.claim("r1") == "busy" and b.claim_holder("r1") == a.owner
    with pytest.raises(ClaimBusy):  # a live owner's incomplete run is not reset under it
        _start(b, "r1", cfg)
    _start(a, "r1", cfg)
    a.write_round("r1", _round(1))
    with pytest.raises(ClaimLost):
        b.write_round("r1", _round(2))
    # the owner's heartbeat goes stale (another host, so no pid check): the claim is taken over ...
    a.db.execute("UPDATE claims SET owner = 'elsewhere:1:x', heartbeat = heartbeat - 3600")
    a.owner = "elsewhere:1:x"
    assert b.claim("r1") == "claimed"
    # ... and the old owner can write nothing more, not even its failure
    with pytest.raises(ClaimLost):
        a.write_round("r1", _round(2))
    with pytest.raises(ClaimLost):
        a.finish_run("r1", "failed", "late")
    _start(b, "r1", cfg)  # the new owner restarts the run from scratch
    b.write_round("r1", _round(1))
    b.write_round("r1", _round(2))
    b.finish_run("r1")
    assert b.status("r1") == "complete" and len(b.rounds("r1")) == 2 and b.claim_holder("r1") is None
    assert a.claim("r1") == "complete"  # nothing to do; not claimed
    # a process of this host that no longer exists loses its claim at once, whatever its heartbeat
    dead = Store(path, owner=f"{HOST}:{_dead_pid()}:dead")
    assert dead.claim("r2") == "claimed" and b.claim("r2") == "claimed"
    # a failure is recorded only under the claim, and never over a complete run
    b.mark_failed("r1", cfg, "boom")
    assert b.status("r1") == "complete"
    b.mark_failed("r2", cfg, "boom")
    assert b.status("r2") == "failed" and b.claim_holder("r2") is None
    events = [(r, e) for r, o, e in _events(path)]
    assert events.count(("r1", "took-over")) == 1 and events.count(("r2", "took-over")) == 1
    for s in (a, b, dead):
        s.close()


def test_heartbeat_keeps_claims_fresh(tmp_path):
    path = tmp_path / "r.sqlite"
    a = Store(path, owner="elsewhere:1:a", lease_s=0.6)
    b = Store(path, lease_s=0.6)
    assert a.claim("r1") == "claimed"
    with a.keep_alive(every=0.1):
        time.sleep(1.0)
        assert b.claim("r1") == "busy"
    time.sleep(0.8)
    assert b.claim("r1") == "claimed"
    a.close()
    b.close()


def _sweep_cmd(grid, res, *extra):
    return [sys.executable, "-m", "fedbench", "sweep", str(grid), "--results", str(res), *extra]


def _check_complete_once(res, n):
    db = sqlite3.connect(res)
    assert db.execute("SELECT status, COUNT(*) FROM runs GROUP BY status").fetchall() == [("complete", n)]
    for (rid,) in db.execute("SELECT run_id FROM runs").fetchall():
        assert db.execute("SELECT COUNT(*), COUNT(DISTINCT round) FROM rounds WHERE run_id=?", (rid,)).fetchone() == (2, 2)
        assert db.execute("SELECT COUNT(*) FROM client_rounds WHERE run_id=?", (rid,)).fetchone()[0] == 2 * 5
    assert db.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0
    db.close()


def test_two_sweeps_on_one_store_share_the_work(tmp_path):
    grid, res = tmp_path / "grid.toml", tmp_path / "r.sqlite"
    grid.write_text(GRID)
    procs = []
    for _ in range(2):
        procs.append(subprocess.Popen(_sweep_cmd(grid, res, "--threads", "1"), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, env=ENV))
        time.sleep(0.3)
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    _check_complete_once(res, 4)
    # every run claimed once and completed once, by one of the two; both did some of the work
    events = _events(res)
    by_run: dict[str, list] = {}
    for rid, owner, event in events:
        by_run.setdefault(rid, []).append((owner, event))
    assert len(by_run) == 4
    for rid, evs in by_run.items():
        kinds = [e for _, e in evs]
        assert kinds.count("claimed") == 1 and kinds.count("complete") == 1, (rid, evs)
        assert "took-over" not in kinds and "retry" not in kinds and "failed" not in kinds
        assert len({o for o, _ in evs}) == 1, (rid, evs)
    ran = [int(re.search(r": (\d+) run, ", out).group(1)) for out, _ in outs]
    assert sum(ran) == 4 and min(ran) >= 1, ran


def test_run_beside_a_sweep_waits_for_its_claim(tmp_path):
    grid, res = tmp_path / "grid.toml", tmp_path / "r.sqlite"
    grid.write_text(tiny_sweep('seed = 0\nmethod = "standalone"\n'))
    sweep = subprocess.Popen(_sweep_cmd(grid, res), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until the sweep holds the run's claim
        time.sleep(0.2)
        try:
            if res.exists() and _events(res):
                break
        except sqlite3.OperationalError:
            pass
    run = subprocess.run([sys.executable, "-m", "fedbench", "run", "--dataset", "synthetic", "--clients", "5",
                          "--rounds", "2", "--batch-size", "128", "--seed", "0", "--method", "standalone",
                          "--results", str(res), "--quiet"], capture_output=True, text=True, env=ENV, timeout=300)
    out, err = sweep.communicate(timeout=300)
    assert sweep.returncode == 0, err[-2000:]
    assert run.returncode == 0, run.stderr[-2000:]
    assert "is being run by" in run.stderr and "completed by another process" in run.stderr
    db = sqlite3.connect(res)
    (rid,) = db.execute("SELECT run_id FROM runs WHERE status = 'complete'").fetchone()
    assert rid in run.stdout
    assert [e for _, _, e in _events(res, rid)] == ["claimed", "started", "complete"]


def _wait_started(res, n, deadline):
    """The claim_log 'started' events (run_id, worker pid), once there are at least n."""
    while time.time() < deadline:
        time.sleep(0.1)
        try:
            db = sqlite3.connect(res)
            rows = db.execute("SELECT run_id, detail FROM claim_log WHERE event = 'started' ORDER BY rowid").fetchall()
            db.close()
        except sqlite3.OperationalError:
            continue
        if len(rows) >= n:
            return [(rid, int(re.search(r" on [^:]+:(\d+)", d).group(1))) for rid, d in rows]
    raise AssertionError(f"fewer than {n} attempts started")


def test_killed_worker_is_retried_then_failed_with_the_reason(tmp_path):
    grid, res = tmp_path / "grid.toml", tmp_path / "r.sqlite"
    grid.write_text(tiny_sweep('method = "standalone"\n[axes]\nseed = [0, 1]\n'))
    sweep = subprocess.Popen(_sweep_cmd(grid, res, "--retries", "1"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 240
    first = _wait_started(res, 1, deadline)[0]
    os.kill(first[1], signal.SIGKILL)  # attempt 1 of the first run: retried, then complete
    started = _wait_started(res, 3, deadline)  # its attempt 2, then the second run's attempt 1
    assert started[1][0] == first[0] and started[2][0] != first[0]
    os.kill(started[2][1], signal.SIGKILL)
    second = _wait_started(res, 4, deadline)[3]
    assert second[0] == started[2][0]
    os.kill(second[1], signal.SIGKILL)  # its last attempt: recorded failed with the reason
    out, err = sweep.communicate(timeout=240)
    assert sweep.returncode == 1, err[-2000:]
    db = sqlite3.connect(res)
    rows = dict(db.execute("SELECT run_id, status FROM runs").fetchall())
    assert rows == {first[0]: "complete", second[0]: "failed"}
    error = db.execute("SELECT error FROM runs WHERE run_id = ?", (second[0],)).fetchone()[0]
    assert "killed by SIGKILL" in error and "attempt 2 of 2" in error
    assert db.execute("SELECT COUNT(*) FROM rounds WHERE run_id = ?", (first[0],)).fetchone()[0] == 2
    assert [e for _, _, e in _events(res, first[0])] == ["claimed", "started", "retry", "started", "complete"]


@pytest.mark.parametrize("args,needle", [
    (["--executor", "slurm"], "unknown --executor 'slurm'"),
    (["--address", "127.0.0.1:6379"], "--address is an option of --executor ray"),
    (["--gpus-per-run", "1.5"], "--gpus-per-run 1.5: the local executor packs runs on a GPU with a fraction"),
    (["--gpus-per-run", "0.5", "--device", "cpu"], "--gpus-per-run 0.5 packs runs on GPUs that --device cpu"),
    (["--retries", "-1"], "--retries must be >= 0"),
    (["--jobs", "0"], "--jobs must be >= 1"),
])
def test_bad_executor_options_exit_2_store_untouched(tmp_path, capsys, args, needle):
    grid, res = tmp_path / "grid.toml", tmp_path / "r.sqlite"
    grid.write_text(GRID)
    with pytest.raises(SystemExit) as e:
        main(["sweep", str(grid), "--results", str(res), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedbench: error: ") and needle in err[0], err
    assert not res.exists()


def test_local_executor_packs_runs_per_gpu(tmp_path):
    """--gpus-per-run 0.25 on two GPUs: eight runs at a time, each to the GPU holding the fewest (as an
    argument, cuda:K), a GPU freed when its run ends."""
    from fedbench.executors import LocalExecutor
    ex = LocalExecutor(None, tmp_path, gpus_per_run=0.25, gpu_count=2)
    assert ex.capacity() == 8 and ex.per_gpu == 4 and "up to 4 per GPU" in ex.describe()
    assert [ex.device_for(f"r{i}") for i in range(5)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    ex._release("r1")
    ex._release("r3")
    assert ex.device_for("r5") == "cuda:1"
    assert LocalExecutor(3, tmp_path, gpus_per_run=0.5, gpu_count=2).capacity() == 3  # --jobs caps it
    assert LocalExecutor(None, tmp_path).device_for("r0") == "auto"  # no packing: the run's --device


def test_ray_missing_says_how_to_install(tmp_path, capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    grid, res = tmp_path / "grid.toml", tmp_path / "r.sqlite"
    grid.write_text(GRID)
    with pytest.raises(SystemExit) as e:
        main(["sweep", str(grid), "--results", str(res), "--executor", "ray"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs Ray, which is not installed: pip install 'fedbench[ray]'" in err[0]
    assert not res.exists()
