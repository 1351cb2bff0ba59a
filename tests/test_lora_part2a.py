"""Federated LoRA, part 2a: FedEx-LoRA, LoRA-FAIR, FedRot-LoRA, FRLoRA, FedLoRU (spec §3.8-3.12, §6).

Each method's defining algebra in float64 (pure functions), then on the engine: payload bytes against
the formula, the downloads carrying exactly the merges a client missed, the reference quirks, bad flag
values, and a 5-round smoke run on the synthetic set with a seeded random backbone."""

from __future__ import annotations

import math

import pytest
import torch
from test_lora_family import _head_bytes, lora_config, lora_sim, rand_factors

from fedbench.engine.simulation import Simulation
from fedbench.errors import ConfigError
from fedbench.lora import algebra
from fedbench.methods.lora.fedex_lora import factored_residual, fedex_residual
from fedbench.methods.lora.fedrot_lora import alignment, procrustes, rotate
from fedbench.methods.lora.frlora import merge_factors, principal_init
from fedbench.methods.lora.lora_fair import closed_form_correction, sgd_correction
from fedbench.methods.lora.merge_log import MergeLog
from fedbench.runner import prepare

NEW = ["fedex-lora", "lora-fair", "fedrot-lora", "frlora", "fedloru"]


def _p(sim, r=None):
    """4 P(r) summed over the adapted matrices: the bytes of one (A, B) set."""
    r = r or sim.method.r_global
    return 4 * sum(t.factor_numel(r) for t in sim.method.targets)


def _dense(sim):
    return 4 * sum(t.d_in * t.d_out for t in sim.method.targets)


