"""Experiment trackers: a run exported (or streamed while it trains) reads back, through each tracker's own
reader, equal to the store: per-round metrics under the store's names, the config, the tags, the figures."""

import glob
import importlib.util
import json
import math
import struct
from pathlib import Path

import pytest

import fedbench.api as fb
from fedbench.cli import main

TINY = dict(dataset="synthetic", clients=5, rounds=2, local_steps=1, batch_size=32, method="fedavg", models="cnn1",
            seed=3)
# federated LoRA reports per-round metrics (agg_deviation, the global model's accuracy); evaluated at the
# last round only, so round 1's accuracies are NULL in the store and absent from the trackers
LORA = dict(dataset="synthetic", clients=5, rounds=2, local_steps=1, batch_size=16, method="fedit",
            backbone_init="random", optimizer="adamw", lr=1e-3, eval_every=100)


def needs(module):
    return pytest.mark.skipif(importlib.util.find_spec(module) is None,
                              reason=f"the {module} extra is not installed (pip install 'fedbench[{module}]')")


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """One complete tiny run; its expected per-round scalars computed here from the store's tables."""
    path = tmp_path_factory.mktemp("trackers") / "results.sqlite"
    res = fb.run(LORA, results=path, say=lambda m: None)
    return path, res


def expected_scalars(res) -> dict[int, dict[str, float]]:
    """From the store's DataFrames, by hand: rounds columns, client_rounds sums, round_metrics by name."""
    out = {}
    for _, r in res.rounds.iterrows():
        rnd = int(r["round"])
        d = {c: float(r[c]) for c in ("acc_mean", "acc_weighted", "wall_s", "train_s", "eval_s", "server_macs",
                                      "evaluated") if r[c] is not None and not math.isnan(r[c])}
        cr = res.client_rounds[res.client_rounds["round"] == rnd]
        d.update({c: float(cr[c].sum()) for c in ("bytes_up", "bytes_down", "train_macs", "eval_macs",
                                                  "train_samples", "selected")})
        rm = res.round_metrics[res.round_metrics["round"] == rnd]
        d.update({n: float(v) for n, v in zip(rm["name"], rm["value"], strict=True)})
        out[rnd] = d
    return out


def flat_config(res) -> dict:
    return {**{k: v for k, v in res.config.items() if k != "method_params"}, **res.config["method_params"]}


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)  # TensorBoard keeps float32 scalars


def assert_scalars(got: dict[int, dict[str, float]], res) -> None:
    want = expected_scalars(res)
    assert sorted(got) == sorted(want) == [1, 2]
    for rnd, d in want.items():
        assert set(got[rnd]) == set(d), rnd
        bad = {k: (got[rnd][k], v) for k, v in d.items() if not close(got[rnd][k], v)}
        assert not bad, bad
    assert want[2]["bytes_up"] > 0 and "acc_mean" in want[2]  # the comparison covers these


# --- readers: each tracker's own ---------------------------------------------------------------------

