"""FSLoRA: the server step on the uploaded differences (sign, scale, division by the number of clients,
not by weights), the shared head stepped by the same server optimiser, and the scaling rule it admits.
Hand-built uploads (constant blocks), server SGD so the step is theta - lr * grad."""

from __future__ import annotations

import pytest
import torch
from lora_helpers import const, lora_sim, server_factors

from fedbench.errors import ConfigError
from fedbench.methods.base import Upload

pytestmark = pytest.mark.xdist_group("lora-family")


def _upload(sim, client, weight, idx, a, b, head):
    m = sim.method
    A = {t.key: const((len(idx), t.d_in), a) for t in m.targets}
    B = {t.key: const((t.d_out, len(idx)), b) for t in m.targets}
    hd = {k: torch.full_like(v, head) for k, v in m.head_of(sim.server).items()}
    return Upload(client, weight, {"A": A, "B": B, "index": torch.tensor(idx, dtype=torch.uint8), "head": hd})


def test_server_step_is_minus_lr_times_the_mean_difference_over_participants():
    """Global rank 4, sketches of 2. Every server factor and the head start at 1. Client 0 (weight 0.9)
    sends delta = theta_sent - theta_i = 0.5 on A rows / B columns {0, 1}, 0.2 on the head; client 1
    (weight 0.1) sends 1.0 on {1, 2}, 0.6 on the head. grad = sum / N (N = 2, the weights unused):
    row 0: 0.25, row 1: 0.75, row 2: 0.5, row 3: 0; head 0.4. Server SGD lr 0.5: theta - 0.5 grad =
    0.875, 0.625, 0.75, 1.0 and head 0.8."""
    sim = lora_sim("fslora", rank=4, fslora_ratio=0.5, server_opt="sgd", server_lr=0.5, rounds=1)
    m = sim.method
    ones_a = {t.key: torch.ones(4, t.d_in) for t in m.targets}
    ones_b = {t.key: torch.ones(t.d_out, 4) for t in m.targets}
    m.set_global(sim.server, ones_a, ones_b)
    with torch.no_grad():
        for p in sim.server.module("head").parameters():
            p.fill_(1.0)
    m.aggregate(sim.server, [_upload(sim, 0, 0.9, [0, 1], 0.5, 0.5, 0.2),
                             _upload(sim, 1, 0.1, [1, 2], 1.0, 1.0, 0.6)])
    A, B = server_factors(sim)
    want = torch.tensor([0.875, 0.625, 0.75, 1.0], dtype=torch.float64)
    for t in m.targets:
        torch.testing.assert_close(A[t.key], want[:, None].expand(4, t.d_in), rtol=0, atol=1e-6)
        torch.testing.assert_close(B[t.key], want[None, :].expand(t.d_out, 4), rtol=0, atol=1e-6)
    for p in sim.server.module("head").parameters():
        torch.testing.assert_close(p.detach(), torch.full_like(p, 0.8), rtol=0, atol=1e-6)


def test_head_is_not_averaged_beside_the_server_optimiser():
    """A full round: with a shared head, the uploads carry the head's difference (no separate average)."""
    sim = lora_sim("fslora", rank=4, rounds=1, fraction=1.0)
    assert sim.method.routes_head
    seen = []
    orig = sim.method.aggregate
    sim.method.aggregate = lambda server, ups: (seen.extend(ups), orig(server, ups))
    sim.method.average_heads = lambda *a: pytest.fail("FSLoRA's head went through the family average")
    sim.run_round(1)
    assert seen and all(set(u.payload) == {"A", "B", "index", "head"} for u in seen)


def test_only_constant_scaling_is_accepted():
    with pytest.raises(ConfigError, match="rank-scaling per-rank"):
        lora_sim("fslora", rank=4, rank_scaling="per-rank")
