"""Summaries of a run computed from its stored per-client, per-round rows (spec §A.5, §A.6).

A summary is four choices, and every table names all four:

* **protocol** (``runs.config_json["eval_protocol"]``, ``round-end`` where a stored run lacks it): when
  and whom the run evaluated. ``yi``: the round's participants, right after local training; ``pfllib``:
  every client after aggregation and broadcast; ``round-end``: every client after aggregation and push.
* **population**: ``all`` — every client; a client not evaluated in an evaluation round carries its last
  known accuracy (under ``yi``: the non-participants), a client never yet evaluated is left out and
  counted (``never``); ``selected`` — only the round's participants, as evaluated that round.
* **statistic** over the evaluation rounds (rounds where any client was evaluated): ``last``; ``best``
  (the maximum; ties: the earliest round); ``last10`` (mean of the last 10); ``val`` (the round whose
  validation accuracy, under the same population and weighting, is the best, ties: the earliest; its
  test accuracy).
* **weighting** across clients: ``unweighted`` (mean of per-client correct/total), ``weighted``
  (Σcorrect / Σtotal), ``batch-mean`` (``yi`` runs only: mean of the authors' per-client mean over test
  batches of batch accuracy, ``acc_batch_mean``).

``protocol`` as a value of population, statistic or weighting means the run's protocol's own convention
(:data:`CONVENTIONS`). A client evaluated with an undefined prediction (``correct`` NULL, e.g. FedProto
before prototypes exist) counts in the population but not in the mean: every summary reports how many
clients had a defined prediction at the rounds it used.

FLOPs are reported as 2 x the MACs that fvcore counts (2 FLOP per multiply-add).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedbench.config import EVAL_PROTOCOLS, LEGACY_PROTOCOL
from fedbench.errors import ConfigError, choice_error

FLOP_CONVENTION = "FLOPs = 2 x fvcore MACs (multiply-add = 2 FLOP); conv/linear only; backward per metering docs"

PROTOCOLS = EVAL_PROTOCOLS
DEFAULT_PROTOCOL = LEGACY_PROTOCOL  # stored runs without the key were evaluated this way
BY_PROTOCOL = "protocol"        # the value of an option that means "the run's protocol's convention"
STATISTICS = ("last", "best", "last10", "val")
POPULATIONS = ("all", "selected")
WEIGHTINGS = ("unweighted", "weighted", "batch-mean")
# (population, statistic, weighting) each protocol reports
CONVENTIONS = {"yi": ("all", "last10", "unweighted"), "pfllib": ("all", "best", "weighted"),
               "round-end": ("all", "last10", "unweighted")}

STAT_NAMES = {"last": "last evaluated round", "best": "best round (earliest on ties)",
              "last10": "mean of the last 10 evaluated rounds",
              "val": "round with the best validation accuracy (earliest on ties), its test accuracy"}
POPULATION_NAMES = {"all": "all clients (a client not evaluated in a round carries its last known accuracy; "
                           "clients never yet evaluated left out)",
                    "selected": "the round's participants only"}
WEIGHTING_NAMES = {"unweighted": "unweighted mean of per-client accuracies",
                   "weighted": "sample-weighted (Σcorrect / Σtotal)",
                   "batch-mean": "unweighted mean of per-client batch-mean accuracies (yi)"}
METRIC_NAMES = ("val_correct", "val_total", "acc_batch_mean")


def check_options(statistic: str, population: str, weighting: str, protocol: str | None = None) -> None:
    """One-line ConfigError for an unknown value of a report option."""
    for flag, value, allowed in (("--statistic", statistic, STATISTICS), ("--population", population, POPULATIONS),
                                 ("--weighting", weighting, WEIGHTINGS)):
        if value not in (BY_PROTOCOL, *allowed):
            raise choice_error(flag, value, (BY_PROTOCOL, *allowed))
    if protocol is not None and protocol not in PROTOCOLS:
        raise choice_error("--protocol", protocol, PROTOCOLS)


def run_protocol(cfg: dict) -> str:
    p = cfg.get("eval_protocol", DEFAULT_PROTOCOL)
    if p not in PROTOCOLS:
        raise ConfigError(f"stored run has eval_protocol {p!r}; this fedbench knows {', '.join(PROTOCOLS)}")
    return p


@dataclass(frozen=True)
class Summary:
    """The resolved summary of one run: its protocol and the three choices made for it."""
    protocol: str
    population: str
    statistic: str
    weighting: str

    def short(self) -> str:
        return f"protocol {self.protocol}, {self.population}, {self.statistic}, {self.weighting}"

    def describe(self) -> str:
        return (f"protocol {self.protocol}; population: {POPULATION_NAMES[self.population]}; statistic: "
                f"{STAT_NAMES[self.statistic]}; weighting: {WEIGHTING_NAMES[self.weighting]}")


def resolve(protocol: str, statistic: str = BY_PROTOCOL, population: str = BY_PROTOCOL,
            weighting: str = BY_PROTOCOL, run: str = "run") -> Summary:
    """The summary of a run of ``protocol`` under the asked options (``protocol``: its convention)."""
    check_options(statistic, population, weighting)
    pop, stat, w = CONVENTIONS[protocol]
    s = Summary(protocol, pop if population == BY_PROTOCOL else population,
                stat if statistic == BY_PROTOCOL else statistic, w if weighting == BY_PROTOCOL else weighting)
    if s.weighting == "batch-mean" and protocol != "yi":
        raise ConfigError(f"--weighting batch-mean is the yi protocol's per-client batch-mean accuracy; {run} was "
                          f"evaluated under protocol {protocol!r} (use unweighted or weighted, or --protocol yi)")
    if s.weighting == "batch-mean" and s.statistic == "val":
        raise ConfigError("--statistic val with --weighting batch-mean: no batch-mean validation accuracy is "
                          "stored; use unweighted or weighted")
    return s


def _metrics_wide(client_metrics: pd.DataFrame | None) -> pd.DataFrame:
    cols = ["round", "client", *METRIC_NAMES]
    if client_metrics is None or client_metrics.empty:
        return pd.DataFrame(columns=cols)
    m = client_metrics[client_metrics["name"].isin(METRIC_NAMES)]
    w = m.pivot_table(index=["round", "client"], columns="name", values="value", aggfunc="first").reset_index()
    for c in METRIC_NAMES:
        if c not in w:
            w[c] = np.nan
    return w[cols]


def has_val(client_metrics: pd.DataFrame | None) -> bool:
    return client_metrics is not None and not client_metrics.empty and \
        bool((client_metrics["name"] == "val_total").any())


def client_states(client_rounds: pd.DataFrame, client_metrics: pd.DataFrame | None = None,
                  population: str = "all") -> pd.DataFrame:
    """One row per evaluation round and client of the population, with the client's accuracy as it stands.

    Columns: round, client, eval_round (the round of the evaluation used; NaN: never evaluated), correct,
    total, val_correct, val_total, acc_batch_mean, state (``defined``, ``undefined``: evaluated without a
    defined prediction, ``never``: not evaluated yet), acc (correct/total where defined), val_acc.
    """
    cr = client_rounds
    cols = ["round", "client", "eval_round", "correct", "total", *METRIC_NAMES, "state", "acc", "val_acc"]
    if cr.empty:
        return pd.DataFrame(columns=cols)
    cr = cr.assign(round=cr["round"].astype("int64"), client=cr["client"].astype("int64"))
    evaluated = cr["total"].notna()
    eval_rounds = np.sort(cr.loc[evaluated, "round"].unique())
    ev = cr.loc[evaluated, ["round", "client", "correct", "total"]].astype(float)
    ev[["round", "client"]] = ev[["round", "client"]].astype("int64")
    mw = _metrics_wide(client_metrics)
    if len(mw):
        mw = mw.astype({"round": "int64", "client": "int64"})
        ev = ev.merge(mw, on=["round", "client"], how="left")
    else:
        ev = ev.assign(**{c: np.nan for c in METRIC_NAMES})
    ev = ev.rename(columns={"round": "eval_round"})
    if population == "selected":
        grid = cr.loc[cr["round"].isin(eval_rounds) & (cr["selected"] == 1), ["round", "client"]]
        st = grid.merge(ev, left_on=["round", "client"], right_on=["eval_round", "client"], how="left")
    else:
        clients = np.sort(cr["client"].unique())
        grid = pd.DataFrame({"round": np.repeat(eval_rounds, len(clients)),
                             "client": np.tile(clients, len(eval_rounds))}).astype("int64")
        st = pd.merge_asof(grid.sort_values("round"), ev.sort_values("eval_round"), left_on="round",
                           right_on="eval_round", by="client", direction="backward")
    st = st.sort_values(["round", "client"]).reset_index(drop=True)
    defined = st["correct"].notna() & (st["total"] > 0)
    st["state"] = np.where(st["eval_round"].isna(), "never", np.where(defined, "defined", "undefined"))
    st["acc"] = np.where(defined, st["correct"] / st["total"].where(st["total"] > 0), np.nan)
    vdef = st["val_correct"].notna() & (st["val_total"] > 0)
    st["val_acc"] = np.where(vdef, st["val_correct"] / st["val_total"].where(st["val_total"] > 0), np.nan)
    return st[cols]


def client_accuracy(states: pd.DataFrame, weighting: str) -> pd.Series:
    """Per state row: the client's own accuracy as the weighting sees it (NaN where undefined)."""
    if weighting == "batch-mean":
        return states["acc_batch_mean"].where(states["state"] == "defined")
    return states["acc"]


