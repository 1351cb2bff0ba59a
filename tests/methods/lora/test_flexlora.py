"""FlexLoRA and raFLoRA: the SVD allocation's factor split on a download (A A^T = I, B = U_r diag(S_r) / s_k,
all singular values in B) and each client's download scaling s_k. Hand-built update: one rank-4 client
uploads factors whose product is diag(3, 2, 1, 0, ...), so U, S, V are known without computing an SVD."""

from __future__ import annotations

import pytest
import torch
from lora_helpers import lora_sim

from fedbench.methods.base import Upload

pytestmark = pytest.mark.xdist_group("lora-family")

ALPHA = 16.0
SIGMA = (3.0, 2.0, 1.0)


def _diag_upload(sim, client: int) -> Upload:
    """Rank-4 factors with s_k B A = diag(3, 2, 1, 0, ...): A = [e1; e2; e3; 0], B = [3 e1, 2 e2, 1 e3, 0] / s_k."""
    m = sim.method
    s = m.client_scaling(m.ranks[client])
    A, B = {}, {}
    for t in m.targets:
        a = torch.zeros(4, t.d_in, dtype=torch.float64)
        b = torch.zeros(t.d_out, 4, dtype=torch.float64)
        for i, sv in enumerate(SIGMA):
            a[i, i] = 1.0
            b[i, i] = sv / s
        A[t.key], B[t.key] = a, b
    return Upload(client, 1.0, {"A": A, "B": B})


@pytest.mark.parametrize("method", ["flexlora", "raflora"])
@pytest.mark.parametrize("rule,s0", [("constant", ALPHA / 4), ("per-rank", ALPHA / 2)])
def test_download_splits_factors_with_all_singular_values_in_b(method, rule, s0):
    """Ranks 2, 4, ... (r_max 4, s_g = alpha / 4 = 4). After aggregating diag(3, 2, 1), the rank-2 client 0
    downloads A = [±e1; ±e2] (A A^T = I) and B = [±3 e1, ±2 e2] / s_0 with matching signs, s_0 = 4
    (constant) or alpha / 2 = 8 (per-rank): B = diag(0.75, 0.5) or diag(0.375, 0.25) on its first block;
    s_0 B A = T_2 = diag(3, 2, 0, ...)."""
    sim = lora_sim(method, ranks="cycle:2,4", lora_alpha=ALPHA, rank_scaling=rule, rounds=1)
    m = sim.method
    assert m.ranks[:2] == [2, 4] and m.client_scaling(2) == s0
    m.aggregate(sim.server, [_diag_upload(sim, 1)])
    client = sim.clients[0]
    payload = m.download(sim.server, client, sim.broadcast)
    for t in m.targets:
        a, b = payload["A"][t.key].double(), payload["B"][t.key].double()
        assert a.shape == (2, t.d_in) and b.shape == (t.d_out, 2)
        torch.testing.assert_close(a @ a.T, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-6)
        want_b = torch.zeros(t.d_out, 2, dtype=torch.float64)
        want_b[0, 0], want_b[1, 1] = SIGMA[0] / s0, SIGMA[1] / s0
        torch.testing.assert_close(b.abs(), want_b, rtol=1e-6, atol=1e-6)
        signs = torch.sign(b[torch.arange(2), torch.arange(2)]) * torch.sign(a[torch.arange(2), torch.arange(2)])
        assert torch.equal(signs, torch.ones(2, dtype=torch.float64))
        t2 = torch.zeros(t.d_out, t.d_in, dtype=torch.float64)
        t2[0, 0], t2[1, 1] = SIGMA[0], SIGMA[1]
        torch.testing.assert_close(s0 * b @ a, t2, rtol=0, atol=1e-5)
    m.install(client, payload)  # the client's own adapters carry s_0
    assert client.module("lora").scaling == pytest.approx(s0)
