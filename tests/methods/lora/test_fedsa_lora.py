"""FedSA-LoRA: A is the data-weighted mean of the clients' A; B and, by default, the head stay local
(the official configuration lists lora_B and the classifier as local)."""

from __future__ import annotations

import pytest
import torch
from lora_helpers import const, factor_upload, lora_sim, server_factors

pytestmark = pytest.mark.xdist_group("lora-family")


def test_a_is_the_weighted_mean_and_b_is_untouched():
    """Weights 0.25 / 0.75, A = 1 / 3: global A = 0.25 + 2.25 = 2.5 (a uniform mean would give 2.0);
    the server's B is not written (the uploads carry B = 2 / 4 only to show it is ignored)."""
    sim = lora_sim("fedsa-lora", rounds=1)
    m = sim.method
    _, b_before = server_factors(sim)
    ups = [factor_upload(sim, 0, 0.25, 1, 2), factor_upload(sim, 1, 0.75, 3, 4)]
    for u in ups:
        del u.payload["B"]
    m.aggregate(sim.server, ups)
    A, B = server_factors(sim)
    for t in m.targets:
        torch.testing.assert_close(A[t.key], const(A[t.key].shape, 2.5), rtol=1e-6, atol=0)
        assert torch.equal(B[t.key], b_before[t.key])


def test_head_is_local_by_default_and_shared_on_request():
    sim = lora_sim("fedsa-lora", rounds=1)
    assert sim.method.hp.head == "local"
    down = sim.method.download(sim.server, sim.clients[0], sim.broadcast)
    assert set(down) == {"A"}  # neither B nor the head travels
    shared = lora_sim("fedsa-lora", rounds=1, head="shared")
    assert set(shared.method.download(shared.server, shared.clients[0], shared.broadcast)) == {"A", "head"}