def round_series(states: pd.DataFrame, weighting: str) -> pd.DataFrame:
    """Per evaluation round: accuracy and validation accuracy across the population under ``weighting``,
    and the counts: population, defined, undefined, never (evaluated yet)."""
    cols = ["accuracy", "val_accuracy", "population", "defined", "undefined", "never"]
    if states.empty:
        return pd.DataFrame(columns=cols, index=pd.Index([], name="round"))
    out = pd.crosstab(states["round"], states["state"]).reindex(columns=["defined", "undefined", "never"],
                                                                 fill_value=0)
    out["population"] = out.sum(axis=1)
    out.columns.name = None
    d = states[states["state"] == "defined"]
    v = states[states["val_acc"].notna()]
    if weighting == "weighted":
        dg, vg = d.groupby("round"), v.groupby("round")
        out["accuracy"] = dg["correct"].sum() / dg["total"].sum()
        out["val_accuracy"] = vg["val_correct"].sum() / vg["val_total"].sum()
    else:
        out["accuracy"] = client_accuracy(d, weighting).groupby(d["round"]).mean()
        out["val_accuracy"] = v.groupby("round")["val_acc"].mean()
    out.index.name = "round"
    return out[cols]


def select_rounds(series: pd.DataFrame, statistic: str) -> list[int]:
    """The evaluation rounds a statistic reads (``best``/``val``: one round, the earliest on ties)."""
    if series.empty:
        return []
    if statistic == "last":
        return [int(series.index[-1])]
    if statistic == "last10":
        return [int(r) for r in series.index[-10:]]
    col = "accuracy" if statistic == "best" else "val_accuracy"
    s = series[col].dropna()
    return [int(s.idxmax())] if len(s) else []  # idxmax: the first (earliest) maximum


