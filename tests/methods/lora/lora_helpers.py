"""Helpers of the per-method federated-LoRA tests: a tiny synthetic run with a seeded random ViT, and
uploads built by hand (constant matrices, so that expected values can be worked out on paper)."""

from __future__ import annotations

import torch
from conftest import small_config

from fedbench.engine.simulation import Simulation
from fedbench.methods.base import Upload
from fedbench.runner import prepare


def lora_sim(method: str, **kw) -> Simulation:
    """5 synthetic clients, random ViT backbone (width 128), 2 local AdamW steps."""
    base = dict(method=method, backbone_init="random", local_steps=2, batch_size=16, optimizer="adamw",
                lr=1e-3, eval_every=100)
    base.update(kw)
    cfg = small_config(**base)
    p = prepare(cfg, None, "cpu")
    return Simulation(cfg, p.data, p.device, prefetch=False, backbone=p.backbone)


def const(shape, value: float) -> torch.Tensor:
    return torch.full(shape, float(value), dtype=torch.float64)


def factor_upload(sim, client: int, weight: float, a: float, b: float) -> Upload:
    """An upload of client ``client`` whose every A is the constant ``a`` and every B the constant ``b``
    (float64), at the client's rank."""
    r = sim.method.ranks[client]
    A = {t.key: const((r, t.d_in), a) for t in sim.method.targets}
    B = {t.key: const((t.d_out, r), b) for t in sim.method.targets}
    return Upload(client, weight, {"A": A, "B": B})


def server_factors(sim) -> tuple[dict, dict]:
    ad = sim.server.module("lora")
    return ({k: m.weight.detach().double() for k, m in ad.lora_A.items()},
            {k: m.weight.detach().double() for k, m in ad.lora_B.items()})
