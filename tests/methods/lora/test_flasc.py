"""FLASC: a shared head is part of the server's theta, as in the official code (every trainable parameter,
the classifier included, goes through the top-k density mask and the server optimiser, the pseudo-gradient
being the sum of differences / N)."""

from __future__ import annotations

import pytest
import torch
from lora_helpers import lora_sim

from fedbench.methods.base import Upload

pytestmark = pytest.mark.xdist_group("lora-family")


def _sizes(sim):
    m = sim.method
    n_lora = sum(t.factor_numel(m.r_global) for t in m.targets)
    n_head = sum(v.numel() for v in m.head_of(sim.server).values())
    return n_lora, n_head


def test_download_mask_ranks_the_head_with_the_lora():
    """LoRA entries 0.01, head entries 5: at density n_head / n the top-k keeps exactly the head, the last
    n_head entries of theta (A, B per target, then the head)."""
    sim = lora_sim("flasc", rounds=1)
    m = sim.method
    n_lora, n_head = _sizes(sim)
    n = n_lora + n_head
    with torch.no_grad():
        for p in sim.server.module("lora").parameters():
            p.fill_(0.01)
        for p in sim.server.module("head").parameters():
            p.fill_(5.0)
    m.hp.flasc_down = n_head / n
    payload = m.download(sim.server, sim.clients[0], sim.broadcast)
    assert set(payload) == {"theta"}  # no head beside theta
    idx = payload["theta"]["index"].long()
    assert torch.equal(idx, torch.arange(n_lora, n))
    assert torch.equal(payload["theta"]["values"], torch.full((n_head,), 5.0))


def test_server_step_covers_the_head_with_the_mean_over_participants():
    """Server SGD lr 1, densities 1. Client deltas (theta_sent - theta_i) 0.5 and 1.5 on every entry,
    weights 0.9 and 0.1 (unused): grad = (0.5 + 1.5) / 2 = 1 -> every LoRA and head entry drops by 1."""
    sim = lora_sim("flasc", rounds=1, server_opt="sgd", server_lr=1.0)
    m = sim.method
    n = sum(_sizes(sim))
    before = m.flat(sim.server).clone()
    ups = [Upload(0, 0.9, {"delta": {"values": torch.full((n,), 0.5)}}),
           Upload(1, 0.1, {"delta": {"values": torch.full((n,), 1.5)}})]
    m.aggregate(sim.server, ups)
    torch.testing.assert_close(m.flat(sim.server), before - 1.0, rtol=0, atol=1e-6)


def test_upload_bytes_count_the_head_inside_the_density_budget():
    """At d_ul = 0.1 the upload is ceil(0.1 n) values + indices over n = LoRA + head entries, nothing else."""
    from fedbench.methods.lora.flasc import index_dtype, kept
    sim = lora_sim("flasc", rounds=1, fraction=1.0, flasc_up=0.1)
    n = sum(_sizes(sim))
    res = sim.run_round(1)
    k = kept(0.1, n)
    per = k * (4 + torch.empty(0, dtype=index_dtype(n)).element_size())
    assert all(row.bytes_up == per for row in res.rows if row.selected)
