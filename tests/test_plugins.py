"""A separate package extends fedbench through entry points only: a method, a partitioner and a backbone,
each one file of ``tests/plugin_package/fedbench_demo_plugin``, installed here as a ``*.dist-info`` with
``entry_points.txt`` in a temporary site folder on the path, and run through `fedbench run`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from fedbench.store import Store

PACKAGE = Path(__file__).parent / "plugin_package"
REPO = Path(__file__).resolve().parent.parent


def install(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    shutil.copytree(PACKAGE, site, ignore=shutil.ignore_patterns("__pycache__"))
    return site


def fedbench(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "PYTHONDONTWRITEBYTECODE": "1",
           "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "fedbench", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_plugin_method_partitioner_and_backbone_run_through_fedbench_run(tmp_path):
    site = install(tmp_path)
    listed = fedbench(site, "list", "partitions")
    assert listed.returncode == 0, listed.stderr
    assert "quantity-skew: client sizes from Dirichlet(alpha), labels uniform (--alpha)" in listed.stdout
    results = tmp_path / "r.sqlite"
    run = fedbench(site, "run", "--method", "uniform-lora", "--backbone", "tiny-mixer", "--backbone-init", "random",
                   "--partition", "quantity-skew", "--alpha", "1.0", "--dataset", "synthetic", "--clients", "4",
                   "--rounds", "1", "--local-steps", "2", "--results", str(results))
    assert run.returncode == 0, run.stderr[-2000:]
    store = Store(results)
    (run_row,) = store.runs().itertuples()
    cfg = json.loads(run_row.config_json)
    assert (run_row.status, cfg["method"], cfg["partition"], cfg["method_params"]["backbone"]) == (
        "complete", "uniform-lora", "quantity-skew", "tiny-mixer")
    metrics = store.round_metrics(run_row.run_id).set_index("name")["value"]
    assert metrics["uniform_lora_clients"] == 4  # the plugin method's aggregate ran, with every client
    assert json.loads(run_row.versions_json)["backbone"]["name"] == "tiny-mixer"


def test_plugin_partitioner_counts_follow_the_seed(tmp_path, monkeypatch):
    """The plugin's partition is drawn from the run's generator: another seed, other client sizes."""
    monkeypatch.syspath_prepend(str(install(tmp_path)))
    from fedbench_demo_plugin.quantity_skew import QuantitySkewPartitioner

    y = np.repeat(np.arange(10), 100)
    labels = {"train": y, "val": y[:100], "test": y[:100]}
    p = QuantitySkewPartitioner(alpha=5.0)
    counts = [p.partition(labels, 10, 5, np.random.default_rng(s)).class_counts(y) for s in (0, 0, 1)]
    assert (counts[0] == counts[1]).all()
    assert (counts[0] != counts[2]).any()