def read_tensorboard(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars: dict[int, dict[str, float]] = {}
    for tag in tags["scalars"]:
        for ev in acc.Scalars(tag):
            scalars.setdefault(ev.step, {})[tag] = ev.value

    def text(tag):
        return json.loads(acc.Tensors(f"{tag}/text_summary")[0].tensor_proto.string_val[0].decode())

    return scalars, text("fedbench/config"), text("fedbench/tags"), tags["images"]


def read_mlflow(uri: str, run_id: str):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("fedbench")
    (run,) = client.search_runs([exp.experiment_id], f"tags.`fedbench.run_id` = '{run_id}'")
    scalars: dict[int, dict[str, float]] = {}
    for name in run.data.metrics:
        for m in client.get_metric_history(run.info.run_id, name):
            scalars.setdefault(m.step, {})[name] = m.value
    figures = [f.path for f in client.list_artifacts(run.info.run_id, "figures")]
    return scalars, run.data.params, run.data.tags, figures, run.info.status


def wandb_records(path: Path):
    """The records of W&B's offline run file (its LevelDB-style log: a 7-byte header, 32 KiB blocks of
    chunks with a 7-byte header: CRC32, length, type FULL=1, FIRST=2, MIDDLE=3, LAST=4)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data, pos, buf = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        buf += chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def finished_records(path: Path, wait_s: float = 30.0) -> list:
    """The records of a finished offline run: W&B's service may still be writing the file when
    ``run.finish()`` returns, so wait for its last record (``exit``)."""
    import time
    deadline = time.time() + wait_s
    while True:
        recs = list(wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in recs) or time.time() > deadline:
            return recs
        time.sleep(0.2)


def read_wandb(folder: Path, run_id: str):
    """The offline run of fedbench run ``run_id`` under ``folder``: history by step, config, tags, artifacts."""
    for f in sorted(glob.glob(str(folder / "wandb" / "offline-run-*" / "run-*.wandb"))):
        recs = finished_records(Path(f))
        run = next(r.run for r in recs if r.WhichOneof("record_type") == "run")
        if f"run_id={run_id}" not in run.tags:
            continue
        config = {i.key: json.loads(i.value_json) for i in run.config.update}
        scalars: dict[int, dict[str, float]] = {}
        for r in recs:
            if r.WhichOneof("record_type") == "history":
                row = {i.nested_key[0] if i.nested_key else i.key: json.loads(i.value_json) for i in r.history.item}
                step = int(row["_step"])
                scalars[step] = {k: float(v) for k, v in row.items() if not k.startswith("_")}
        artifacts = [(r.artifact.name, sorted(e.path for e in r.artifact.manifest.contents))
                     for r in recs if r.WhichOneof("record_type") == "artifact"]
        return scalars, config, list(run.tags), run.display_name, run.notes, artifacts
    raise AssertionError(f"no offline W&B run of {run_id} under {folder}")


# --- exports -----------------------------------------------------------------------------------------

@needs("tensorboard")
def test_tensorboard_export_reads_back_equal_to_the_store(stored, tmp_path, capsys):
    path, res = stored
    with pytest.raises(SystemExit) as e:
        main(["export", "--to", "tensorboard", "--results", str(path), "--out", str(tmp_path / "tb")])
    assert e.value.code == 0 and "1 runs exported to tensorboard" in capsys.readouterr().out
    (folder,) = (tmp_path / "tb").iterdir()
    assert folder.name == f"FedIT_vit_r=8_alpha=16.0_targets=attn_head=shared-{res.run_id}"  # label, id
    scalars, config, tags, images = read_tensorboard(folder)
    assert_scalars(scalars, res)
    assert "acc_mean" not in scalars[1] and {"agg_deviation", "global_correct"} <= set(scalars[2])
    assert config == json.loads(json.dumps(flat_config(res)))
    assert tags["fedbench.run_id"] == res.run_id and tags["fedbench.label"] == res.label
    assert tags["fedbench.command"] == res.command and json.loads(tags["fedbench.versions"])["torch"]
    assert "figures/accuracy_vs_bytes" in images  # evaluated once: no per-round accuracy plot (by design)


@needs("mlflow")
def test_mlflow_export_reads_back_equal_to_the_store(stored, tmp_path):
    path, res = stored
    done = fb.export(path, "mlflow", str(tmp_path / "mlruns"))
    assert [d.run_id for d in done] == [res.run_id]
    fb.export(path, "mlflow", str(tmp_path / "mlruns"), figures=False)  # again: replaces, one run stays
    uri = (tmp_path / "mlruns").resolve().as_uri()
    scalars, params, tags, figures, status = read_mlflow(uri, res.run_id)
    assert_scalars(scalars, res)
    assert params == {k: str(v) for k, v in flat_config(res).items()}
    assert tags["fedbench.run_id"] == res.run_id and tags["fedbench.command"] == res.command
    assert tags["mlflow.runName"] == res.label and status == "FINISHED"
    assert figures == []  # the second export asked for none
    fb.export(path, "mlflow", str(tmp_path / "mlruns"))
    figures = read_mlflow(uri, res.run_id)[3]
    assert "figures/accuracy_vs_bytes.png" in figures and "figures/report.html" in figures


@needs("wandb")
def test_wandb_offline_export_reads_back_equal_to_the_store(stored, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    path, res = stored
    fb.export(path, "wandb", str(tmp_path / "wb"), method="fedit")
    scalars, config, tags, name, notes, artifacts = read_wandb(tmp_path / "wb", res.run_id)
    assert_scalars(scalars, res)
    assert {k: v for k, v in config.items() if k not in ("_wandb", "fedbench")} == json.loads(
        json.dumps(flat_config(res)))
    assert config["fedbench"]["fedbench.run_id"] == res.run_id and name == res.label and notes == res.command
    assert set(tags) == {"fedit", "synthetic", "round-end", f"run_id={res.run_id}"}
    (art_name, files), = artifacts
    assert art_name == f"report-{res.run_id}" and "accuracy_vs_bytes.png" in files


# --- streaming while it trains -----------------------------------------------------------------------

@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("tensorboard", "mlflow", "wandb")),
                    reason="needs the tensorboard, mlflow and wandb extras")
def test_run_streams_to_every_tracker_as_an_export_would(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    path = tmp_path / "results.sqlite"
    with pytest.raises(SystemExit) as e:
        main(["run", *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()], "--seed", "4", "--quiet",
              "--results", str(path), "--track", f"tensorboard:{tmp_path / 'tb'}",
              "--track", f"mlflow:{tmp_path / 'mlruns'}", "--track", f"wandb:{tmp_path / 'wb'}"])
    assert e.value.code == 0
    (run_id,) = fb.open_results(path).runs()["run_id"]
    res = fb.open_results(path).run(run_id)
    (folder,) = (tmp_path / "tb").iterdir()
    tb = read_tensorboard(folder)
    assert_scalars(tb[0], res)
    assert tb[2]["fedbench.run_id"] == run_id and "figures/accuracy_rounds" in tb[3]
    ml = read_mlflow((tmp_path / "mlruns").resolve().as_uri(), run_id)
    assert_scalars(ml[0], res)
    assert ml[4] == "FINISHED" and "figures/accuracy_rounds.png" in ml[3]
    wb = read_wandb(tmp_path / "wb", run_id)
    assert_scalars(wb[0], res)


# --- without the extra -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["tensorboard", "mlflow", "wandb"])
def test_missing_extra_is_one_line_naming_it(stored, tmp_path, capsys, monkeypatch, kind):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == kind else real(name, *a))
    for args in (["export", "--to", kind, "--results", str(stored[0])],
                 ["run", "--dataset", "synthetic", "--track", f"{kind}:{tmp_path}", "--results", str(stored[0])]):
        with pytest.raises(SystemExit) as e:
            main(args)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1, err
        assert f"needs the {kind} extra" in err and f"pip install 'fedbench[{kind}]'" in err
    assert list(tmp_path.iterdir()) == []


def test_unknown_tracker_and_run(stored, capsys):
    for args, needle in ((["export", "--to", "neptune"], "unknown --to tracker 'neptune'; choose from: tensorboard"),
                         (["export", "--to", "tensorboard", "--results", str(stored[0]), "--run", "0123abcd"],
                          "--run 0123abcd is not in")):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2 and needle in capsys.readouterr().err
