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


def summarize(rounds: pd.DataFrame, client_rounds: pd.DataFrame) -> dict:
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
    return out
