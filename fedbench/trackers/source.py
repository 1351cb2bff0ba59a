"""What trackers are told about a stored run, read from the results store (one reading for an export
and for a stream while the run trains)."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from fedbench.trackers import RunMeta

# columns of ``rounds`` a tracker gets as they are, and of ``client_rounds`` summed over the round's clients
ROUND_COLUMNS = ("acc_mean", "acc_weighted", "wall_s", "train_s", "eval_s", "server_macs", "evaluated")
CLIENT_SUMS = ("bytes_up", "bytes_down", "train_macs", "eval_macs", "train_samples", "selected")


def run_meta(store, run_id: str) -> RunMeta:
    """The run's name, flat resolved config and provenance tags."""
    from fedbench.config import stored_config_dict
    from fedbench.summary import run_protocol
    row = store.db.execute("SELECT label, config_json, command, status, sweep, device, data_digest, "
                           "partition_digest, versions_json FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    if row is None:
        from fedbench.errors import ConfigError
        raise ConfigError(f"run {run_id} is not in {store.path}")
    label, config_json, command, status, sweep, device, data_digest, partition_digest, versions = row
    cfg = stored_config_dict(config_json)
    params = {k: v for k, v in cfg.items() if k != "method_params"}
    params.update(cfg.get("method_params", {}))
    tags = {"run_id": run_id, "label": label, "command": command or "", "method": cfg["method"],
            "dataset": cfg["dataset"], "eval_protocol": run_protocol(json.loads(config_json)), "status": status,
            "sweep": sweep or "", "device": device or "", "data_digest": data_digest or "",
            "partition_digest": partition_digest or "", "versions": versions or "{}", "results": str(store.path)}
    return RunMeta(run_id, label, params, {f"fedbench.{k}": str(v) for k, v in tags.items()})


def round_scalars(store, run_id: str, round: int | None = None) -> dict[int, dict[str, float]]:
    """round -> {name: value} of the run (of one round where given), values that are NULL left out.
    A ``round_metrics`` name that repeats a column name would be prefixed ``round_metrics/``."""
    where, args = ("r.run_id = ?", [run_id]) if round is None else ("r.run_id = ? AND r.round = ?", [run_id, round])
    sums = ", ".join(f"(SELECT SUM({c}) FROM client_rounds c WHERE c.run_id = r.run_id AND c.round = r.round)"
                     for c in CLIENT_SUMS)
    rows = store.db.execute(f"SELECT r.round, {', '.join('r.' + c for c in ROUND_COLUMNS)}, {sums} FROM rounds r "
                            f"WHERE {where} ORDER BY r.round", args).fetchall()
    out: dict[int, dict[str, float]] = {}
    names = ROUND_COLUMNS + CLIENT_SUMS
    for r in rows:
        out[r[0]] = {n: float(v) for n, v in zip(names, r[1:], strict=True) if v is not None}
    mwhere = "run_id = ?" + ("" if round is None else " AND round = ?")
    for rnd, name, value in store.db.execute(f"SELECT round, name, value FROM round_metrics WHERE {mwhere} "
                                             f"ORDER BY round, name", args).fetchall():
        if value is None or not math.isfinite(value) or rnd not in out:
            continue
        out[rnd]["round_metrics/" + name if name in names else name] = float(value)
    return out


def run_figures(store, run_id: str, out: Path | None = None) -> list[Path]:
    """The run's own report (that run alone) written to ``out`` (default: a new temporary folder):
    its PNG figures and report.html."""
    from fedbench.report.build import build_report
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix=f"fedbench-figures-{run_id}-"))
    info = build_report(store, out, command=f"fedbench report (run {run_id})", focus=None, run_ids=[run_id])
    return [Path(f) for f in info["files"] if f.endswith(".png")] + [out / "report.html"]
