"""From the store to one row per run: config columns, accuracy under a named summary, fairness, costs.

The summary of each run (protocol, population, statistic, weighting) is resolved by
:func:`fedbench.summary.resolve`: ``protocol`` as an option's value means the run's protocol's own convention.
The protocol of the runs (``eval_protocol``) is a setting column whenever the runs differ in it, so runs of
different protocols are never averaged together.

``split_digest``: the store's digest of the partition the run used (runs of one seed share it; the paired
tests of :mod:`fedbench.report.stats` refuse to pair runs whose digests differ).

Rounds to target (spec A.6): the first evaluation round whose accuracy, in the same series the accuracy
table summarises (population and weighting), reaches the target. Cost to target: the cumulative stored
per-round bytes (up + down, all clients), client training MACs and server MACs of rounds 1..that round.

One-time costs are kept apart from per-round ones: ``bytes_once`` is what the run sent once (the initial
push to every client, ``client_rounds.bytes_down_once``; NaN for a store written before it was recorded,
whose per-round figures then still include it), and ``bytes_down_round`` / ``bytes_to_target`` leave it
out, so a per-round figure does not change with the run's length. A method's declared warm-up rounds
(``Method.warmup_rounds``: local training before it federates, FedLEASE's) are one-time too: per-round
figures are over the rounds after them, their computation is ``warmup_tflop``. ``down_to``: whether the server's
per-round send goes to every client or to the round's participants.
"""

from __future__ import annotations

import json
from collections.abc import Collection

import numpy as np
import pandas as pd

from fedbench.config import CORE_FIELDS, LATE_FIELDS
from fedbench.errors import ConfigError
from fedbench.summary import (
    BY_PROTOCOL,
    STATISTICS,
    WEIGHTINGS,
    accuracy_series,
    cost_to_target,
    global_accuracy_series,
    one_time_bytes,
    per_round_bytes,
    resolve,
    run_protocol,
    summarize_accuracy,
)

__all__ = ["STATISTICS", "WEIGHTINGS", "accuracy_series", "run_frame", "add_names", "statistic"]

# config keys that never define a setting: the method, the seed, and evaluation-only knobs
NOT_SETTING = {"method", "seed", "eval_batch_size", "eval_every", "method_params"}
PROTOCOL_KEY = "eval_protocol"  # a setting whenever it varies: never averaged across
# method hyper-parameters that define a setting rather than a method variant (the federated-LoRA family's
# client ranks: homogeneous vs heterogeneous is the setting, every method of the family has the option)
SETTING_HPARAMS = ("hp_ranks",)
# per-round metrics drawn and tabled by the report (spec §5)
REPORT_METRICS = ("agg_deviation", "fedit_factor_error_rel", "energy_ratio_rmin")


def statistic(series: np.ndarray, stat: str) -> float:
    """A round statistic (last, best, last10) of a plain per-round series."""
    if series.size == 0:
        return float("nan")
    if stat == "last":
        return float(series[-1])
    if stat == "best":
        return float(series.max())
    return float(series[-10:].mean())


def _global_statistic(glob: pd.Series, stat: str, clients_rounds: list[int]) -> float:
    """The global model's accuracy under a statistic; ``val``: at the round the clients' validation picked."""
    if not len(glob):
        return np.nan
    if stat == "val":
        return float(glob.get(clients_rounds[0], np.nan)) if clients_rounds else np.nan
    return statistic(glob.to_numpy(dtype=float), stat)


def _reproduce(cfg: dict, recorded: str) -> str:
    """The `fedbench run` command that reproduces a stored config on any device (device-dependent
    options spelled out); the recorded invocation where the config cannot be rebuilt (method gone)."""
    from fedbench.config import config_from_dict, config_to_cli
    try:
        return config_to_cli(config_from_dict(cfg))
    except ConfigError:
        return recorded


def _late_method_defaults(method: str) -> dict:
    """The method's options that stored configs leave out at their default (``hparam(late=True)``)."""
    from fedbench.hparams import late_defaults
    from fedbench.registry import get_method
    try:
        return late_defaults(get_method(method).Params)
    except ConfigError:  # a method this fedbench no longer has
        return {}


