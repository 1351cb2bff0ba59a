"""Shared test helpers: small synthetic runs through the real engine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fedbench.config import make_config
from fedbench.data.sources import load_dataset
from fedbench.engine.data import build_federated_data
from fedbench.engine.simulation import Simulation

torch.set_num_threads(1)

REAL_DATA_DIR = Path(os.environ.get("FEDBENCH_DATA_DIR", "")) if os.environ.get("FEDBENCH_DATA_DIR") else None


def small_config(**kw):
    """A tiny synthetic run: 5 clients, 2 rounds, batch 32."""
    base = dict(dataset="synthetic", clients=5, rounds=2, epochs=1, batch_size=32, seed=0)
    base.update(kw)
    return make_config(base)


def make_sim(cfg) -> Simulation:
    arrays = load_dataset(cfg.dataset, REAL_DATA_DIR)
    return Simulation(cfg, build_federated_data(arrays, cfg, torch.device("cpu")), torch.device("cpu"))


def assert_trained_alike(a: Simulation, b: Simulation, start: dict) -> float:
    """Two simulations of one config (``a`` client by client, ``b`` batched) hold the same state tensors:
    every tensor within 1 % of how far training moved it from ``start``. Not a fixed float tolerance: the
    kernels of the two paths sum in different orders, and AdamW turns a few-ULP difference in a near-zero
    gradient into a step-sized one in that element (the loss does not move), which grows over rounds. By
    CPU, the worst element is under 1e-5 of the movement on Intel Xeon (AMX) and up to 3e-3 on AMD EPYC
    (AVX-512); a mixed-up client, slice or step moves a tensor by about its movement. Returns the largest
    movement."""
    moved = 0.0
    for k, ts in a.state.tensors.items():
        for x, y, s in zip(ts, b.state.tensors[k], start[k], strict=True):
            m = (x - s).abs().max().item()
            torch.testing.assert_close(y, x, rtol=0.0, atol=1e-2 * m, msg=lambda msg, k=k: f"{k}: {msg}")
            moved = max(moved, m)
    return moved


def own_class_guess(sim) -> float:
    """The unweighted mean client accuracy of guessing without looking at the image: each client always
    predicts the most frequent class of its own test split (about 50 % under a 2-class pathological
    split). A smoke test that "learns" must beat this, not 1/K."""
    shares = []
    for c in sim.clients:
        y = sim.data.labels[sim.data.index["test"][c.id]]
        shares.append(torch.bincount(y).max().item() / len(y))
    return sum(shares) / len(shares)


@pytest.fixture
def real_data_dir():
    for name in ("cifar10.npz",):
        if REAL_DATA_DIR is None or not (REAL_DATA_DIR / name).exists():
            pytest.skip("real CIFAR-10 not materialized: set FEDBENCH_DATA_DIR")
    return REAL_DATA_DIR


# A sweep file's [base] for tiny synthetic sweeps (5 clients, 2 rounds); runs take seconds.
TINY_BASE = '[base]\ndataset = "synthetic"\nclients = 5\nrounds = 2\nbatch_size = 128\n'


def tiny_sweep(body: str, name: str = "tiny") -> str:
    """A sweep file: [sweep] name, TINY_BASE, then ``body`` (more [base] keys, [axes], [[include]]...)."""
    return f'[sweep]\nname = "{name}"\n{TINY_BASE}{body}'
