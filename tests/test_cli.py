"""The command line: bad input gets one line on stderr and exit 2, and nothing stored changes."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fedbench.cli import main

TINY = ["--dataset", "synthetic", "--clients", "5", "--rounds", "1", "--batch-size", "64", "--quiet"]


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A results store holding one complete run."""
    d = tmp_path_factory.mktemp("store")
    path = d / "results.sqlite"
    with pytest.raises(SystemExit) as e:
        main(["run", "--method", "standalone", *TINY, "--results", str(path)])
    assert e.value.code == 0
    return path


@pytest.fixture(scope="module")
def bad_data_dirs(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    garbage = d / "garbage"
    garbage.mkdir()
    (garbage / "cifar10.npz").write_bytes(b"this is not a zip archive")
    nokeys = d / "nokeys"
    nokeys.mkdir()
    np.savez(nokeys / "cifar10.npz", x_train=np.zeros((2, 32, 32, 3), np.uint8))
    badlabel = d / "badlabel"
    badlabel.mkdir()
    x = np.zeros((4, 32, 32, 3), np.uint8)
    np.savez(badlabel / "cifar10.npz", x_train=x, y_train=np.array([0, 1, 2, 10]), x_test=x,
             y_test=np.array([0, 1, 2, 3]))
    baddtype = d / "baddtype"
    baddtype.mkdir()
    np.savez(baddtype / "cifar10.npz", x_train=x.astype(np.float32), y_train=np.zeros(4, np.int64), x_test=x,
             y_test=np.zeros(4, np.int64))
    return {"garbage": garbage, "nokeys": nokeys, "badlabel": badlabel, "baddtype": baddtype, "empty": d / "empty"}


BAD = [
    (["--method", "fedlorra"], "unknown method 'fedlorra'; choose from:"),
    (["--lr", "1e39"], "--lr (run) must be at most 3.403e+38"),
    (["--weight-decay", "5e38", "--optimizer", "adamw"], "--weight-decay (run) must be at most"),
    (["--eval-protocol", "fedlora"], "--eval-protocol (run) got 'fedlora'; choose from: auto, yi, pfllib, round-end"),
    (["--dataset", "mnist"], "--dataset (run) got 'mnist'; choose from: cifar10"),
    (["--partition", "shards"], "--partition (run) got 'shards'"),
    (["--models", "resnet"], "--models (run) got 'resnet'"),
    (["--rank", "0"], "--rank (method fedlora) must be >= 1, got 0"),
    # FedLoRA's rank is bounded by the adapter's layers (a huge rank used to end in an allocation traceback)
    (["--rank", "100000000"], "--rank 100000000 is out of range for --adapter head-lora on synthetic: 1 <= r <= 10 "
                              "(min(500, K) = min(500, 10))"),
    (["--rank", "11"], "--rank 11 is out of range for --adapter head-lora"),
    (["--adapter", "small-cnn-decomp", "--rank", "501"], "--adapter small-cnn-decomp on synthetic: 1 <= r <= 500"),
    (["--adapter", "small-cnn-dimred", "--rank", "100000000"], "--adapter small-cnn-dimred on synthetic: 1 <= r <= 500"),
    (["--method", "fedkd", "--fedkd-clip", "-1"], "--fedkd-clip (method fedkd) must be >= 0.0, got -1.0"),
    # a learning rate above the fp32 maximum overflows torch's (non-fused) SGD step
    (["--method", "fedkd", "--mentee-lr", "1e39"], "--mentee-lr (method fedkd) must be at most 3.403e+38"),
    (["--method", "fedgh", "--server-lr", "1e39"], "--server-lr (method fedgh) must be at most 3.403e+38"),
    (["--mu", "1.5"], "--mu (method fedlora) must be <= 1.0, got 1.5"),
    (["--mu", "-0.1"], "--mu (method fedlora) must be >= 0.0"),
    (["--fraction", "0"], "--fraction (run) must be > 0.0"),
    (["--fraction", "1.5"], "--fraction (run) must be <= 1.0"),
    (["--classes-per-client", "11"], "--classes-per-client 11 exceeds the 10 classes"),
    (["--clients", "100000"], "--clients 100000 exceeds the"),
    (["--rounds", "0"], "--rounds (run) must be >= 1, got 0"),
    (["--epochs", "-1"], "--epochs (run) must be >= 1, got -1"),
    (["--rounds", "ten"], "--rounds (run) must be an integer, got 'ten'"),
    (["--lr", "nan"], "--lr (run) must be finite"),
    (["--method", "standalone", "--rank", "4"], "--rank does not apply to method standalone"),
    (["--rnak", "4"], "No such option: --rnak"),
    (["--clients", "7", "--classes-per-client", "3"], "not a multiple of 10"),
    (["--partition", "dirichlet", "--alpha", "0.01", "--clients", "40", "--min-size", "300"], "alpha=0.01, clients=40"),
    (["--device", "tpu"], "unknown --device 'tpu'"),
    (["--method", "fedavg"], "use --models cnn1"),
    (["--adapter", "big"], "--adapter (method fedlora) got 'big'"),
    (["--eval-every", "0"], "--eval-every (run) must be >= 1"),
    (["--share-low", "0.7"], "--share-low (run) must be < 0.6"),
    # the federated-LoRA family (a seeded random backbone: no pretraining cache needed)
    (["--method", "fedit", "--backbone-init", "random", "--rank", "1000"],
     "--rank 1000 exceeds what layer blocks.0.attn.q_proj allows: min(d_in, d_out) = 128"),
    (["--method", "fedit", "--backbone-init", "random", "--targets", "query"], "no linear or convolution layer named 'query'"),
    (["--method", "fedit", "--backbone", "vgg"], "--backbone (method fedit) got 'vgg'; choose from: vit, resnet"),
    (["--method", "hetlora", "--clients", "5", "--ranks", "2,4,8"], "--ranks gives 3 ranks for --clients 5"),
    (["--method", "hetlora", "--ranks", "2,x"], "--ranks '2,x': expected integers"),
    (["--method", "fedit", "--ranks", "cycle:2,8"], "method fedit needs one rank for all clients"),
    (["--method", "fedit", "--model-path", "/no/such/ckpt.safetensors"], "/no/such/ckpt"),
    (["--method", "fedit", "--backbone-init", "random", "--model-path", "x.pt"], "exclude each other"),
    (["--optimizer", "adam"], "--optimizer (run) got 'adam'; choose from: sgd, adamw"),
    (["--lr-schedule", "cosine", "--lr-min", "0.5"], "--lr-min 0.5 exceeds --lr 0.01"),
]


def _expect_one_line_exit2(capsys, args, needle):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    errout = capsys.readouterr().err
    lines = [ln for ln in errout.splitlines() if ln.strip()]
    assert len(lines) == 1, errout
    assert lines[0].startswith("fedbench: error: ")
    assert needle in lines[0], lines[0]
    assert "Traceback" not in errout


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_option_one_line_exit2_store_untouched(capsys, store, args, needle):
    before = sha(store)
    base = ["run", "--dataset", "synthetic", "--rounds", "1", "--quiet", "--results", str(store)]
    _expect_one_line_exit2(capsys, base + args, needle)
    assert sha(store) == before


@pytest.mark.parametrize("which,needle", [
    ("garbage", "cannot read dataset file"),
    ("nokeys", "missing key(s) y_train, x_test, y_test"),
    ("badlabel", "labels must lie in [0, 9]"),
    ("baddtype", "x_train must be uint8"),
])
def test_bad_data_files(capsys, store, bad_data_dirs, which, needle):
    before = sha(store)
    _expect_one_line_exit2(capsys, ["run", "--dataset", "cifar10", "--data-dir", str(bad_data_dirs[which]),
                                    "--results", str(store), "--quiet"], needle)
    assert sha(store) == before


def test_missing_data_offline_names_the_fix(capsys, tmp_path, monkeypatch):
    import fedbench.data.sources as src

    def no_network(info, data_dir):
        raise OSError("network unreachable")

    monkeypatch.setattr(src, "download_torchvision", no_network)
    _expect_one_line_exit2(capsys, ["run", "--dataset", "cifar10", "--data-dir", str(tmp_path / "none"),
                                    "--results", str(tmp_path / "r.sqlite")], "FEDBENCH_DATA_DIR")
    assert not (tmp_path / "r.sqlite").exists()


def test_bad_results_paths(capsys, tmp_path):
    _expect_one_line_exit2(capsys, ["run", *TINY, "--results", str(tmp_path / "nodir" / "r.sqlite")],
                           "does not exist")
    _expect_one_line_exit2(capsys, ["run", *TINY, "--results", str(tmp_path)], "is a directory")
    notdb = tmp_path / "notes.txt"
    notdb.write_text("my precious notes\n")
    before = sha(notdb)
    _expect_one_line_exit2(capsys, ["run", *TINY, "--results", str(notdb)], "not an SQLite file")
    assert sha(notdb) == before


def test_list_methods_shows_hyperparameters(capsys):
    with pytest.raises(SystemExit) as e:
        main(["list", "methods"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for needle in ("fedlora", "standalone", "fedavg", "--rank = 8", "--mu = 0.5", "arXiv 2310.13283"):
        assert needle in text


def test_run_json_rerun_and_force(tmp_path):
    """Through the real entry point: a run, the same config again (served from the store), --force."""
    res = tmp_path / "r.sqlite"
    cmd = [sys.executable, "-m", "fedbench", "run", "--method", "fedlora", "--rank", "2", *TINY,
           "--results", str(res), "--json"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    s1 = json.loads(first.stdout)
    assert s1["bytes_up"] == 5 * 2 * (500 + 10) * 4
    assert s1["config"]["method_params"]["rank"] == 2
    second = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert "already complete" in second.stderr
    s2 = json.loads(second.stdout)
    assert s2["acc_last_unweighted"] == s1["acc_last_unweighted"] and s2["run_id"] == s1["run_id"]
    third = subprocess.run(cmd + ["--force"], capture_output=True, text=True, env=env)
    s3 = json.loads(third.stdout)
    assert s3["acc_last_unweighted"] == s1["acc_last_unweighted"]  # same seed, same numbers
