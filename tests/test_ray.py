"""Sweeps through Ray: a local two-node cluster, the same numbers as the local executor, a killed worker
and a lost node survived. Skipped without the `ray` extra (pip install -e '.[dev,ray]')."""

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

# Ray turns a loopback address given to ray.init into the machine's network address unless it treats this
# host as a one-machine cluster: keep every test connection on 127.0.0.1 (read when ray is imported)
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray", reason="the ray extra is not installed (pip install -e '.[ray]')")
pytestmark = pytest.mark.xdist_group("ray")  # one worker: the module's cluster is built once

from conftest import tiny_sweep  # noqa: E402
from ray._private import ray_constants  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from fedbench.cli import main  # noqa: E402

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}  # with the loopback setting above
SMALL = tiny_sweep('[axes]\nmethod = ["fedlora", "standalone"]\nseed = [0]\n'
                   '[[include]]\nmethod = "fedavg"\nmodels = "cnn1"\nseed = 0\n', "ray-small")


@pytest.fixture(scope="module")
def cluster():
    """Two nodes of one CPU each on the loopback interface; node deaths noticed within ~2 s."""
    fast = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                      "node_ip_address": "127.0.0.1", "_system_config": fast})
    worker = c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    c.wait_for_nodes()
    yield c, worker
    if ray.is_initialized():
        ray.shutdown()
    c.shutdown()


