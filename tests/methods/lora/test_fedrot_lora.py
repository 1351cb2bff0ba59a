"""FedRot-LoRA's alignment phase as the official code has it (haoran-zh/FedRot-LoRA, client.py): no
rotation in the first round (FederatedScope state 0), then A in state 1, B in state 2, A in state 3, ...
(``initialshare: 'A'``); fedbench's rounds are 1-based, so round 1 aligns nothing, round 2 A, round 3 B."""

from __future__ import annotations

import pytest
import torch
from test_lora_family import lora_sim


def _method(**kw):
    return lora_sim("fedrot-lora", rounds=5, **kw).method


@pytest.mark.parametrize("kw,expected", [
    ({}, [None, "A", "B", "A", "B"]),                             # the official schedule (the default)
    ({"fedrot_align": "A"}, [None, "A", "A", "A", "A"]),          # the code's ablations: not in state 0 either
    ({"fedrot_align": "B"}, [None, "B", "B", "B", "B"]),
    ({"fedrot_phase": "early"}, ["A", "B", "A", "B", "A"]),       # fedbench's earlier schedule, kept as an option
])
def test_fedrot_aligns_nothing_in_round_one_then_a_then_b(kw, expected):
    m = _method(**kw)
    assert [m.aligned_factor(t) for t in range(1, 6)] == expected


def _sym_gap(m: torch.Tensor) -> float:
    """||M - M^T|| / ||M||: 0 for the Procrustes-aligned cross product R^T M (= V S V^T, symmetric)."""
    return float((m - m.T).norm() / m.norm())


def test_fedrot_engine_round_one_uploads_the_trained_factors_round_two_aligns_a_round_three_b():
    """On the engine: round 1's upload is the trained (A, B) bit for bit; round 2's A is Procrustes-aligned
    to the broadcast A (the optimality condition of max tr(R^T M) over rotations: R^T M = A' A_ref^T is
    symmetric), round 3's B to the broadcast B (B'^T B_ref symmetric), each keeping the product B A."""
    sim = lora_sim("fedrot-lora", rounds=3, fraction=1.0)
    m = sim.method
    orig_train, orig_upload, seen = m.train, m.upload, {}

    def train(client):
        ref = m.factors_of(client, ("A", "B"))  # what the server broadcast this round
        orig_train(client)
        seen[(client.round, client.id)] = {"ref": ref, "trained": m.factors_of(client, ("A", "B"))}

    def upload(client):
        p = orig_upload(client)
        seen[(client.round, client.id)]["up"] = {f: {k: v.clone() for k, v in p[f].items()} for f in ("A", "B")}
        return p

    m.train, m.upload = train, upload
    for t in (1, 2, 3):
        sim.run_round(t)
    gaps = {1: [], 2: [], 3: []}
    for (t, _), s in seen.items():
        for k in m.layers:
            a, b = s["up"]["A"][k].double(), s["up"]["B"][k].double()
            a0, b0 = s["trained"]["A"][k].double(), s["trained"]["B"][k].double()
            a_ref, b_ref = s["ref"]["A"][k].double(), s["ref"]["B"][k].double()
            if t == 1:
                assert torch.equal(a, a0) and torch.equal(b, b0)  # not rotated
            else:
                torch.testing.assert_close(b @ a, b0 @ a0, rtol=0, atol=1e-5)
            gaps[t].append((_sym_gap(a @ a_ref.T), _sym_gap(b.T @ b_ref), _sym_gap(a0 @ a_ref.T),
                            _sym_gap(b0.T @ b_ref)))
    # measured: aligned about 1e-8; the trained A 5e-3 or more, the trained B 0.15, the other factor 0.17
    assert max(g[0] for g in gaps[2]) < 1e-6          # round 2: A aligned
    assert min(g[2] for g in gaps[2]) > 1e-3          # (the trained A was not already)
    assert max(g[1] for g in gaps[3]) < 1e-6          # round 3: B aligned
    assert min(g[3] for g in gaps[3]) > 1e-2
    assert min(g[1] for g in gaps[2]) > 1e-2          # and not the other factor in those rounds
    assert min(g[0] for g in gaps[3]) > 1e-2