def worst_fraction_mean(acc: np.ndarray, fraction: float = 0.1) -> float:
    """Mean of the lowest ceil(fraction x n) values."""
    if acc.size == 0:
        return math.nan
    k = max(1, math.ceil(round(fraction * acc.size, 9)))  # round: 0.1 x 30 is 3.0000000000000004 in floats
    return float(np.sort(acc)[:k].mean())


def fairness(states: pd.DataFrame, weighting: str, rounds: list[int]) -> dict:
    """Std (population, ddof 0), worst-10 % mean and minimum of the per-client accuracies of the defined
    clients, each computed per round and averaged over ``rounds``."""
    acc = client_accuracy(states, weighting)
    per = []
    for r in rounds:
        a = acc[(states["round"] == r).to_numpy()].dropna().to_numpy(dtype=float)
        if a.size:
            per.append((float(a.std()), worst_fraction_mean(a), float(a.min())))
    if not per:
        return {"fair_std": math.nan, "fair_worst10": math.nan, "fair_min": math.nan}
    m = np.asarray(per).mean(axis=0)
    return {"fair_std": float(m[0]), "fair_worst10": float(m[1]), "fair_min": float(m[2])}


def one_time_bytes(client_rounds: pd.DataFrame) -> float:
    """Bytes the run sent once (``bytes_down_once``: the initial push to every client); NaN where the store
    predates the column (its rows NULL: not recorded, so still inside the per-round bytes)."""
    if "bytes_down_once" not in client_rounds or client_rounds["bytes_down_once"].isna().all():
        return math.nan
    return float(client_rounds["bytes_down_once"].sum())


