"""CE-LoRA's local loop as Algorithm 1 of the paper and the official code (1503552056/CE-LoRA,
``TRAIN_ABC = True``) have it: every participation trains A, C and B, and only C travels; the start is the
code's LinearLoRATriple initialisation (A ~ N(0, 1e-3^2), B = 0, C = I)."""

from __future__ import annotations

import torch
from test_lora_family import lora_sim

from fedbench.lora.trimatrix import REFERENCE_A_STD


def _state(client):
    ad = client.module("lora")
    return {f: {k: m.weight.detach().clone() for k, m in mods.items()}
            for f, mods in (("A", ad.lora_A), ("B", ad.lora_B), ("C", ad.lora_C))}


def _moved(s0, s1, f) -> bool:
    """Every adapted matrix's factor f changed."""
    return all(not torch.equal(s0[f][k], s1[f][k]) for k in s0[f])


def test_celora_starts_from_the_official_initialisation():
    sim = lora_sim("ce-lora", rank=8)
    assert sim.method.hp.celora_init == "train-ABC"  # the default
    s = _state(sim.clients[0])
    for k in s["A"]:
        assert abs(float(s["A"][k].std()) - REFERENCE_A_STD) < 3e-4
        assert torch.equal(s["B"][k], torch.zeros_like(s["B"][k]))
        assert torch.equal(s["C"][k].reshape(8, 8), torch.eye(8))


def test_celora_trains_a_c_and_b_in_every_round_and_sends_only_c():
    sim = lora_sim("ce-lora", rounds=2, fraction=1.0, head="local")
    m = sim.method
    orig_train, orig_upload, ups = m.train, m.upload, []

    def upload(client):
        p = orig_upload(client)
        ups.append(p)
        return p

    m.upload = upload
    moved = []

    def train(client):
        before = _state(client)
        orig_train(client)
        after = _state(client)
        moved.append((client.round, client.id, [_moved(before, after, f) for f in ("A", "C", "B")]))

    m.train = train
    for t in (1, 2):
        sim.run_round(t)
    assert len(moved) == 10
    for t, cid, flags in moved:  # round 1 C moves too: B leaves 0 at the first step, then C has a gradient
        assert flags == [True, True, True], (t, cid, flags)
    for p in ups:
        assert set(p) == {"C", "hist"}  # only C (and, for the similarity rule, the label histogram) travels
