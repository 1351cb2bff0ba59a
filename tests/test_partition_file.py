"""Partition files: export a run's exact split, run on it (same split, same numbers), refuse bad files.

Bad files end in one line on stderr and exit 2, before any work, with the results store unchanged."""

import gzip
import hashlib
import json

import numpy as np
import pytest

from fedbench.cli import main
from fedbench.config import make_config
from fedbench.data import partition_file as pfile
from fedbench.data.sources import load_dataset
from fedbench.engine.data import split_rows
from fedbench.errors import ConfigError
from fedbench.store import Store

SYN = ["--dataset", "synthetic", "--clients", "5", "--seed", "3"]
RUN = ["--method", "standalone", "--rounds", "1", "--batch-size", "128", "--quiet"]


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    monkeypatch.setattr(pfile, "_GIVEN", {})


def cli(*args):
    with pytest.raises(SystemExit) as e:
        main(list(args))
    return e.value.code


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("pf") / "syn.json"
    assert cli("data", "partition", *SYN, "--export", str(path)) == 0
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A results store holding one complete run."""
    path = tmp_path_factory.mktemp("store") / "results.sqlite"
    assert cli("run", *RUN, "--dataset", "synthetic", "--clients", "5", "--results", str(path)) == 0
    return path


def test_file_holds_rows_of_the_original_arrays(exported):
    cfg = make_config({"dataset": "synthetic", "clients": 5, "seed": 3})
    arrays = load_dataset("synthetic")
    rows, part = split_rows(arrays, cfg)
    doc = json.loads(exported.read_text())
    assert doc["format"] == "fedbench-partition" and doc["version"] == 1 and doc["num_clients"] == 5
    assert doc["dataset"] == "synthetic" and doc["dataset_digest"] == arrays.digest
    assert doc["partition_digest"] == part.digest()
    assert doc["options"] == {"partition": "pathological", "clients": 5, "seed": 3, "val_fraction": 0.2,
                              "classes_per_client": 2, "share_low": 0.4}
    assert doc["array_sizes"] == {"x_train": 3000, "x_test": 600}
    assert doc["val_holdout"] == rows["val"].tolist() and len(doc["val_holdout"]) == 600
    for j, c in enumerate(doc["clients"]):
        for s in ("train", "val", "test"):
            assert c[s] == rows[s][part.indices[s][j]].tolist() and c[s] == sorted(c[s])
        # the rows index the keras-layout arrays directly: the labels another library reads are the run's
        counts = part.class_counts(arrays.y_train[rows["train"]], "train")[j]
        assert (np.bincount(arrays.y_train[c["train"]], minlength=10) == counts).all()
        assert (np.bincount(arrays.y_test[c["test"]], minlength=10) > 0).sum() == 2
    # one line per client split: diffs between two partitions stay readable
    assert len(exported.read_text().splitlines()) == 1 + 10 + 1 + 3 * 5 + 2


def test_import_gives_back_the_native_rows_and_digest(exported, tmp_path):
    arrays = load_dataset("synthetic")
    rows, part = split_rows(arrays, make_config({"dataset": "synthetic", "clients": 5, "seed": 3}))
    gz = tmp_path / "syn.json.gz"
    assert cli("data", "partition", *SYN, "--export", str(gz)) == 0
    assert gzip.decompress(gz.read_bytes()) == exported.read_bytes()
    for path in (exported, gz):
        pf = pfile.read_partition_file(path)
        pfile.register(pf)
        cfg = make_config({"dataset": "synthetic", "clients": 5, "seed": 7, "partition_digest": pf.partition_digest})
        rows2, part2 = split_rows(arrays, cfg)  # another seed: the split is the file's all the same
        assert part2.digest() == part.digest() == pf.partition_digest
        for s in rows:
            assert np.array_equal(rows[s], rows2[s])
            assert all(np.array_equal(a, b) for a, b in zip(part.indices[s], part2.indices[s], strict=True))


def test_run_identity_names_the_split():
    plain = make_config({"dataset": "synthetic", "clients": 5})
    assert "partition_digest" not in json.loads(plain.canonical_json())  # a late field: old run ids unchanged
    imported = make_config({"dataset": "synthetic", "clients": 5, "partition_digest": "0123456789abcdef"})
    assert json.loads(imported.canonical_json())["partition_digest"] == "0123456789abcdef"
    assert imported.run_hash("d") != plain.run_hash("d")
    with pytest.raises(ConfigError, match="no partition digest"):
        make_config({"partition_digest": "/some/file.json"})


def _stored(results, run_id):
    s = Store(results)
    try:
        run = s.runs().set_index("run_id").loc[run_id]
        tables = {"client_rounds": s.client_rounds(run_id), "clients": s.clients(run_id),
                  "rounds": s.rounds(run_id).drop(columns=["wall_s", "train_s", "eval_s"]),
                  "round_metrics": s.round_metrics(run_id), "client_metrics": s.client_metrics(run_id)}
    finally:
        s.close()
    return run, {k: t.drop(columns=["run_id"], errors="ignore") for k, t in tables.items()}


def _round_trip(tmp_path, capsys, dataset, clients, extra, run_args):
    """Export a config's partition, run the config natively and on the file: the same split and numbers."""
    part, res = tmp_path / "part.json", tmp_path / "r.sqlite"
    data_args = ["--dataset", dataset, "--clients", str(clients), *extra]
    assert cli("data", "partition", *data_args, "--export", str(part)) == 0
    capsys.readouterr()
    assert cli("run", *data_args, *run_args, "--results", str(res), "--json") == 0
    native = json.loads(capsys.readouterr().out)
    # the file alone gives the dataset and the clients
    assert cli("run", *extra, *run_args, "--results", str(res), "--json", "--partition-file", str(part)) == 0
    imported = json.loads(capsys.readouterr().out)
    digest = json.loads(part.read_text())["partition_digest"]
    assert imported["run_id"] != native["run_id"]
    assert imported["config"]["partition_digest"] == digest and native["config"]["partition_digest"] == ""
    run_n, tab_n = _stored(res, native["run_id"])
    run_i, tab_i = _stored(res, imported["run_id"])
    assert run_n["partition_digest"] == run_i["partition_digest"] == digest
    assert run_n["data_digest"] == run_i["data_digest"]
    assert len(tab_n["client_rounds"]) == clients
    for name in tab_n:
        assert tab_n[name].equals(tab_i[name]), name  # correct/total, bytes, MACs, sizes, class counts
    return tab_n