def _rows(path, sql):
    db = sqlite3.connect(path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


RESULTS = ("SELECT r.run_id, r.round, r.acc_mean, r.acc_weighted, r.server_macs, r.evaluated, c.client, c.selected, "
           "c.bytes_up, c.bytes_down, c.train_macs, c.eval_macs, c.train_samples, c.correct, c.total "
           "FROM rounds r JOIN client_rounds c USING (run_id, round) ORDER BY r.run_id, r.round, c.client")


def _through_both(c, tmp_path, capsys, text: str, *args: str) -> tuple[list, list]:
    """The same sweep through the local executor (2 jobs) and the cluster, 1 thread per run: their stores."""
    grid = tmp_path / "grid.toml"
    grid.write_text(text)
    local, remote = tmp_path / "local.sqlite", tmp_path / "ray.sqlite"
    for res, extra in ((local, ["--jobs", "2"]), (remote, ["--executor", "ray", "--address", c.address])):
        with pytest.raises(SystemExit) as e:
            main(["sweep", str(grid), "--results", str(res), "--threads", "1", *args, *extra])
        assert e.value.code == 0, capsys.readouterr().err[-2000:]
    meta = "SELECT run_id, status, config_json, versions_json, device, command FROM runs ORDER BY run_id"
    assert _rows(local, meta) == _rows(remote, meta)
    return local, remote


def test_local_and_ray_executors_give_identical_metrics(cluster, tmp_path, capsys):
    local, remote = _through_both(cluster[0], tmp_path, capsys, SMALL)
    a, b = _rows(local, RESULTS), _rows(remote, RESULTS)
    assert len(a) == 3 * 2 * 5 and a == b
    # a fresh worker process per run (max_calls=1), the plugin methods (entry points) loaded on each
    started = _rows(remote, "SELECT detail FROM claim_log WHERE event = 'started'")
    assert len(started) == 3 and len({d for (d,) in started}) == 3 and all("(ray)" in d for (d,) in started)


@pytest.mark.nightly
def test_local_and_ray_identical_on_real_cifar10(cluster, real_data_dir, tmp_path, capsys):
    """Real CIFAR-10 (10 clients, 2 rounds): the driver puts the archive in the object store."""
    text = ('[base]\ndataset = "cifar10"\nclients = 10\nrounds = 2\n'
            '[axes]\nmethod = ["fedlora", "standalone"]\n')
    local, remote = _through_both(cluster[0], tmp_path, capsys, text, "--data-dir", str(real_data_dir))
    a = _rows(local, RESULTS)
    assert len(a) == 2 * 2 * 10 and a == _rows(remote, RESULTS)


def test_bad_ray_options_exit_2_store_untouched(cluster, tmp_path, capsys):
    c, _ = cluster
    grid, res = tmp_path / "grid.toml", tmp_path / "r.sqlite"
    grid.write_text(SMALL)
    for args, needle in ((["--cpus-per-run", "0"], "--cpus-per-run must be > 0"),
                         (["--gpus-per-run", "1.5"], "must be a whole number"),
                         (["--device", "cuda"], "needs --gpus-per-run > 0"),
                         (["--gpus-per-run", "0.5", "--address", c.address], "the Ray cluster has 0 GPUs"),
                         (["--cpus-per-run", "4", "--address", c.address], "the Ray cluster has 2 CPUs"),
                         (["--address", "127.0.0.1:9"], "no Ray cluster answers there")):
        with pytest.raises(SystemExit) as e:
            main(["sweep", str(grid), "--results", str(res), "--executor", "ray", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("fedbench: error: ") and needle in err[0], err
        assert not res.exists()


def _started(res):
    """(run_id, worker pid, attempt) of every attempt the driver has seen start."""
    try:
        rows = _rows(res, "SELECT run_id, detail FROM claim_log WHERE event = 'started' ORDER BY rowid")
    except sqlite3.OperationalError:
        return []
    return [(rid, int(re.search(r" on [^:]+:(\d+)", d).group(1))) for rid, d in rows]


def _incomplete(res, run_id):
    try:
        return _rows(res, f"SELECT status FROM runs WHERE run_id = '{run_id}'") == [("running",)]
    except sqlite3.OperationalError:
        return False


def _descendants(pid: int) -> set[int]:
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - found
        found |= frontier
    return found


def _raylet_children(node) -> set[int]:
    pids = set()
    for info in node.all_processes[ray_constants.PROCESS_TYPE_RAYLET]:
        pids |= _descendants(info.process.pid)
    return pids


def test_ray_sweep_survives_a_killed_worker_and_a_lost_node(cluster, tmp_path):
    """Kill one run's worker process, then a whole node while it runs another: every run ends complete
    exactly once, without duplicated rounds; the killed attempts are retried."""
    c, node = cluster
    grid, res = tmp_path / "grid.toml", tmp_path / "r.sqlite"
    grid.write_text(SMALL.replace('seed = [0]', 'seed = [0, 1]'))
    driver = subprocess.Popen([sys.executable, "-m", "fedbench", "sweep", str(grid), "--results", str(res),
                               "--executor", "ray", "--address", c.address, "--retries", "3"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 240
    killed_worker = killed_node = None
    while (killed_worker is None or killed_node is None) and time.time() < deadline and driver.poll() is None:
        time.sleep(0.1)
        for rid, pid in _started(res):
            if not _incomplete(res, rid):
                continue
            if killed_worker is None:
                os.kill(pid, signal.SIGKILL)
                killed_worker = rid
                break
            if killed_node is None and rid != killed_worker and pid in _raylet_children(node):
                c.remove_node(node, allow_graceful=False)
                killed_node = rid
                break
    assert killed_worker and killed_node, "no run was caught running to kill its worker and its node"
    out, err = driver.communicate(timeout=300)
    print(*_rows(res, "SELECT run_id, event, detail FROM claim_log ORDER BY rowid"), sep="\n")
    assert driver.returncode == 0, err[-3000:]
    assert _rows(res, "SELECT status, COUNT(*) FROM runs GROUP BY status") == [("complete", 5)]
    for (rid,) in _rows(res, "SELECT run_id FROM runs"):
        assert _rows(res, f"SELECT COUNT(*), COUNT(DISTINCT round) FROM rounds WHERE run_id = '{rid}'") == [(2, 2)]
        assert _rows(res, f"SELECT COUNT(*) FROM client_rounds WHERE run_id = '{rid}'") == [(10,)]
    retried = {rid for (rid,) in _rows(res, "SELECT run_id FROM claim_log WHERE event = 'retry'")}
    assert {killed_worker, killed_node} <= retried
    assert _rows(res, "SELECT COUNT(*) FROM claims") == [(0,)]
    assert "5 run, 0 skipped" in out