def run_frame(store, stat: str = BY_PROTOCOL, weighting: str = BY_PROTOCOL, target: float | None = None,
              sweep: str | None = None, dataset: str | None = None, population: str = BY_PROTOCOL,
              protocol: str | None = None, run_ids: Collection[str] | None = None) -> tuple[pd.DataFrame, dict]:
    """One row per complete run (of ``run_ids`` only, where given), plus {run_id: accuracy-per-round DataFrame}.

    Raises ConfigError (before anything is written) where an asked summary does not apply to a run:
    batch-mean weighting for a run not of protocol yi, the val statistic for a run without validation rows.
    """
    runs = store.runs(status="complete")
    if sweep:
        runs = runs[runs["sweep"] == sweep]
    if run_ids is not None:
        runs = runs[runs["run_id"].isin(list(run_ids))]
    rows, curves = [], {}
    for _, r in runs.iterrows():
        cfg = json.loads(r["config_json"])
        if dataset and cfg["dataset"] != dataset:
            continue
        proto = run_protocol(cfg)
        if protocol and proto != protocol:
            continue
        who = f"run {r['run_id']} ({r['label']})"
        summ = resolve(proto, stat, population, weighting, run=who)
        cr = store.client_rounds(r["run_id"])
        rounds = store.rounds(r["run_id"])
        numbers, series, _ = summarize_accuracy(cr, store.client_metrics(r["run_id"]), summ, run=who)
        curve = series.reset_index()[["round", "accuracy", "defined", "population"]]
        rm = store.round_metrics(r["run_id"])
        glob = global_accuracy_series(rm)
        metric_wide = rm.pivot(index="round", columns="name", values="value") if not rm.empty else pd.DataFrame()
        curve = curve.merge(glob.rename("global_accuracy").reset_index(), on="round", how="left") \
            if len(glob) else curve.assign(global_accuracy=np.nan)
        curve = curve.merge(cumulative_costs(cr, rounds), on="round", how="left")
        curves[r["run_id"]] = curve
        metric_curves = {m: metric_wide[m].dropna() for m in REPORT_METRICS if m in metric_wide}
        n_rounds = max(int(rounds["round"].max()), 1) if len(rounds) else 1
        # fields stored configs leave out at their default (added after runs were first stored): the default
        row = {k: CORE_FIELDS[k].default for k in LATE_FIELDS}
        row.update({k: v for k, v in cfg.items() if k != "method_params"})
        row.update({f"hp_{k}": v for k, v in {**_late_method_defaults(cfg["method"]), **cfg["method_params"]}.items()})
        row[PROTOCOL_KEY] = proto
        row.update(
            run_id=r["run_id"], split_digest=r.get("partition_digest") or None, label=r["label"],
            command=_reproduce(cfg, r["command"]), invocation=r["command"],
            sweep=r["sweep"], summary=summ.short(), summary_text=summ.describe(), population=summ.population,
            statistic=summ.statistic, weighting=summ.weighting,
            accuracy=numbers["accuracy"], selected_rounds=numbers["rounds"],
            global_accuracy=_global_statistic(glob, summ.statistic, numbers["rounds"]),
            **per_round_costs(cr, rounds, n_rounds, _warmup_rounds(cfg)),
            down_to=_down_to(cfg["method"]),
            wall_s=float(rounds["wall_s"].sum()),
            **{k: numbers[k] for k in numbers if k not in ("accuracy", "rounds")},
            **cost_to_target(series, cr, rounds, target),
        )
        row["bytes_round"] = row["bytes_up_round"] + row["bytes_down_round"]
        for m, v in metric_curves.items():
            row[f"{m}_mean"], row[f"{m}_last"] = float(v.mean()), float(v.iloc[-1])
        row["metric_curves"] = metric_curves
        row.update(language_numbers(metric_wide, store.client_metrics(r["run_id"])))
        rows.append(row)
    return pd.DataFrame(rows), curves


