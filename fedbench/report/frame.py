"""From the store to one row per run: config columns, accuracy under a named statistic, costs.

Statistics (every table caption names the one used):
* ``last``: accuracy at the last evaluated round;
* ``best``: the maximum over evaluated rounds (PFLlib/HtFLlib convention);
* ``last10``: the mean of the last 10 evaluated rounds (the pFedLoRA authors' convention).
Population: all clients. Weighting: ``unweighted`` (mean of per-client accuracies) or ``weighted``
(sample-weighted, sum correct / sum total).

Rounds to target follow the paper family's convention (spec A.6): the first round whose mean
accuracy reaches the target; cost to target = rounds to target x cost per round.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from fedbench.summary import accuracy_series, global_accuracy_series

STATISTICS = ("last", "best", "last10")
WEIGHTINGS = ("unweighted", "weighted")
# config keys that never define a setting: the method, the seed, and evaluation-only knobs
NOT_SETTING = {"method", "seed", "eval_batch_size", "eval_every", "method_params"}
# method hyper-parameters that define a setting rather than a method variant (the federated-LoRA family's
# client ranks: homogeneous vs heterogeneous is the setting, every method of the family has the option)
SETTING_HPARAMS = ("hp_ranks",)
# per-round metrics drawn and tabled by the report (spec §5)
REPORT_METRICS = ("agg_deviation", "fedit_factor_error_rel", "energy_ratio_rmin")


def statistic(series: np.ndarray, stat: str) -> float:
    if series.size == 0:
        return float("nan")
    if stat == "last":
        return float(series[-1])
    if stat == "best":
        return float(series.max())
    return float(series[-10:].mean())


def _reproduce(cfg: dict, recorded: str) -> str:
    """The `fedbench run` command that reproduces a stored config on any device (device-dependent
    options spelled out); the recorded invocation where the config cannot be rebuilt (method gone)."""
    from fedbench.config import config_from_dict, config_to_cli
    from fedbench.errors import ConfigError
    try:
        return config_to_cli(config_from_dict(cfg))
    except ConfigError:
        return recorded


def run_frame(store, stat: str = "last10", weighting: str = "unweighted", target: float | None = None,
              sweep: str | None = None, dataset: str | None = None) -> tuple[pd.DataFrame, dict]:
    """One row per complete run, plus {run_id: accuracy-per-round DataFrame}."""
    runs = store.runs(status="complete")
    if sweep:
        runs = runs[runs["sweep"] == sweep]
    rows, curves = [], {}
    for _, r in runs.iterrows():
        cfg = json.loads(r["config_json"])
        if dataset and cfg["dataset"] != dataset:
            continue
        cr = store.client_rounds(r["run_id"])
        rounds = store.rounds(r["run_id"])
        acc = accuracy_series(cr)
        col = "acc_mean" if weighting == "unweighted" else "acc_weighted"
        curve = acc.rename(columns={col: "accuracy"})[["round", "accuracy"]]
        rm = store.round_metrics(r["run_id"])
        glob = global_accuracy_series(rm)
        metric_wide = rm.pivot(index="round", columns="name", values="value") if not rm.empty else pd.DataFrame()
        curve = curve.merge(glob.rename("global_accuracy").reset_index(), on="round", how="left") \
            if len(glob) else curve.assign(global_accuracy=np.nan)
        curves[r["run_id"]] = curve
        metric_curves = {m: metric_wide[m].dropna() for m in REPORT_METRICS if m in metric_wide}
        n_rounds = max(int(rounds["round"].max()), 1)
        per_round = cr.groupby("round")[["bytes_up", "bytes_down", "train_macs"]].sum().mean()
        reached = acc[acc["acc_mean"] >= target]["round"] if target is not None else pd.Series(dtype=int)
        rtt = int(reached.iloc[0]) if len(reached) else None
        row = {k: v for k, v in cfg.items() if k != "method_params"}
        row.update({f"hp_{k}": v for k, v in cfg["method_params"].items()})
        row.update(
            run_id=r["run_id"], label=r["label"], command=_reproduce(cfg, r["command"]), invocation=r["command"],
            sweep=r["sweep"],
            accuracy=statistic(acc[col].to_numpy(dtype=float), stat),
            global_accuracy=statistic(glob.to_numpy(dtype=float), stat) if len(glob) else np.nan,
            bytes_up_round=float(per_round["bytes_up"]), bytes_down_round=float(per_round["bytes_down"]),
            client_tflop_round=2 * float(per_round["train_macs"]) / 1e12,
            server_tflop_round=2 * float(rounds["server_macs"].sum()) / 1e12 / n_rounds,
            rounds_to_target=rtt, wall_s=float(rounds["wall_s"].sum()),
        )
        row["bytes_round"] = row["bytes_up_round"] + row["bytes_down_round"]
        for m, v in metric_curves.items():
            row[f"{m}_mean"], row[f"{m}_last"] = float(v.mean()), float(v.iloc[-1])
        row["metric_curves"] = metric_curves
        if rtt is not None:
            row["bytes_to_target"] = row["bytes_round"] * rtt
            row["tflop_to_target"] = row["client_tflop_round"] * rtt
        rows.append(row)
    return pd.DataFrame(rows), curves


def variant_columns(df: pd.DataFrame) -> list[str]:
    """Method hyper-parameters that vary within some method: they name method variants."""
    out = []
    for c in [c for c in df.columns if c.startswith("hp_") and c not in SETTING_HPARAMS]:
        if df.groupby("method")[c].nunique(dropna=True).max() > 1:
            out.append(c)
    return out


def setting_columns(df: pd.DataFrame) -> list[str]:
    """Core options (not method hyper-parameters) that vary across the runs: they define settings."""
    from fedbench.config import CORE_FIELDS
    cols = [k for k in CORE_FIELDS if k not in NOT_SETTING and k in df.columns and df[k].nunique(dropna=False) > 1]
    cols += [k for k in SETTING_HPARAMS if k in df.columns and df[k].fillna("").nunique() > 1]
    return cols or ["dataset"]


def add_names(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    var = variant_columns(df)

    def show(v):
        return str(int(v)) if isinstance(v, float) and v.is_integer() else str(v)

    # a hyper-parameter names a variant only of the methods it varies within (FSLoRA's global rank)
    varies = {c: set(df.groupby("method")[c].nunique(dropna=True).loc[lambda n: n > 1].index) for c in var}

    def name(r):
        extras = [f"{c[3:]}={show(r[c])}" for c in var if pd.notna(r.get(c)) and r["method"] in varies[c]]
        return r["method"] + (f" ({', '.join(extras)})" if extras else "")

    def setting(r):
        return ", ".join(f"{k.removeprefix('hp_')}={show(r[k]) if pd.notna(r[k]) and r[k] != '' else 'homogeneous'}"
                         for k in setting_columns(df))

    df["variant"] = df.apply(name, axis=1)
    df["setting"] = df.apply(setting, axis=1)
    return df
