"""Summaries of a run computed from its stored per-client, per-round rows.

FLOPs are reported as 2 x the MACs that fvcore counts (2 FLOP per multiply-add).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

FLOP_CONVENTION = "FLOPs = 2 x fvcore MACs (multiply-add = 2 FLOP); conv/linear only; backward per metering docs"


def accuracy_series(client_rounds: pd.DataFrame) -> pd.DataFrame:
    """Per evaluated round: unweighted mean of client accuracies and sample-weighted accuracy."""
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


def summarize(rounds: pd.DataFrame, client_rounds: pd.DataFrame, round_metrics: pd.DataFrame | None = None) -> dict:
    acc = accuracy_series(client_rounds)
    n_rounds = int(rounds["round"].max()) if len(rounds) else 0
    out: dict = {"rounds": n_rounds, "evaluations": int(len(acc))}
    for col, name in (("acc_mean", "unweighted"), ("acc_weighted", "weighted")):
        s = acc[col].to_numpy(dtype=float) if len(acc) else np.array([])
        out[f"acc_last_{name}"] = float(s[-1]) if s.size else None
        out[f"acc_best_{name}"] = float(s.max()) if s.size else None
        out[f"acc_last10_{name}"] = float(s[-10:].mean()) if s.size else None
    up = int(client_rounds["bytes_up"].sum())
    down = int(client_rounds["bytes_down"].sum())
    out.update(
        bytes_up=up, bytes_down=down,
        bytes_up_per_round=up / max(n_rounds, 1), bytes_down_per_round=down / max(n_rounds, 1),
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