def _warmup_rounds(cfg: dict) -> int:
    """The method's declared warm-up rounds (``Method.warmup_rounds``) for this run's parameters; 0 where
    the method or its parameters no longer load."""
    from fedbench.config import config_from_dict, method_params_obj
    try:
        c = config_from_dict(cfg)
        return int(c.method_class().warmup_rounds(method_params_obj(c)))
    except ConfigError:
        return 0


def per_round_costs(cr: pd.DataFrame, rounds: pd.DataFrame, n_rounds: int, warmup: int) -> dict:
    """Per-round bytes and TFLOP over the federated rounds (after the ``warmup`` rounds), the one-time
    bytes (initial push and warm-up rounds' traffic; NaN where the store did not record the push) and the
    warm-up's client + server TFLOP."""
    warm = min(warmup, n_rounds - 1)
    per = max(n_rounds - warm, 1)
    b = per_round_bytes(cr)
    fed, early = b[b.index > warm], b[b.index <= warm]
    macs = cr.groupby("round")["train_macs"].sum()
    server = rounds.set_index("round")["server_macs"] if len(rounds) else pd.Series(dtype=float)
    once = one_time_bytes(cr)
    return {"bytes_up_round": float(fed["up"].sum()) / per, "bytes_down_round": float(fed["down"].sum()) / per,
            "bytes_once": once + float(early["up"].sum() + early["down"].sum()) if warm else once,
            "warmup_rounds": warm,
            "warmup_tflop": 2 * float(macs[macs.index <= warm].sum() + server[server.index <= warm].sum()) / 1e12,
            "client_tflop_round": 2 * float(macs[macs.index > warm].sum()) / 1e12 / per,
            "server_tflop_round": 2 * float(server[server.index > warm].sum()) / 1e12 / per}


def _down_to(method: str) -> str:
    """Whom the method's server sends to each round: every client (``push = "all"``) or the participants."""
    from fedbench.registry import get_method
    try:
        push = get_method(method).push
    except (KeyError, ConfigError):
        return "?"
    return "every client" if push == "all" else "participants"


def cumulative_costs(client_rounds: pd.DataFrame, rounds: pd.DataFrame) -> pd.DataFrame:
    """Per round: cumulative bytes (up + down, all clients, the one-time sends included: they are paid before
    round 1) and cumulative client + server TFLOP, for plots of accuracy against what was spent."""
    if client_rounds.empty:
        return pd.DataFrame(columns=["round", "cum_bytes", "cum_tflop"])
    b = per_round_bytes(client_rounds)
    macs = client_rounds.groupby("round")["train_macs"].sum()
    server = rounds.set_index("round")["server_macs"].reindex(macs.index).fillna(0)
    return pd.DataFrame({"round": b.index, "cum_bytes": (b["up"] + b["down"] + b["once"]).cumsum().to_numpy(float),
                         "cum_tflop": (2 * (macs + server) / 1e12).cumsum().to_numpy(float)})


def language_numbers(metric_wide: pd.DataFrame, client_metrics: pd.DataFrame) -> dict:
    """The language tier's perplexities (exp of the mean next-token loss on held-out lines): the global model
    on the union of the clients' test splits before training (``--eval-initial``) and at the last evaluated
    round, and the unweighted mean over clients of each client's own (personalised) perplexity, before and
    at the last evaluated round. Empty for runs without token metrics."""
    out: dict = {}
    for name, col in (("global_initial_test_ppl", "ppl_global_before"), ("global_test_ppl", "ppl_global_after")):
        if name in metric_wide and metric_wide[name].notna().any():
            out[col] = float(metric_wide[name].dropna().iloc[-1])
    if not client_metrics.empty:
        for name, col in (("initial_test_ppl", "ppl_clients_before"), ("test_ppl", "ppl_clients_after")):
            sub = client_metrics[client_metrics["name"] == name]
            if len(sub):
                last = sub[sub["round"] == sub["round"].max()]
                out[col] = float(last["value"].mean())
    return out


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
    if PROTOCOL_KEY not in cols and PROTOCOL_KEY in df.columns and df[PROTOCOL_KEY].nunique() > 1:
        cols.append(PROTOCOL_KEY)
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