def _rot(r, seed, proper=True):
    q = torch.linalg.qr(torch.randn(r, r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]
    if proper and torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _capture_uploads(sim):
    """Wrap server_update: the uploads and the backbone/global state just before and after each round."""
    m, seen = sim.method, []
    orig = m.server_update

    def server_update(server, uploads):
        before = {k: layer.weight().detach().double().clone() for k, layer in m.layers.items()}
        g_before = {k: m.server.module("lora").delta(k).detach().double() for k in m.layers}
        out = orig(server, uploads)
        seen.append(dict(uploads=uploads, before=before, g_before=g_before))
        return out

    m.server_update = server_update
    return seen


def _mats(uploads, key):
    As = [algebra.as_matrix(u.payload["A"][key]).double() for u in uploads]
    Bs = [algebra.as_matrix(u.payload["B"][key]).double() for u in uploads]
    return [u.weight for u in uploads], As, Bs


# --- FedEx-LoRA ------------------------------------------------------------------------------------------

def test_fedex_effective_weight_is_the_exact_average_of_client_weights():
    ps, As, Bs = rand_factors(5, 4, 48, 64, seed=10)
    s = 2.0
    w0 = torch.randn(64, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ideal = sum(p * (w0 + s * b @ a) for p, a, b in zip(ps, As, Bs, strict=True))
    a_bar, b_bar = algebra.weighted_sum(ps, As), algebra.weighted_sum(ps, Bs)
    w_new = w0 + s * fedex_residual(ps, As, Bs) + s * b_bar @ a_bar
    assert (w_new - ideal).abs().max() < 1e-12
    assert (w0 + s * b_bar @ a_bar - ideal).abs().max() > 1e-2  # without the residual: FedIT's error


def test_factored_residual_is_the_dense_one_with_n_minus_1_rank_r_terms():
    ps, As, Bs = rand_factors(5, 4, 48, 64, seed=11)
    dense = fedex_residual(ps, As, Bs)
    a_bar, b_bar = algebra.weighted_sum(ps, As), algebra.weighted_sum(ps, Bs)
    cov = sum(p * (b - b_bar) @ (a - a_bar) for p, a, b in zip(ps, As, Bs, strict=True))
    b, a = factored_residual(ps, As, Bs, s=3.0)
    assert b.shape == (64, 16) and a.shape == (16, 48)  # (N - 1) r = 16: (N - 1) P(r) parameters
    assert b.numel() + a.numel() == 4 * 4 * (48 + 64)
    assert (b @ a - 3.0 * dense).abs().max() < 1e-12
    assert (dense - cov).abs().max() < 1e-12
    # the i = N term vanishes only because sum_i p_i (A_i - Ā) = 0: with unnormalised weights it does not
    b2, a2 = factored_residual([2 * p for p in ps], As, Bs)
    assert (b2 @ a2 - 2 * fedex_residual([2 * p for p in ps], As, Bs)).abs().max() > 1e-3
    one_b, one_a = factored_residual([1.0], As[:1], Bs[:1])
    assert one_b.numel() == one_a.numel() == 0  # one client: no residual


def test_fedex_engine_is_exact_and_merges_the_residual():
    sim = lora_sim("fedex-lora", rounds=2, fraction=0.6)
    seen = _capture_uploads(sim)
    for t in (1, 2):
        res = sim.run_round(t)
        assert res.metrics["agg_deviation"] < 1e-5 and res.metrics["fedex_residual_norm"] > 1e-4
    m, s = sim.method, sim.method.server.module("lora").scaling
    rec = seen[-1]
    for key, layer in m.layers.items():
        ps, As, Bs = _mats(rec["uploads"], key)
        a_bar, b_bar = algebra.weighted_sum(ps, As), algebra.weighted_sum(ps, Bs)
        ideal = sum(p * s * b @ a for p, a, b in zip(ps, As, Bs, strict=True))
        torch.testing.assert_close(layer.weight().double() - rec["before"][key], s * fedex_residual(ps, As, Bs),
                                   rtol=0, atol=1e-6)
        g = m.server.module("lora")
        torch.testing.assert_close(g.delta(key).double(), s * b_bar @ a_bar, rtol=0, atol=1e-6)
        torch.testing.assert_close(layer.weight().double() - rec["before"][key] + g.delta(key).double(), ideal,
                                   rtol=0, atol=1e-6)


def _participation(sim, rounds):
    return {t: sim.sample(t) for t in rounds}


def _missed_rounds(parts, cid, t):
    """Rounds before t whose merge client cid has not downloaded yet at round t."""
    prev = [u for u in parts if u < t and cid in parts[u]]
    since = prev[-1] if prev else 0
    return [u for u in parts if since <= u < t]


@pytest.mark.parametrize("mode", ["dense", "factored"])
def test_fedex_download_bytes_equal_the_formula(mode):
    sim = lora_sim("fedex-lora", rounds=4, fraction=0.6, fedex_residual=mode)
    parts = _participation(sim, range(1, 5))
    for t in range(1, 5):
        res = sim.run_round(t)
        for row in res.rows:
            if not row.selected:
                assert row.bytes_down == row.bytes_up == 0
                continue
            missed = _missed_rounds(parts, row.client, t)
            if mode == "dense":
                extra = _dense(sim) if missed else 0
            else:
                extra = sum((len(parts[u]) - 1) * _p(sim) for u in missed)
            assert row.bytes_up == _p(sim) + _head_bytes(sim)
            assert row.bytes_down == _p(sim) + extra + _head_bytes(sim), (mode, t, row.client, missed)


def _check_downloads_carry_missed_merges(sim, rounds, atol=2e-5):
    """Every download's merge parts add up to the backbone's change since the client's last download."""
    m = sim.method
    snap = {c.id: {k: layer.weight().detach().double().clone() for k, layer in m.layers.items()}
            for c in sim.clients}
    orig, nonzero = m.download, []

    def download(server, client, state):
        payload = orig(server, client, state)
        for k, layer in m.layers.items():
            now = layer.weight().detach().double()
            want = now - snap[client.id][k]
            got = MergeLog.delta(payload, k)
            torch.testing.assert_close(got if torch.is_tensor(got) else torch.zeros_like(want), want,
                                       rtol=0, atol=atol)
            nonzero.append(float(want.abs().max()) > 1e-6)
            snap[client.id][k] = now.clone()
        return payload

    m.download = download
    for t in range(1, rounds + 1):
        sim.run_round(t)
    assert any(nonzero) and not all(nonzero)  # some downloads carried merges, round 1's none


# one download mode per method in the default suite; the factored ones (same check, the slowest) nightly
@pytest.mark.parametrize("method,kw", [("fedex-lora", dict(fedex_residual="dense")),
                                       pytest.param("fedex-lora", dict(fedex_residual="factored"),
                                                    marks=pytest.mark.slow),
                                       pytest.param("frlora", dict(frlora_download="factored"),
                                                    marks=pytest.mark.slow),
                                       ("frlora", dict(frlora_download="dense")),
                                       ("fedloru", dict(fedloru_period=2))])
def test_downloads_carry_exactly_the_merges_the_client_missed(method, kw):
    _check_downloads_carry_missed_merges(lora_sim(method, rounds=4, fraction=0.6, **kw), 4)


@pytest.mark.parametrize("method", ["fedex-lora", "frlora", "fedloru"])
def test_a_client_is_evaluated_on_the_backbone_it_last_downloaded(method):
    extra = dict(fedloru_period=1) if method == "fedloru" else {}
    sim = lora_sim(method, rounds=1, fraction=0.6, local_steps=4, lr=1e-2, **extra)  # merges of some size
    m = sim.method
    seen = _capture_uploads(sim)
    sim.run_round(1)
    c = sim.clients[sim.sample(1)[0]]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = {k: layer.base.weight.detach().clone() for k, layer in m.layers.items()}
        got = m.predict(c, x)
        assert all(torch.equal(layer.base.weight, merged[k]) for k, layer in m.layers.items())  # restored
        on_merged = m.forward(c, x)
        for k, layer in m.layers.items():  # the backbone the client trained on
            layer.base.weight.copy_(seen[0]["before"][k].reshape(layer.base.weight.shape))
        want = m.forward(c, x)
        for k, layer in m.layers.items():
            layer.base.weight.copy_(merged[k])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (on_merged - want).abs().max() > 1e-4  # the view matters


def test_a_download_that_skips_a_merge_is_refused():
    sim = lora_sim("fedex-lora", rounds=2, fraction=0.6)
    sim.run_round(1)
    c = sim.clients[sim.sample(2)[0]]
    payload = sim.method.download(sim.server, c, sim.broadcast)
    assert "merged" in payload
    with pytest.raises(ValueError, match="needs rounds"):
        sim.method.install(c, {k: v for k, v in payload.items() if k != "merged"})


def test_fedex_reference_quirk_uniform_weights_and_transposed_residual():
    sim = lora_sim("fedex-lora", rounds=1, fraction=0.6, reference_quirks=True, partition="dirichlet", alpha=0.5)
    seen = _capture_uploads(sim)
    res = sim.run_round(1)
    s = sim.method.server.module("lora").scaling
    for key, layer in sim.method.layers.items():
        ps, As, Bs = _mats(seen[0]["uploads"], key)
        assert max(ps) - min(ps) > 1e-3  # the data weights differ, so uniform is distinguishable
        uni = [1 / 3] * 3
        torch.testing.assert_close(layer.weight().double() - seen[0]["before"][key],
                                   s * fedex_residual(uni, As, Bs).T, rtol=0, atol=1e-6)
    assert res.metrics["agg_deviation"] > 1e-2  # the transposed residual is not the exact update
    with pytest.raises(ConfigError, match="needs square targets; layer conv1 is 32 x 27"):
        lora_sim("fedex-lora", backbone="resnet", targets="conv", reference_quirks=True)
    lora_sim("fedex-lora", backbone="resnet", targets="conv")  # the paper rule fits any shape


# --- LoRA-FAIR -------------------------------------------------------------------------------------------

def _fair_problem(seed=20):
    ps, As, Bs = rand_factors(5, 4, 48, 64, seed=seed)
    return (algebra.ideal_update(ps, As, Bs, [1.0] * 5), algebra.weighted_sum(ps, As), algebra.weighted_sum(ps, Bs))


def test_fair_closed_form_is_the_minimiser():
    target, a_bar, b_bar = _fair_problem()
    for lam in (0.01, 1.0):
        d = closed_form_correction(target, a_bar, b_bar, lam)
        grad = 2 * ((b_bar + d) @ a_bar - target) @ a_bar.T + 2 * lam * d
        assert grad.abs().max() < 1e-10, lam

        def obj(x, lam=lam):
            return ((b_bar + x) @ a_bar - target).square().sum() + lam * x.square().sum()
        g = torch.Generator().manual_seed(1)
        for _ in range(5):  # any perturbation is worse
            assert obj(d + 1e-3 * torch.randn(d.shape, generator=g, dtype=d.dtype)) > obj(d)
    d0 = closed_form_correction(target, a_bar, b_bar, 0.0)
    resid = target - (b_bar + d0) @ a_bar
    assert (resid @ a_bar.T).abs().max() < 1e-10  # orthogonal to the row space of Ā
    fedit = (target - b_bar @ a_bar).norm()
    for lam in (0.0, 0.01, 10.0):
        assert (target - (b_bar + closed_form_correction(target, a_bar, b_bar, lam)) @ a_bar).norm() <= fedit
    assert resid.norm() < 0.999 * fedit  # it does improve on FedIT
    best = torch.linalg.svdvals(target)[4:].square().sum().sqrt()
    assert resid.norm() > best  # a B-only correction cannot reach the best rank-r approximation


def test_fair_sgd_lowers_the_cosine_loss():
    target, a_bar, b_bar = _fair_problem(21)

    def cos_loss(d):
        return 1 - torch.nn.functional.cosine_similarity(target.reshape(-1), ((b_bar + d) @ a_bar).reshape(-1), dim=0)
    d = sgd_correction(target, a_bar, b_bar, 0.01, steps=50, lr=1e-2)
    assert d.abs().max() > 0 and cos_loss(d) < cos_loss(torch.zeros_like(d))


@pytest.mark.parametrize("solver", ["closed-form", "sgd"])
def test_fair_engine_error_bytes_and_server_macs(solver):
    sim = lora_sim("lora-fair", rounds=2, fraction=0.6, fair_solver=solver, fair_steps=20)
    seen = _capture_uploads(sim)
    m = sim.method
    for t in (1, 2):
        res = sim.run_round(t)
        if solver == "closed-form":
            assert res.metrics["fair_error"] <= res.metrics["fedit_factor_error"]
        assert math.isclose(res.metrics["agg_deviation_abs"], res.metrics["fair_error"], rel_tol=1e-4)
        for row in res.rows:
            want = _p(sim) + _head_bytes(sim) if row.selected else 0
            assert row.bytes_up == want and row.bytes_down == want
        n = len(seen[-1]["uploads"])
        macs = sum(n * t_.d_out * m.r_global * t_.d_in + m.correction_macs(t_.d_out, m.r_global, t_.d_in)
                   for t_ in m.targets)
        assert res.server_macs == macs
    if solver == "closed-form":  # the global B is B̄ + ΔB of the closed form
        key = next(iter(m.layers))
        ps, As, Bs = _mats(seen[-1]["uploads"], key)
        a_bar, b_bar = algebra.weighted_sum(ps, As), algebra.weighted_sum(ps, Bs)
        want = b_bar + closed_form_correction(algebra.ideal_update(ps, As, Bs, [1.0] * n), a_bar, b_bar, 0.01)
        torch.testing.assert_close(m.server.module("lora").factors(key)[1].double(), want, rtol=0, atol=1e-6)


# --- FedRot-LoRA -----------------------------------------------------------------------------------------

def _rot_problem(seed=30, r=4):
    g = torch.Generator().manual_seed(seed)
    a_ref = torch.randn(r, 48, generator=g, dtype=torch.float64)
    b_ref = torch.randn(64, r, generator=g, dtype=torch.float64)
    q = _rot(r, seed + 1)
    a = q @ a_ref + 0.3 * torch.randn(r, 48, generator=g, dtype=torch.float64)  # a rotated, perturbed copy
    b = b_ref @ q.T + 0.3 * torch.randn(64, r, generator=g, dtype=torch.float64)
    return a, b, a_ref, b_ref


@pytest.mark.parametrize("on", ["A", "B"])
def test_fedrot_rotation_is_proper_keeps_the_product_and_is_the_procrustes_optimum(on):
    a, b, a_ref, b_ref = _rot_problem()
    r = alignment(a, b, a_ref, b_ref, on)
    eye = torch.eye(4, dtype=torch.float64)
    assert (r.T @ r - eye).abs().max() < 1e-12 and abs(float(torch.linalg.det(r)) - 1) < 1e-12
    a2, b2 = rotate(a, b, r)
    assert (b2 @ a2 - b @ a).abs().max() < 1e-12

    def dist(x, y):
        return float(((x - a_ref) if on == "A" else (y - b_ref)).norm())
    best = dist(a2, b2)
    assert best < 0.5 * dist(a, b)  # much closer than unaligned
    for seed in range(30):  # no other proper rotation does better
        q = _rot(4, 100 + seed)
        assert best <= dist(*rotate(a, b, q)) + 1e-12


def test_fedrot_det_fix_gives_a_proper_rotation_where_the_optimum_is_a_reflection():
    a, b, a_ref, b_ref = _rot_problem(31)
    flip = torch.diag(torch.tensor([1.0, 1.0, 1.0, -1.0], dtype=torch.float64))
    a = flip @ a_ref  # the unconstrained optimum is the reflection
    assert torch.linalg.det(procrustes(a @ a_ref.T, proper=False)) < 0
    r = alignment(a, b, a_ref, b_ref, "A")
    assert abs(float(torch.linalg.det(r)) - 1) < 1e-12


@pytest.mark.parametrize("on", ["A", "B"])
def test_fedrot_result_does_not_depend_on_a_pre_rotation_of_the_input(on):
    a, b, a_ref, b_ref = _rot_problem(32)
    out = rotate(a, b, alignment(a, b, a_ref, b_ref, on))
    for seed in range(5):
        q = _rot(4, 200 + seed)  # proper rotations
        a_q, b_q = q @ a, b @ q.T
        out_q = rotate(a_q, b_q, alignment(a_q, b_q, a_ref, b_ref, on))
        assert (out_q[0] - out[0]).abs().max() < 1e-12 and (out_q[1] - out[1]).abs().max() < 1e-12
        # any orthogonal matrix, reflections included, when the rotation need not be proper
        q = _rot(4, 300 + seed, proper=False)
        base = rotate(a, b, alignment(a, b, a_ref, b_ref, on, proper=False))
        a_q, b_q = q @ a, b @ q.T
        out_q = rotate(a_q, b_q, alignment(a_q, b_q, a_ref, b_ref, on, proper=False))
        assert (out_q[0] - base[0]).abs().max() < 1e-12
    # FedIT's average of the unaligned factors does depend on it
    ps, As, Bs = rand_factors(3, 4, 48, 64, seed=33)
    q = _rot(4, 7)
    assert (algebra.weighted_sum(ps, [q @ As[0]] + As[1:]) - algebra.weighted_sum(ps, As)).abs().max() > 1e-2


def test_fedrot_soft_rotation_interpolates():
    a, b, a_ref, b_ref = _rot_problem(34)
    eye = torch.eye(4, dtype=torch.float64)
    assert (alignment(a, b, a_ref, b_ref, "A", lam=0.0) - eye).abs().max() < 1e-12
    hard = alignment(a, b, a_ref, b_ref, "A", lam=1.0)
    soft = alignment(a, b, a_ref, b_ref, "A", lam=0.5)
    assert (soft.T @ soft - eye).abs().max() < 1e-12 and abs(float(torch.linalg.det(soft)) - 1) < 1e-12
    assert 0 < (soft - eye).norm() < (hard - eye).norm()
    assert (alignment(a, b, a_ref, b_ref, "A", lam=3.0) - hard).abs().max() < 1e-12  # λ >= 1: hard


def test_fedrot_engine_uploads_rotated_factors_and_is_invariant_to_client_rotations():
    results = []
    for pre in (False, True):
        sim = lora_sim("fedrot-lora", rounds=3, fraction=1.0)
        m = sim.method
        orig_train = m.train

        def train(client, orig_train=orig_train, pre=pre):
            orig_train(client)
            ad = client.module("lora")
            with torch.no_grad():
                for key in ad.lora_A:
                    a, b = ad.factors(key)
                    if pre and client.round > 1:  # an equivalent client: the same B A in another basis
                        # (not in round 1, which aligns nothing, as the official code)
                        q = _rot(a.shape[0], 1000 * client.round + client.id).float()
                        ad.lora_A[key].weight.copy_(q @ a)
                        ad.lora_B[key].weight.copy_(b @ q.T)

        m.train = train
        for t in (1, 2, 3):  # round 1 aligns nothing, round 2 A, round 3 B
            res = sim.run_round(t)
            for row in res.rows:
                assert row.bytes_up == row.bytes_down == _p(sim) + _head_bytes(sim)
        results.append({k: v.detach().clone() for k, v in m.server.module("lora").state_dict().items()})
        assert res.metrics["agg_deviation_abs"] == pytest.approx(res.metrics["fedit_factor_error"], rel=1e-3)
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-4, atol=2e-6)


def test_fedrot_upload_has_the_trained_product():
    sim = lora_sim("fedrot-lora", rounds=1, fraction=0.6)
    m = sim.method
    orig_train, trained = m.train, {}

    def train(client):
        orig_train(client)
        trained[client.id] = {k: client.module("lora").delta(k).detach().double().clone() for k in m.layers}

    m.train = train
    seen = _capture_uploads(sim)
    sim.run_round(1)
    s = m.server.module("lora").scaling
    moved = 0.0
    for u in seen[0]["uploads"]:
        for k in m.layers:
            a, b = (algebra.as_matrix(u.payload[f][k]).double() for f in ("A", "B"))
            torch.testing.assert_close(s * b @ a, trained[u.client][k], rtol=0, atol=1e-6)
            moved = max(moved, float((a - algebra.as_matrix(sim.clients[u.client].module("lora").lora_A[k].weight
                                                        .detach()).double()).abs().max()))
    assert moved == 0.0  # the client keeps the rotated factors it sent


# --- FRLoRA ----------------------------------------------------------------------------------------------

def test_frlora_principal_init_is_exact_and_merge_factors_give_the_update():
    w0 = torch.randn(64, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(40))
    s = 2.0
    b0, a0 = principal_init(w0, 4, s)
    w_res = w0 - s * b0 @ a0
    assert (w_res + s * b0 @ a0 - w0).abs().max() < 1e-12
    u, sv, vh = torch.linalg.svd(w0, full_matrices=False)
    assert (s * b0 @ a0 - (u[:, :4] * sv[:4]) @ vh[:4]).abs().max() < 1e-12  # the principal subspace
    assert (b0.norm(dim=0) - a0.norm(dim=1)).abs().max() < 1e-12  # singular values split evenly
    ps, As, Bs = rand_factors(3, 4, 48, 64, seed=41)
    a_bar, b_bar = algebra.weighted_sum(ps, As), algebra.weighted_sum(ps, Bs)
    b, a = merge_factors(a_bar, b_bar, a0, b0, s)
    assert b.shape == (64, 8) and a.shape == (8, 48)  # 2 P(r)
    assert (b @ a - s * (b_bar @ a_bar - b0 @ a0)).abs().max() < 1e-12


def _frlora_sim(**kw):
    cfg = lora_config("frlora", rounds=3, fraction=0.6, **kw)
    p = prepare(cfg, None, "cpu")
    from fedbench.lora.layers import find_targets
    w0 = {t.key: p.backbone.get_submodule(t.name).weight.detach().double().reshape(t.d_out, -1).clone()
          for t in find_targets(p.backbone, "attn")}
    return Simulation(cfg, p.data, p.device, prefetch=False, backbone=p.backbone), w0


def test_frlora_engine_init_round_update_deviation_and_bytes():
    sim, w0 = _frlora_sim()
    m = sim.method
    g = m.server.module("lora")
    s = g.scaling
    for key, layer in m.layers.items():  # at init the effective weight is W0
        torch.testing.assert_close(layer.weight().double() + g.delta(key).double(), w0[key], rtol=0, atol=1e-5)
        assert g.delta(key).norm() > 0.1 * w0[key].norm()  # the principal part is a real share of W0
    seen = _capture_uploads(sim)
    starts = []
    orig_train = m.train

    def train(client):
        starts.append({k: tuple(x.detach().double().clone() for x in client.module("lora").factors(k))
                       for k in m.layers})
        orig_train(client)

    m.train = train
    parts = _participation(sim, (1, 2, 3))
    for t in (1, 2, 3):
        res = sim.run_round(t)
        rec = seen[-1]
        for key, layer in m.layers.items():
            ps, As, Bs = _mats(rec["uploads"], key)
            a0, b0 = (x.double() for x in g.factors(key))
            a_bar, b_bar = algebra.weighted_sum(ps, As), algebra.weighted_sum(ps, Bs)
            torch.testing.assert_close(layer.weight().double(), rec["before"][key] + s * (b_bar @ a_bar - b0 @ a0),
                                       rtol=0, atol=1e-5)
        assert math.isclose(res.metrics["agg_deviation_abs"], res.metrics["fedit_factor_error"], rel_tol=1e-4)
        for row in res.rows:
            if row.selected:
                missed = _missed_rounds(parts, row.client, t)
                assert row.bytes_down == 2 * _p(sim) * len(missed) + _head_bytes(sim), (t, row.client)
                assert row.bytes_up == _p(sim) + _head_bytes(sim)
    assert res.server_macs > 0
    for st in starts:  # every client, every round, starts from the same fixed (A0, B0)
        for key in m.layers:
            a0, b0 = (x.double() for x in g.factors(key))
            assert torch.equal(st[key][0], a0) and torch.equal(st[key][1], b0)


def test_frlora_quirk_uses_uniform_weights_and_setup_svd_is_metered():
    sim, _ = _frlora_sim(reference_quirks=True, partition="dirichlet", alpha=0.5)
    seen = _capture_uploads(sim)
    res = sim.run_round(1)
    g = sim.method.server.module("lora")
    key, layer = next(iter(sim.method.layers.items()))
    ps, As, Bs = _mats(seen[0]["uploads"], key)
    assert max(ps) - min(ps) > 1e-3  # the data weights differ, so uniform is distinguishable
    uni = [1 / 3] * 3
    a0, b0 = (x.double() for x in g.factors(key))
    want = seen[0]["before"][key] + g.scaling * (algebra.weighted_sum(uni, Bs) @ algebra.weighted_sum(uni, As)
                                                 - b0 @ a0)
    torch.testing.assert_close(layer.weight().double(), want, rtol=0, atol=1e-5)
    from fedbench.metering.algebra import svd_macs
    svds = sum(svd_macs(t.d_out, t.d_in) for t in sim.method.targets)
    assert res.server_macs > svds
    assert sim.run_round(2).server_macs < svds  # the set-up SVDs are counted once, in round 1


# --- FedLoRU ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quirk", [False, True])
def test_fedloru_merge_round(quirk):
    sim = lora_sim("fedloru", rounds=2, fraction=0.6, fedloru_period=2, reference_quirks=quirk)
    seen = _capture_uploads(sim)
    m = sim.method
    g = m.server.module("lora")
    s = g.scaling
    r1 = sim.run_round(1)  # no merge
    for key, layer in m.layers.items():
        assert torch.equal(layer.weight().double(), seen[0]["before"][key])
    assert r1.server_macs == 0
    sim.run_round(2)  # merge
    for key, layer in m.layers.items():
        ps, As, Bs = _mats(seen[1]["uploads"], key)
        a_bar, b_bar = algebra.weighted_sum(ps, As), algebra.weighted_sum(ps, Bs)
        fedit = s * b_bar @ a_bar
        torch.testing.assert_close(layer.weight().double(), seen[1]["before"][key] + fedit, rtol=0, atol=1e-6)
        a, b = (x.double() for x in g.factors(key))
        eff = layer.weight().double() + s * b @ a
        if quirk:  # the plain accumulate: the update counts twice
            torch.testing.assert_close(eff, seen[1]["before"][key] + 2 * fedit, rtol=0, atol=1e-6)
            torch.testing.assert_close(b, b_bar, rtol=0, atol=1e-6)
        else:  # reset, and the global effective weight is continuous across the merge
            assert torch.equal(b, torch.zeros_like(b)) and a.abs().max() > 0
            assert (a - a_bar).abs().max() > 1e-2
            torch.testing.assert_close(eff, seen[1]["before"][key] + fedit, rtol=0, atol=1e-6)


def test_fedloru_reset_is_seeded_and_download_bytes():
    sims = [lora_sim("fedloru", rounds=4, fraction=0.6, fedloru_period=2) for _ in range(2)]
    parts = _participation(sims[0], range(1, 5))
    for t in range(1, 5):
        res = sims[0].run_round(t)
        sims[1].run_round(t)
        for row in res.rows:
            if row.selected:
                merges = [u for u in _missed_rounds(parts, row.client, t) if u % 2 == 0]
                assert row.bytes_down == _p(sims[0]) * (1 + len(merges)) + _head_bytes(sims[0]), (t, row.client)
                assert row.bytes_up == _p(sims[0]) + _head_bytes(sims[0])
    for a, b in zip(sims[0].server.module("lora").state_dict().values(),
                    sims[1].server.module("lora").state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_fedloru_with_the_default_period_is_fedit_in_a_short_run():
    a, b = lora_sim("fedit", rounds=3), lora_sim("fedloru", rounds=3)
    assert b.method.hp.fedloru_period == 50
    for t in (1, 2, 3):
        a.run_round(t)
        b.run_round(t)
    for ta, tb in zip(a.server.module("lora").state_dict().values(), b.server.module("lora").state_dict().values(),
                      strict=True):
        assert torch.equal(ta, tb)


# --- bad input, listing, smoke ------------------------------------------------------------------------------

@pytest.mark.parametrize("method,flag,value,allowed", [
    ("fedex-lora", "fedex_residual", "sparse", "dense, factored"),
    ("lora-fair", "fair_solver", "adam", "closed-form, sgd"),
    ("fedrot-lora", "fedrot_align", "C", "alternate, A, B"),
    ("frlora", "frlora_download", "stack", "factored, dense"),
])
def test_bad_flag_values_are_one_line_config_errors(method, flag, value, allowed):
    with pytest.raises(ConfigError, match=f"got '{value}'; choose from: {allowed}") as e:
        lora_config(method, **{flag: value})
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="--fedloru-period .* must be >= 1"):
        lora_config("fedloru", fedloru_period=0)
    with pytest.raises(ConfigError, match="--fair-lambda .* must be >= 0"):
        lora_config("lora-fair", fair_lambda=-1)


def test_list_methods_shows_papers_and_reconstruction_flags(capsys):
    from fedbench.cli import main
    with pytest.raises(SystemExit) as e:
        main(["list", "methods"])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    want = {"fedex-lora": ["--fedex-residual"], "lora-fair": ["--fair-solver", "--fair-lambda"],
            "fedrot-lora": [], "frlora": ["--frlora-download"], "fedloru": []}
    blocks = {}
    for block in out.split("\n\n"):
        head = block.strip().split(" ", 1)[0]
        blocks[head] = block
    for name, flags in want.items():
        block = blocks[name]
        assert "paper: " in block
        if flags:
            assert f"reconstruction flags: {', '.join(flags)}" in block, block
        else:
            assert "reconstruction flags" not in block


SMOKE = {"fedex-lora": {}, "lora-fair": {}, "fedrot-lora": {}, "frlora": {}, "fedloru": dict(fedloru_period=2)}


@pytest.mark.parametrize("method", NEW)
def test_five_round_smoke_run(method):
    """Dirichlet(0.5) split of the synthetic set, as tests/test_lora_family.py's smoke runs; every round's
    bytes equal the formula's lower bound (P(r) + head up, at least that down) and the numbers are finite."""
    sim = lora_sim(method, rounds=5, eval_every=5, local_steps=4, lr=3e-3, partition="dirichlet", alpha=0.5,
                   **SMOKE[method])
    before = [sim.evaluate(c) for c in sim.clients]
    first = sum(c / n for c, n in before) / len(before)
    rows = sim.run()
    for r in rows:
        assert all(math.isfinite(v) for v in r.metrics.values()), (method, r.metrics)
        for row in r.rows:
            assert row.bytes_up == _p(sim) + _head_bytes(sim)
            assert row.bytes_down >= (_p(sim) if method != "frlora" else 0) + _head_bytes(sim)
    last = rows[-1].accuracy()[0]
    assert last > 0.55 and last > first + 0.2, (method, first, last)
    assert rows[-1].global_accuracy() > 0.5, (method, rows[-1].global_accuracy())