def per_round_bytes(client_rounds: pd.DataFrame) -> pd.DataFrame:
    """Per round: bytes up, bytes down less the one-time sends (where recorded), the one-time bytes."""
    cr = client_rounds.assign(once=client_rounds["bytes_down_once"].fillna(0)
                              if "bytes_down_once" in client_rounds else 0)
    g = cr.groupby("round")
    return pd.DataFrame({"up": g["bytes_up"].sum(), "down": g["bytes_down"].sum() - g["once"].sum(),
                         "once": g["once"].sum()})


def cost_to_target(series: pd.DataFrame, client_rounds: pd.DataFrame, rounds: pd.DataFrame,
                   target: float | None) -> dict:
    """Rounds to the target (the first evaluation round whose accuracy in ``series`` reaches it) and the
    cumulative per-round bytes (up + down, all clients; one-time sends left out where recorded, see
    :func:`one_time_bytes`), client training and server TFLOP of rounds 1..that round, and how many
    clients had not been evaluated yet at that round. None everywhere where the target is not reached."""
    out = {"rounds_to_target": None, "bytes_to_target": None, "client_tflop_to_target": None,
           "server_tflop_to_target": None, "never_at_target": None}
    if target is None or series.empty:
        return out
    reached = series.index[series["accuracy"].to_numpy(dtype=float) >= target]
    if not len(reached):
        return out
    r = int(reached[0])
    out["never_at_target"] = int(series.loc[r, "never"])  # yi: clients not yet evaluated at that round
    upto = client_rounds[client_rounds["round"] <= r]
    b = per_round_bytes(upto)
    out.update(rounds_to_target=r,
               bytes_to_target=float(b["up"].sum() + b["down"].sum()),
               client_tflop_to_target=2 * float(upto["train_macs"].sum()) / 1e12,
               server_tflop_to_target=2 * float(rounds.loc[rounds["round"] <= r, "server_macs"].sum()) / 1e12)
    return out