def test_round_trip_synthetic_identical_results(tmp_path, capsys):
    tab = _round_trip(tmp_path, capsys, "synthetic", 5, ["--seed", "3"],
                      ["--method", "fedlora", "--rank", "2", "--rounds", "1", "--batch-size", "128", "--quiet"])
    assert (tab["client_rounds"][["total", "bytes_up", "bytes_down", "train_macs"]] > 0).all().all()


def test_round_trip_real_cifar10(tmp_path, capsys, real_data_dir):
    _round_trip(tmp_path, capsys, "cifar10", 5, ["--data-dir", str(real_data_dir)],
                ["--method", "standalone", "--rounds", "1", "--local-steps", "2", "--quiet"])


def test_sweep_partition_file_runs_the_imported_split(tmp_path, exported):
    res = tmp_path / "s.sqlite"
    sw = tmp_path / "sw.toml"
    sw.write_text(f'[sweep]\nname = "pf"\n[base]\nmethod = "standalone"\nrounds = 1\nbatch_size = 128\n'
                  f'seed = 3\npartition_file = "{exported}"\n')
    assert cli("sweep", str(sw), "--results", str(res), "--threads", "1") == 0
    assert cli("run", *RUN, "--seed", "3", "--partition-file", str(exported), "--results", str(res)) == 0
    s = Store(res)
    try:
        runs = s.runs()
    finally:
        s.close()
    assert len(runs) == 1  # the sweep's run is the one `fedbench run --partition-file` names
    assert runs["partition_digest"].iloc[0] == json.loads(exported.read_text())["partition_digest"]


# --- bad files -------------------------------------------------------------------------------------

def _edit(doc, case):
    c = doc["clients"]
    if case == "unknown key":
        doc["comment"] = "hi"
    elif case == "missing key":
        del doc["val_holdout"]
    elif case == "version":
        doc["version"] = 2
    elif case == "format":
        doc["format"] = "flower-partition"
    elif case == "index_into":
        doc["index_into"]["train"] = "train_split"
    elif case == "wrong type num_clients":
        doc["num_clients"] = "5"
    elif case == "wrong type index":
        c[0]["train"][3] = 1.5
    elif case == "wrong type clients":
        doc["clients"] = {"0": c[0]}
    elif case == "clients count":
        doc["clients"] = c[:4]
    elif case == "other dataset":
        doc["dataset"] = "cifar100"
    elif case == "unknown dataset":
        doc["dataset"] = "mnist"
    elif case == "dataset digest":
        doc["dataset_digest"] = "0" * 16
    elif case == "partition digest":
        doc["partition_digest"] = "f" * 16
    elif case == "out of range train":
        c[2]["train"].append(3000)
    elif case == "out of range test":
        c[1]["test"][0] = 600
    elif case == "negative":
        c[0]["val"][0] = -1
    elif case == "overlap across clients":
        c[1]["train"].append(c[0]["train"][0])
    elif case == "overlap within client":
        c[3]["test"].append(c[3]["test"][0])
    elif case == "train vs val":
        c[1]["train"].append(c[0]["val"][0])
    elif case == "val outside holdout":
        c[0]["val"].append(c[1]["train"][0])
        c[1]["train"].pop(0)
    elif case == "holdout twice":
        doc["val_holdout"].append(doc["val_holdout"][0])
    elif case == "empty client":
        c[4]["train"] = []
    else:
        raise AssertionError(case)
    return doc


