"""``--device cuda`` runs every registered method: the first round of a tiny synthetic run on the GPU, with the
engine's CUDA defaults (``--client-batching auto``: same-CNN MHPFL clients trained and evaluated stacked).
Skipped where torch sees no CUDA device."""

from __future__ import annotations

import pytest
import torch

from fedbench.config import make_config
from fedbench.engine.simulation import Simulation
from fedbench.registry import methods
from fedbench.runner import prepare

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("name", sorted(methods()))
def test_every_method_runs_on_cuda(name):
    cls = methods()[name]
    values = dict(method=name, dataset="synthetic", clients=10, fraction=1.0, rounds=10, epochs=1, batch_size=32,
                  seed=0)
    if cls.family == "mhpfl" and not cls.heterogeneous:
        values["models"] = "cnn1"
    if cls.family != "mhpfl":
        values["backbone_init"] = "random"
    cfg = make_config(values, "cuda")
    p = prepare(cfg, None, "cuda")
    sim = Simulation(cfg, p.data, p.device, backbone=p.backbone)
    try:
        r = sim.run_round(1)
    finally:
        sim.close()
    assert sim.client_batching == "auto" and sim.device.type == "cuda"
    assert sum(row.train_samples for row in r.rows) > 0
    assert all(row.total for row in r.rows)
    if cls.family == "mhpfl" and sim.method.batchable():
        assert sim._joint([0, 5])  # CNN-1 twice: auto trains them stacked on CUDA
