"""Glue from a checked RunConfig to a stored run: data -> partition -> engine -> store."""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import fedbench
from fedbench.config import RunConfig, method_params_obj
from fedbench.data.sources import Arrays, load_dataset
from fedbench.engine.data import FederatedData, build_federated_data
from fedbench.engine.simulation import RoundResult, Simulation, resolve_device
from fedbench.store import Store
from fedbench.summary import summarize


def versions() -> dict:
    from importlib.metadata import version

    import fvcore  # noqa: F401
    return {"fedbench": fedbench.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "fvcore": version("fvcore"), "python": platform.python_version()}


@dataclass
class Prepared:
    cfg: RunConfig
    arrays: Arrays
    data: FederatedData
    device: torch.device
    run_id: str
    label: str


def prepare(cfg: RunConfig, data_dir: Path | str | None, device: str = "auto",
            arrays: Arrays | None = None) -> Prepared:
    """Everything that can fail on user input, done before the store is touched."""
    dev = resolve_device(device)
    arrays = arrays or load_dataset(cfg.dataset, data_dir)
    data = build_federated_data(arrays, cfg, dev)
    label = cfg.method_class().label(method_params_obj(cfg))
    return Prepared(cfg, arrays, data, dev, cfg.run_hash(arrays.digest), label)


def client_table(p: Prepared, sim: Simulation) -> list[dict]:
    counts = p.data.partition.class_counts(p.data.split_labels["train"], "train")
    return [{"client": c.id, "arch": c.arch, "n_train": c.sizes["train"], "n_val": c.sizes["val"],
             "n_test": c.sizes["test"], "class_counts": counts[c.id].tolist()} for c in sim.clients]


def execute(p: Prepared, store: Store, on_round: Callable[[RoundResult], None] | None = None,
            command: str | None = None, sweep: str | None = None) -> dict:
    """Run and store; returns the summary computed back from the stored rows."""
    sim = Simulation(p.cfg, p.data, p.device)
    store.start_run(p.run_id, p.cfg, p.label, p.arrays.digest, p.data.partition.digest(), versions(),
                    str(p.device), command or " ".join(sys.argv), client_table(p, sim), sweep)

    def write(r: RoundResult) -> None:
        store.write_round(p.run_id, r)
        if on_round is not None:
            on_round(r)

    try:
        sim.run(write)
    except BaseException as e:
        store.finish_run(p.run_id, "failed", f"{type(e).__name__}: {e}")
        raise
    store.finish_run(p.run_id, "complete")
    return stored_summary(store, p.run_id)


def stored_summary(store: Store, run_id: str) -> dict:
    return summarize(store.rounds(run_id), store.client_rounds(run_id))