def summarize_accuracy(client_rounds: pd.DataFrame, client_metrics: pd.DataFrame | None, summary: Summary,
                       run: str = "run", states: pd.DataFrame | None = None) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """(numbers, per-round series, client states) of a run under ``summary``.

    numbers: accuracy (NaN where no selected round has a defined accuracy), rounds (the evaluation rounds
    used), population/defined/never (min and max over those rounds), fair_std/fair_worst10/fair_min.
    ``states``: the run's :func:`client_states` for ``summary.population``, where already computed."""
    if summary.statistic == "val" and not has_val(client_metrics):
        raise ConfigError(f"--statistic val: {run} has no validation rows (val_correct/val_total); it did "
                          f"not evaluate its validation split")
    if summary.weighting == "batch-mean" and (client_metrics is None
                                              or not (client_metrics["name"] == "acc_batch_mean").any()):
        raise ConfigError(f"--weighting batch-mean: {run} (protocol yi) stores no acc_batch_mean rows")
    if states is None:
        states = client_states(client_rounds, client_metrics, summary.population)
    series = round_series(states, summary.weighting)
    rounds = select_rounds(series, summary.statistic)
    at = series.loc[rounds] if rounds else series.iloc[:0]
    vals = at["accuracy"].to_numpy(dtype=float)
    out = {"accuracy": float(np.nanmean(vals)) if np.isfinite(vals).any() else math.nan,
           "rounds": rounds}
    for c in ("population", "defined", "never"):
        out[f"{c}_min"] = int(at[c].min()) if len(at) else 0
        out[f"{c}_max"] = int(at[c].max()) if len(at) else 0
    out.update(fairness(states, summary.weighting, rounds))
    return out, series, states


def defined_text(d: dict) -> str:
    """``defined 7/10`` (ranges where the selected rounds differ), plus never-evaluated clients."""
    def rng(a, b):
        return f"{a}" if a == b else f"{a}–{b}"
    t = f"{rng(d['defined_min'], d['defined_max'])}/{rng(d['population_min'], d['population_max'])}"
    if d.get("never_max"):
        t += f" ({rng(d['never_min'], d['never_max'])} never evaluated)"
    return t


def accuracy_series(client_rounds: pd.DataFrame) -> pd.DataFrame:
    """Per evaluated round: unweighted mean and sample-weighted accuracy over the clients evaluated that
    round (no carry: the evaluated clients as they are; under ``round-end`` and ``pfllib``, all clients)."""
    ev = client_rounds[client_rounds["correct"].notna() & (client_rounds["total"] > 0)].copy()
    if ev.empty:
        return pd.DataFrame(columns=["round", "acc_mean", "acc_weighted"])
    ev["acc"] = ev["correct"] / ev["total"]
    g = ev.groupby("round")
    return pd.DataFrame({"acc_mean": g["acc"].mean(),
                         "acc_weighted": g["correct"].sum() / g["total"].sum()}).reset_index()


def global_accuracy_series(round_metrics: pd.DataFrame | None) -> pd.Series:
    """Per evaluated round: the global model's accuracy on the union of the clients' test splits."""
    if round_metrics is None or round_metrics.empty:
        return pd.Series(dtype=float)
    w = round_metrics.pivot(index="round", columns="name", values="value")
    if "global_correct" not in w:
        return pd.Series(dtype=float)
    w = w.dropna(subset=["global_correct"])
    return w["global_correct"] / w["global_total"]


LANGUAGE_METRICS = ("global_initial_test_loss", "global_initial_test_ppl", "global_test_loss", "global_test_ppl")