BAD_FILES = [
    ("unknown key", "unknown key 'comment'"),
    ("missing key", "missing key(s) val_holdout"),
    ("version", "format version 2 is not supported"),
    ("format", "is not a fedbench partition file"),
    ("index_into", "index_into must be"),
    ("wrong type num_clients", "num_clients must be an integer"),
    ("wrong type index", "client 0 train must be a list of integer indices, got float 1.5"),
    ("wrong type clients", "clients must be a list of num_clients = 5 objects"),
    ("clients count", "clients must be a list of num_clients = 5 objects, got 4 entries"),
    ("other dataset", "--dataset synthetic disagrees with partition file"),
    ("unknown dataset", "dataset 'mnist' is not an image dataset"),
    ("dataset digest", "was made from other synthetic data: its dataset_digest is 0000000000000000"),
    ("partition digest", "partition_digest ffffffffffffffff does not match its indices"),
    ("out of range train", "client 2 train index 3000 is out of range for x_train (3000 rows"),
    ("out of range test", "client 1 test index 600 is out of range for x_test (600 rows"),
    ("negative", "client 0 val index -1 is out of range"),
    ("overlap across clients", "overlapping indices: x_train index"),
    ("overlap within client", "twice in client 3's test split"),
    ("train vs val", "in client 1's train split and in client 0's val split"),
    ("val outside holdout", "client 0 val index"),
    ("holdout twice", "val_holdout lists x_train index"),
    ("empty client", "client 4 has no training samples"),
]


def _expect_one_line_exit2(capsys, args, needle):
    capsys.readouterr()
    assert cli(*args) == 2
    errout = capsys.readouterr().err
    lines = [ln for ln in errout.splitlines() if ln.strip()]
    assert len(lines) == 1, errout
    assert lines[0].startswith("fedbench: error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in errout


@pytest.mark.parametrize("case,needle", BAD_FILES, ids=[c for c, _ in BAD_FILES])
def test_bad_partition_file_one_line_exit2_store_untouched(capsys, tmp_path, exported, store, case, needle):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_edit(json.loads(exported.read_text()), case)))
    before = sha(store)
    _expect_one_line_exit2(capsys, ["run", *RUN, "--dataset", "synthetic", "--partition-file", str(bad),
                                    "--results", str(store)], needle)
    assert sha(store) == before


@pytest.mark.parametrize("case,needle", [
    ("missing", "does not exist"),
    ("not json", "is not valid JSON (truncated or corrupt?)"),
    ("truncated", "is not valid JSON (truncated or corrupt?)"),
    ("not an object", "expected a JSON object, got list"),
    ("bad gzip", "cannot read partition file"),
    ("binary", "is not JSON text"),
    ("directory", "is not a file"),
])
def test_unreadable_partition_file(capsys, tmp_path, exported, store, case, needle):
    bad = tmp_path / ("bad.json.gz" if case == "bad gzip" else "bad.json")
    text = exported.read_text()
    if case == "not json":
        bad.write_text("clients: [1, 2]\n")
    elif case == "truncated":
        bad.write_text(text[: len(text) // 2])
    elif case == "not an object":
        bad.write_text("[1, 2, 3]")
    elif case == "bad gzip":
        bad.write_text(text)
    elif case == "binary":
        bad.write_bytes(gzip.compress(text.encode()))
    elif case == "directory":
        bad.mkdir()
    before = sha(store)
    _expect_one_line_exit2(capsys, ["run", *RUN, "--partition-file", str(bad), "--results", str(store)], needle)
    assert sha(store) == before


def test_clients_and_digest_must_agree_with_the_file(capsys, exported, store):
    before = sha(store)
    base = ["run", *RUN, "--results", str(store)]
    _expect_one_line_exit2(capsys, [*base, "--clients", "4", "--partition-file", str(exported)],
                           "--clients 4 disagrees with partition file")
    _expect_one_line_exit2(capsys, [*base, "--partition-digest", "0123456789abcdef"],
                           "give its file with --partition-file")
    _expect_one_line_exit2(capsys, [*base, "--partition-digest", "0123456789abcdef", "--partition-file",
                                    str(exported)], "disagrees with partition file")
    assert sha(store) == before


def test_sweep_bad_partition_file_one_line_exit2(capsys, tmp_path, exported, store):
    before = sha(store)
    sw = tmp_path / "sw.toml"
    for body, needle in ((f'partition_file = "{tmp_path / "none.json"}"', "does not exist"),
                         (f'clients = 4\npartition_file = "{exported}"', "has clients = 4, the file holds"),
                         ('partition_digest = "0123456789abcdef"', "give its file as partition_file")):
        sw.write_text(f'[base]\nmethod = "standalone"\nrounds = 1\n{body}\n')
        _expect_one_line_exit2(capsys, ["sweep", str(sw), "--results", str(store)], needle)
    assert sha(store) == before
