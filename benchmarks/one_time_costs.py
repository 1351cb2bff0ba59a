"""The cost table of a committed report with the one-time sends kept apart, recomputed from its runs.csv.

    python benchmarks/one_time_costs.py reports/compare-cifar10/n10-c1 --target 0.8
    python benchmarks/one_time_costs.py reports/compare-cifar10/n50-c0.2 --target 0.6

The committed reports were made before the engine recorded one-time sends (``bytes_down_once``), so their
per-round bytes and bytes to target include the initial state a ``push = "all"`` method sends every
client before round 1 (FedKD's dense mentee, LG-FedAvg's head, FedGH's header), spread over the rounds.
The size of that send does not depend on the data: this script builds each run's method on the synthetic
dataset with the run's clients, models, classes and method parameters (no training) and takes the bytes
the engine would count for the initial push (``Simulation._download`` of ``server_init``'s broadcast to
every client). Those bytes come off the per-round down figure (once / rounds) and off the bytes to target;
the result is written as ``costs-one-time.{md,csv}`` in the folder (the table ``fedbench report`` now makes).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from fedbench.config import make_config
from fedbench.data.sources import load_dataset
from fedbench.engine.data import build_federated_data
from fedbench.engine.simulation import ClientRow, Simulation
from fedbench.registry import get_method
from fedbench.report.tables import cost_table

SHAPE_KEYS = ("method", "clients", "models", "classes_per_client")


def one_time_bytes(row: pd.Series, cache: dict) -> float:
    """Bytes of the initial push to every client for the run ``row`` describes (0 for push = "selected")."""
    cls = get_method(row["method"])
    if cls.push != "all":
        return 0.0
    params = {f.name: row[f"hp_{f.name}"] for f in dataclasses.fields(cls.Params)
              if f"hp_{f.name}" in row and pd.notna(row[f"hp_{f.name}"])}
    key = (tuple(row[k] for k in SHAPE_KEYS), tuple(sorted(params.items())))
    if key not in cache:
        cfg = make_config({"dataset": "synthetic", "rounds": 1, "seed": 0,
                           **{k: int(row[k]) if k in ("clients", "classes_per_client") else row[k] for k in SHAPE_KEYS},
                           **params})
        data = build_federated_data(load_dataset("synthetic"), cfg, torch.device("cpu"))
        sim = Simulation(cfg, data, torch.device("cpu"), prefetch=False)
        rows = {c.id: ClientRow(c.id, False) for c in sim.clients}
        for c in sim.clients:
            sim._download(c, rows, once=True)
        cache[key] = float(sum(r.bytes_down_once for r in rows.values()))
        sim.close()
    return cache[key]


def with_one_time(df: pd.DataFrame) -> pd.DataFrame:
    cache: dict = {}
    df = df.copy()
    df["bytes_once"] = [one_time_bytes(r, cache) for _, r in df.iterrows()]
    df["down_to"] = ["every client" if get_method(m).push == "all" else "participants" for m in df["method"]]
    df["bytes_down_round"] = df["bytes_down_round"] - df["bytes_once"] / df["rounds"]
    df["bytes_round"] = df["bytes_up_round"] + df["bytes_down_round"]
    df["bytes_to_target"] = df["bytes_to_target"] - np.where(df["bytes_to_target"].notna(), df["bytes_once"], 0)
    return df


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--target", type=float, required=True)
    ap.add_argument("--focus", default="fedlora")
    ap.add_argument("--against", default="fedkd", help="a baseline the focus method is also compared with")
    a = ap.parse_args()
    torch.set_num_threads(1)
    df = with_one_time(pd.read_csv(a.folder / "runs.csv"))
    t = cost_table(df, a.target, a.focus)
    # the focus method against the named baseline too, where that is not already the best-accuracy one
    t.notes += [n for n in cost_table(df, a.target, a.focus, a.against).notes
                if n.replace(f" vs {a.against} ", f" vs the best-accuracy baseline {a.against} ") not in t.notes]
    t.name = "costs-one-time"
    t.caption = ("Recomputed from runs.csv by benchmarks/one_time_costs.py (the one-time bytes derived from each "
                 "method's initial broadcast, not stored by these runs). " + t.caption)
    (a.folder / f"{t.name}.md").write_text(t.to_markdown())
    (a.folder / f"{t.name}.csv").write_text(t.to_csv())
    print(t.to_markdown())


if __name__ == "__main__":
    main()