def _none(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def summarize(rounds: pd.DataFrame, client_rounds: pd.DataFrame, round_metrics: pd.DataFrame | None = None,
              client_metrics: pd.DataFrame | None = None, protocol: str = DEFAULT_PROTOCOL) -> dict:
    """The run summary ``fedbench run`` prints: accuracy under every statistic and weighting (population
    all, as the protocol carries it), the protocol's own reported number, costs."""
    n_rounds = int(rounds["round"].max()) if len(rounds) else 0
    out: dict = {"rounds": n_rounds, "eval_protocol": protocol}
    weightings = ["unweighted", "weighted"] + (["batch-mean"] if protocol == "yi" and client_metrics is not None
                                               and (client_metrics["name"] == "acc_batch_mean").any() else [])
    val = has_val(client_metrics)
    stats = ["last", "best", "last10"] + (["val"] if val else [])
    partial = len(client_rounds) and (client_rounds["selected"] != 1).any()
    for pop in ("all", "selected") if partial else ("all",):
        states = client_states(client_rounds, client_metrics, pop)
        for w in weightings:
            for st in stats:
                if st == "val" and w == "batch-mean":
                    continue
                a, series, _ = summarize_accuracy(client_rounds, client_metrics, Summary(protocol, pop, st, w),
                                                 states=states)
                key = f"acc_{st}_{w.replace('-', '_')}" + ("" if pop == "all" else "_selected")
                out[key] = _none(a["accuracy"])
                if pop == "all" and w == "unweighted" and st == "last":
                    out["evaluations"] = int(len(series))
    out.setdefault("evaluations", 0)
    rep = resolve(protocol)
    a, _, _ = summarize_accuracy(client_rounds, client_metrics, rep)
    out["reported"] = {"summary": rep.describe(), "summary_short": rep.short(), "accuracy": _none(a["accuracy"]), "rounds": a["rounds"],
                       "defined": defined_text(a) if a["rounds"] else None,
                       "fair_std": _none(a["fair_std"]), "fair_worst10": _none(a["fair_worst10"]),
                       "fair_min": _none(a["fair_min"])}
    up = int(client_rounds["bytes_up"].sum())
    down = int(client_rounds["bytes_down"].sum())
    once = one_time_bytes(client_rounds)  # NaN: not recorded (an older store), then inside the per-round figure
    out.update(
        bytes_up=up, bytes_down=down, bytes_once=_none(once),
        bytes_up_per_round=up / max(n_rounds, 1),
        bytes_down_per_round=(down - (once if np.isfinite(once) else 0)) / max(n_rounds, 1),
        client_train_tflops=2 * float(client_rounds["train_macs"].sum()) / 1e12,
        client_eval_tflops=2 * float(client_rounds["eval_macs"].sum()) / 1e12,
        server_tflops=2 * float(rounds["server_macs"].sum()) / 1e12,
        wall_s=float(rounds["wall_s"].sum()), train_s=float(rounds["train_s"].sum()),
        eval_s=float(rounds["eval_s"].sum()),
        flop_convention=FLOP_CONVENTION,
    )
    g = global_accuracy_series(round_metrics).to_numpy(dtype=float)
    out["acc_last_global"] = float(g[-1]) if g.size else None
    out["acc_best_global"] = float(g.max()) if g.size else None
    out["acc_last10_global"] = float(g[-10:].mean()) if g.size else None
    metrics = {}
    if round_metrics is not None and not round_metrics.empty:
        for name, grp in round_metrics.groupby("name"):
            if name.startswith("global_"):
                continue
            v = grp.sort_values("round")["value"].to_numpy(dtype=float)
            metrics[name] = {"last": float(v[-1]), "mean": float(v.mean()), "max": float(v.max())}
        language = {}  # the language tier: the global model's token loss and perplexity, before and last
        for name, grp in round_metrics.groupby("name"):
            if name in LANGUAGE_METRICS:
                language[name] = float(grp.sort_values("round")["value"].to_numpy(dtype=float)[-1])
        if language:
            out["language"] = language
        ge = round_metrics[round_metrics["name"] == "global_eval_macs"]["value"]
        out["global_eval_tflops"] = 2 * float(ge.sum()) / 1e12
    out["metrics"] = metrics
    return out


def stored_summary(store, run_id: str) -> dict:
    """:func:`summarize` of a stored run, under the protocol its config names."""
    row = store.db.execute("SELECT config_json FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    protocol = run_protocol(json.loads(row[0])) if row else DEFAULT_PROTOCOL
    return summarize(store.rounds(run_id), store.client_rounds(run_id), store.round_metrics(run_id),
                     store.client_metrics(run_id), protocol)
