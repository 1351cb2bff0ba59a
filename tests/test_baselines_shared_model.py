"""FML and FedKD (spec C.7, C.8): payload shapes and bytes, local losses against a hand computation,
server rules on hand-made uploads, FedKD's truncated SVD (energy, minimal rank, schedule, exact round
trip of a low-rank update), reproducibility and a synthetic smoke run."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_sim, own_class_guess, small_config

from baselines.fedkd import (
    clip_per_module,
    compress,
    decompress,
    energy_rank,
    fedkd_losses,
    kl_elementwise_mean,
    svd_factors,
)
from baselines.fml import fml_losses
from fedbench.metering.comm import payload_bytes, payload_numel
from fedbench.methods.base import Upload, snapshot
from fedbench.models.cnn import cnn_spec

K = 10
CNN5_PARAMS = 670_058  # spec C.1, K = 10
CNN5_SHAPES = {k: v.shape for k, v in cnn_spec("cnn5", K).build().named_parameters()}


def spy_server(sim) -> list:
    """Record (uploads, broadcast) of every server_update call."""
    seen = []
    orig = sim.method.server_update

    def spy(server, ups):
        out = orig(server, ups)
        seen.append((list(ups), out))
        return out

    sim.method.server_update = spy
    return seen


# --- hand computations --------------------------------------------------------------------------

def _softmax(z):
    e = [math.exp(v) for v in z]
    s = sum(e)
    return [v / s for v in e]


def _ce(z, y):
    return -math.log(_softmax(z)[y])


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def _mean(xs):
    return sum(xs) / len(xs)


LOGITS_A = [[1.0, 2.0, 0.5], [0.3, -1.0, 2.0]]
LOGITS_B = [[0.0, 1.0, 1.0], [2.0, 0.0, -1.0]]
Y = [1, 2]


# --- FML ----------------------------------------------------------------------------------------

def test_cnn5_size_matches_spec():
    assert sum(s.numel() for s in CNN5_SHAPES.values()) == CNN5_PARAMS


def test_fml_payload_is_the_cnn5_meme_both_ways():
    sim = make_sim(small_config(method="fml", rounds=1, fraction=0.6))
    seen = spy_server(sim)
    before = [snapshot(c.module("model")) for c in sim.clients]
    res = sim.run_round(1)
    for c, b in zip(sim.clients, before, strict=True):  # only the selected private models trained
        changed = any(not torch.equal(v, c.module("model").state_dict()[k]) for k, v in b.items())
        assert changed == res.rows[c.id].selected
    c = sim.clients[1]  # evaluation uses the private model alone
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(sim.method.predict(c, x), c.module("model")(x)[0])
    per = CNN5_PARAMS * 4
    assert sum(r.selected for r in res.rows) == 3
    for r in res.rows:
        assert r.bytes_up == (per if r.selected else 0)
        assert r.bytes_down == (per if r.selected else 0)
        assert (r.train_macs > 0) == r.selected
    ups, bc = seen[0]
    for u in ups:
        assert {k: v.shape for k, v in u.payload.items()} == CNN5_SHAPES
    assert {k: v.shape for k, v in bc.items()} == CNN5_SHAPES
    assert payload_numel(bc) == CNN5_PARAMS


def test_fml_losses_match_hand_computation():
    alpha, beta = 0.3, 0.7
    a = torch.tensor(LOGITS_A, requires_grad=True)
    b = torch.tensor(LOGITS_B, requires_grad=True)
    l_local, l_meme = fml_losses(a, b, torch.tensor(Y), alpha, beta)
    pa = [_softmax(z) for z in LOGITS_A]
    pb = [_softmax(z) for z in LOGITS_B]
    exp_local = (alpha * _mean([_ce(z, y) for z, y in zip(LOGITS_A, Y, strict=True)])
                 + (1 - alpha) * _mean([_kl(q, p) for p, q in zip(pa, pb, strict=True)]))
    exp_meme = (beta * _mean([_ce(z, y) for z, y in zip(LOGITS_B, Y, strict=True)])
                + (1 - beta) * _mean([_kl(p, q) for p, q in zip(pa, pb, strict=True)]))
    assert l_local.item() == pytest.approx(exp_local, rel=1e-5)
    assert l_meme.item() == pytest.approx(exp_meme, rel=1e-5)
    # the other model's output is a detached target
    l_local.backward()
    assert b.grad is None and a.grad is not None


def test_fml_losses_in_float64_both_forms_by_hand():
    """Two samples, three classes, a = 0.3 and b = 0.6 (so that swapped weights show). p: the private
    model's softmax, q: the meme's. Per sample KL(q || p) = sum_j q_j log(q_j / p_j).
      original: L_local = a mean CE(p) + (1 - a) (KL_1(q||p) + KL_2(q||p)) / 2          (per sample, batchmean)
      htfllib:  L_local = a mean CE(p) + (1 - a) (KL_1(q||p) + KL_2(q||p)) / (2 x 3)    (element-wise mean)
    and L_meme the same with b, CE(q) and KL(p || q)."""
    alpha, beta = 0.3, 0.6
    zf = [[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]]
    zm = [[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]]
    y = [0, 2]
    p, q = [_softmax(z) for z in zf], [_softmax(z) for z in zm]
    ce_f = (_ce(zf[0], 0) + _ce(zf[1], 2)) / 2
    ce_m = (_ce(zm[0], 0) + _ce(zm[1], 2)) / 2
    kl_qp = _kl(q[0], p[0]) + _kl(q[1], p[1])  # summed over the batch
    kl_pq = _kl(p[0], q[0]) + _kl(p[1], q[1])
    want = {"original": (alpha * ce_f + (1 - alpha) * kl_qp / 2, beta * ce_m + (1 - beta) * kl_pq / 2),
            "htfllib": (alpha * ce_f + (1 - alpha) * kl_qp / 6, beta * ce_m + (1 - beta) * kl_pq / 6)}
    for form, (want_local, want_meme) in want.items():
        f = torch.tensor(zf, dtype=torch.float64, requires_grad=True)
        m = torch.tensor(zm, dtype=torch.float64, requires_grad=True)
        l_local, l_meme = fml_losses(f, m, torch.tensor(y), alpha, beta, form)
        assert l_local.item() == pytest.approx(want_local, rel=1e-12, abs=0)
        assert l_meme.item() == pytest.approx(want_meme, rel=1e-12, abs=0)
        l_local.backward()
        if form == "original":
            assert m.grad is None  # the meme's output is a detached target
            continue
        # htfllib: L_local's KL reaches the meme. d/dz_j of sum_i q_i (log q_i - log p_i), q = softmax(z):
        # q_j (d_j - sum_i q_i d_i) with d = log q - log p; times (1 - a) / (2 x 3)
        for b in range(2):
            d = [math.log(qi / pi) for qi, pi in zip(q[b], p[b], strict=True)]
            mean_d = sum(qi * di for qi, di in zip(q[b], d, strict=True))
            grad = [(1 - alpha) / 6 * q[b][j] * (d[j] - mean_d) for j in range(3)]
            assert m.grad[b].tolist() == pytest.approx(grad, rel=1e-10, abs=1e-15)


def test_fml_htfllib_form_steps_both_models_on_both_losses():
    """One batch of client 0 by hand: under htfllib each model's step is the SGD step of the gradient of
    L_local + L_meme (its own loss and the other's KL term), each clipped on its own."""
    from baselines.fml import fml_losses as losses
    from fedbench.methods.base import load
    cfg = small_config(method="fml", rounds=1, fml_kl="htfllib", batch_size=500, momentum=0.0, weight_decay=0.0,
                       augment="none", lr=0.1)
    sim = make_sim(cfg)
    c = sim.clients[0]
    meme0 = snapshot(sim.server.module("meme"))
    model, meme = c.module("model"), c.module("meme")
    load(meme, meme0)
    f0 = {k: v.clone() for k, v in model.state_dict().items()}
    c.round, c.streams = 1, 0
    (x, y), = list(sim.train_batches(c, epochs=1, augment=False, shuffle=True, count=False))
    lf, lm = losses(model(x)[0], meme(x)[0], y, 0.5, 0.5, "htfllib")
    (lf + lm).backward()
    gf = {n: q.grad.clone() for n, q in model.named_parameters()}
    gm = {n: q.grad.clone() for n, q in meme.named_parameters()}
    nf = torch.linalg.vector_norm(torch.stack([g.norm() for g in gf.values()]))
    nm = torch.linalg.vector_norm(torch.stack([g.norm() for g in gm.values()]))
    sf, sm = min(1.0, 50.0 / (nf.item() + 1e-6)), min(1.0, 50.0 / (nm.item() + 1e-6))
    model.zero_grad(set_to_none=True)
    meme.zero_grad(set_to_none=True)
    model.load_state_dict(f0)
    c.round, c.streams = 1, 0
    sim.method.client_update(c, meme0)
    for n, q in model.named_parameters():
        torch.testing.assert_close(q.detach(), f0[n] - 0.1 * sf * gf[n], rtol=1e-4, atol=1e-6)
    for n, q in meme.named_parameters():
        torch.testing.assert_close(q.detach(), meme0[n] - 0.1 * sm * gm[n], rtol=1e-4, atol=1e-6)
    sim.close()


def test_fml_kl_form_is_named_and_leaves_default_run_ids_alone():
    from baselines.fml import FML
    assert FML.label(FML.Params()).endswith("KL batchmean)")  # the default label as stored runs have it
    assert "not detached: HtFLlib" in FML.label(FML.Params(fml_kl="htfllib"))
    default, htf = small_config(method="fml"), small_config(method="fml", fml_kl="htfllib")
    assert "fml_kl" not in default.canonical_json() and '"fml_kl":"htfllib"' in htf.canonical_json()
    assert default.method_params["fml_kl"] == "original"


def test_a_stored_fml_run_without_the_kl_key_reads_as_original(tmp_path):
    """Reports: FML runs stored before --fml-kl existed are the original form, a variant apart from htfllib."""
    import json

    from test_summaries import Round, Row, add_run

    from fedbench.report.frame import add_names, run_frame
    from fedbench.store import Store
    store = Store(tmp_path / "s.sqlite")
    rounds = [Round(1, [Row(c, True, correct=5, total=10) for c in range(2)])]
    add_run(store, "old", rounds, method="fml", protocol="round-end")
    add_run(store, "htf", rounds, method="fml", protocol="round-end", fml_kl="htfllib")
    cfg = json.loads(store.db.execute("SELECT config_json FROM runs WHERE run_id='old'").fetchone()[0])
    del cfg["method_params"]["fml_kl"]  # as canonical_json stores a default run
    store.db.execute("UPDATE runs SET config_json=? WHERE run_id='old'", (json.dumps(cfg),))
    store.db.commit()
    df = add_names(run_frame(store)[0]).set_index("run_id")
    assert df.loc["old", "variant"] == "fml (fml_kl=original)" and df.loc["htf", "variant"] == "fml (fml_kl=htfllib)"


def test_fml_server_is_unweighted_mean():
    sim = make_sim(small_config(method="fml", rounds=1))
    ones = {k: torch.ones(s) for k, s in CNN5_SHAPES.items()}
    ups = [Upload(0, 0.1, ones), Upload(1, 0.9, {k: 3 * v for k, v in ones.items()})]
    g = sim.method.server_update(sim.server, ups)
    for k, v in g.items():
        torch.testing.assert_close(v, torch.full(CNN5_SHAPES[k], 2.0))
    torch.testing.assert_close(snapshot(sim.server.module("meme")), g)




# --- FedKD --------------------------------------------------------------------------------------

def code_numel(code, shape) -> int:
    """Numbers in one tensor's code, recomputed from the payload's own shapes (checked against the
    dense shape): dense tensor, factor pair A (m x r), B (r x n), or one pair per kernel position."""
    if isinstance(code, torch.Tensor):
        assert code.shape == shape
        return code.numel()
    if isinstance(code, dict):
        (m, r), (r2, n) = code["a"].shape, code["b"].shape
        assert r == r2 and m == shape[0] and n == math.prod(shape[1:])
        return r * (m + n)
    out, inp, kh, kw = shape
    assert len(code) == kh * kw
    total = 0
    for pair in code:
        (m, r), (r2, n) = pair["a"].shape, pair["b"].shape
        assert (m, n, r) == (out, inp, r2)
        total += r * (m + n)
    return total


def payload_code_numel(code: dict) -> int:
    assert set(code) == set(CNN5_SHAPES)
    return sum(code_numel(c, CNN5_SHAPES[k]) for k, c in code.items())


@pytest.mark.parametrize("mode", ["update", "params"])
def test_fedkd_bytes_are_the_factors_sent(mode):
    sim = make_sim(small_config(method="fedkd", fraction=0.6, fedkd_compress=mode))
    seen = spy_server(sim)
    results = [sim.run_round(1), sim.run_round(2)]
    dense = 4 * CNN5_PARAMS
    for t, (res, (ups, bc)) in enumerate(zip(results, seen, strict=True)):
        (key,) = bc
        assert key == mode
        down = 4 * payload_code_numel(bc[key]) + (dense if t == 0 else 0)  # round 1: the initial mentee
        up = {u.client: 4 * payload_code_numel(u.payload) for u in ups}
        assert all(0 < v <= dense for v in up.values())
        assert 4 * payload_code_numel(bc[key]) <= dense
        for r in res.rows:
            assert r.bytes_up == (up[r.client] if r.selected else 0)
            assert r.bytes_down == down  # push = "all": every client receives the broadcast
        assert payload_bytes(bc) == 4 * payload_code_numel(bc[key])
    # SVD compression is effective on the large matrices of an update (fc1 is 500 x 800)
    if mode == "update":
        assert all(isinstance(u.payload["fc1.weight"], dict) for u in seen[0][0])
    # one global mentee: every client and the server hold the same one
    ref = snapshot(sim.server.module("mentee"))
    for c in sim.clients:
        got = snapshot(c.module("mentee"))
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    w = sim.clients[0].module("W_h")
    assert w.weight.shape == (500, 500) and w.bias is None


def test_fedkd_update_mode_adds_broadcast_to_previous_mentee():
    sim = make_sim(small_config(method="fedkd", rounds=2, fraction=0.6))
    seen = spy_server(sim)
    sim.run_round(1)
    before = snapshot(sim.clients[0].module("mentee"))
    sim.run_round(2)
    _, bc = seen[1]
    delta = decompress(bc["update"], CNN5_SHAPES)
    after = snapshot(sim.clients[0].module("mentee"))
    for k in before:
        torch.testing.assert_close(after[k], before[k] + delta[k], rtol=0, atol=1e-6)


@pytest.mark.filterwarnings("ignore:reduction")
def test_fedkd_kl_is_the_elementwise_mean_of_the_reference_codes():
    """nn.KLDivLoss() (reduction "mean") in wuch15/FedKD and HtFLlib: sum over batch and classes / (B K)."""
    target = torch.tensor(LOGITS_A, dtype=torch.float64)
    logits = torch.tensor(LOGITS_B, dtype=torch.float64)
    p = [_softmax(z) for z in LOGITS_A]
    q = [_softmax(z) for z in LOGITS_B]
    total = sum(_kl(pi, qi) for pi, qi in zip(p, q, strict=True))
    got = kl_elementwise_mean(target, logits).item()
    assert got == pytest.approx(total / (2 * 3), rel=1e-12)
    assert got != pytest.approx(total / 2, rel=1e-3)  # not batchmean (3x larger here)
    ref = torch.nn.KLDivLoss(reduction="mean")(F.log_softmax(logits, 1), F.softmax(target, 1))
    assert got == pytest.approx(ref.item(), rel=1e-12)


def test_fedkd_losses_match_hand_computation():
    h_t = [[0.5, 1.0, 0.0, 2.0], [1.5, 0.0, 0.5, 1.0]]
    proj = [[0.0, 1.5, 0.5, 1.0], [1.0, 0.5, 0.0, 2.0]]
    args = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (LOGITS_A, h_t, LOGITS_B, proj)]
    pt = [_softmax(z) for z in LOGITS_A]
    ps = [_softmax(z) for z in LOGITS_B]
    ce_t = _mean([_ce(z, y) for z, y in zip(LOGITS_A, Y, strict=True)])
    ce_s = _mean([_ce(z, y) for z, y in zip(LOGITS_B, Y, strict=True)])
    task = ce_t + ce_s
    mse = _mean([(a - b) ** 2 for ra, rb in zip(h_t, proj, strict=True) for a, b in zip(ra, rb, strict=True)])
    kl_st = [_kl(s, t) for s, t in zip(ps, pt, strict=True)]  # KL(mentee || mentor), target first
    kl_ts = [_kl(t, s) for s, t in zip(ps, pt, strict=True)]
    div = len(Y) * 3  # element-wise mean over batch x classes
    l_t, l_s = fedkd_losses(*args, torch.tensor(Y))
    assert l_t.item() == pytest.approx(ce_t + sum(kl_st) / div / task + mse / task, rel=1e-12)
    assert l_s.item() == pytest.approx(ce_s + sum(kl_ts) / div / task + mse / task, rel=1e-12)
    # nothing is detached (as in both reference codes): L_t reaches the mentee's logits
    l_t.backward()
    assert args[2].grad is not None and args[3].grad is not None


def test_fedkd_clip_is_per_module():
    """Each module's gradient norm is clipped on its own (HtFLlib): a small gradient stays as it is even
    when another module's is huge, which one global clip would scale down too."""
    g = torch.Generator().manual_seed(0)
    groups = [[torch.zeros(4, 3, dtype=torch.float64, requires_grad=True), torch.zeros(3, dtype=torch.float64,
                                                                                      requires_grad=True)],
              [torch.zeros(5, dtype=torch.float64, requires_grad=True)],
              [torch.zeros(2, 2, dtype=torch.float64, requires_grad=True)]]
    norms = [30.0, 4.0, 100.0]
    for params, n in zip(groups, norms, strict=True):
        raw = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
        scale = n / torch.sqrt(sum(r.square().sum() for r in raw))
        for p, r in zip(params, raw, strict=True):
            p.grad = r * scale
    before = [[p.grad.clone() for p in params] for params in groups]
    clip_per_module(groups, 10.0)

    def norm(params):
        return float(torch.sqrt(sum(p.grad.square().sum() for p in params)))

    assert [norm(ps) for ps in groups] == pytest.approx([10.0, 4.0, 10.0], rel=1e-6)
    for params, old in zip(groups[1:2], before[1:2], strict=True):  # the small one untouched
        assert all(torch.equal(p.grad, o) for p, o in zip(params, old, strict=True))
    for params, old, n in ((groups[0], before[0], 30.0), (groups[2], before[2], 100.0)):  # same direction
        for p, o in zip(params, old, strict=True):
            torch.testing.assert_close(p.grad, o * (10.0 / n), rtol=1e-5, atol=0)
    clip_per_module(groups, 0.0)  # 0 = off
    assert [norm(ps) for ps in groups] == pytest.approx([10.0, 4.0, 10.0], rel=1e-6)


def test_fedkd_training_clips_mentor_mentee_and_w_h_separately(monkeypatch):
    import baselines.fedkd as fedkd_mod
    sim = make_sim(small_config(method="fedkd", rounds=1, fraction=0.2, fedkd_clip=0.05, clip=0))
    (k,) = sim.sample(1)
    c = sim.clients[k]
    want = [{id(p) for p in c.module(n).parameters()} for n in ("model", "mentee", "W_h")]
    seen = []
    orig = fedkd_mod.clip_per_module

    def spy(groups, max_norm):
        raw = [float(torch.sqrt(sum(p.grad.square().sum() for p in ps))) for ps in groups]
        orig(groups, max_norm)
        after = [float(torch.sqrt(sum(p.grad.square().sum() for p in ps))) for ps in groups]
        seen.append(([{id(p) for p in ps} for ps in groups], max_norm, raw, after))

    monkeypatch.setattr(fedkd_mod, "clip_per_module", spy)
    sim.run_round(1)
    assert seen
    for ids, max_norm, raw, after in seen:
        assert ids == want and max_norm == 0.05
        assert all(a <= 0.05 * (1 + 1e-4) for a in after)
        assert all(a == pytest.approx(min(r, 0.05), rel=1e-4) for r, a in zip(raw, after, strict=True))
    assert any(sum(r > 0.05 for r in raw) >= 1 for _, _, raw, _ in seen)


def _decaying(m, n, rate, seed):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g))
    s = rate ** torch.arange(min(m, n), dtype=torch.float32)
    return (u * s) @ v.T


def test_fedkd_truncation_keeps_the_energy_with_the_smallest_rank():
    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(40, 30, generator=g), _decaying(60, 25, 0.8, 1), _decaying(16, 3, 0.5, 2)]
    for mat in mats:
        _, s, _ = torch.linalg.svd(mat, full_matrices=False)
        e = s.double().square()
        for T in (0.5, 0.9, 0.95, 0.96, 0.98, 0.999):
            f = svd_factors(mat, T)
            r = f["a"].shape[1]
            assert r == energy_rank(s, T)
            assert e[:r].sum() >= T * e.sum()                 # keeps at least the stated energy
            assert r == 1 or e[:r - 1].sum() < T * e.sum()    # and no smaller rank does
            kept = (f["a"] @ f["b"]).square().sum() / mat.square().sum()
            assert kept >= T - 1e-4
    assert energy_rank(torch.zeros(5), 0.95) == 0


def test_fedkd_rank_non_decreasing_over_the_schedule():
    """Spec B.6: as T(t) rises from 0.95 to 0.98, the SVD rank never falls."""
    R = 40
    sim = make_sim(small_config(method="fedkd", rounds=R))
    ts = [sim.method.energy(t) for t in range(R)]
    assert ts[0] == pytest.approx(0.95 + 0.03 / R) and ts[-1] == pytest.approx(0.98)
    assert all(b > a for a, b in zip(ts, ts[1:], strict=False))
    mat = _decaying(120, 80, 0.97, 3)
    ranks = [svd_factors(mat, T)["a"].shape[1] for T in ts]
    assert all(b >= a for a, b in zip(ranks, ranks[1:], strict=False))
    assert ranks[-1] > ranks[0]
    sizes = [payload_numel(compress({"fc1.weight": mat}, T)) for T in ts]
    assert sizes == sorted(sizes)


def _low_rank_update(scale=1.0, seed=5):
    """A mentee-shaped update: matrices of rank 2 (singular values 3, 2), conv weights of rank 1 per
    kernel position, dense biases."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in CNN5_SHAPES.items():
        if len(shape) == 1:
            out[k] = torch.randn(shape, generator=g)
        elif len(shape) == 2:
            u, _ = torch.linalg.qr(torch.randn(shape[0], 2, generator=g))
            v, _ = torch.linalg.qr(torch.randn(shape[1], 2, generator=g))
            out[k] = (u * torch.tensor([3.0, 2.0])) @ v.T
        else:
            o, i, kh, kw = shape
            a, b = torch.randn(kh, kw, o, 1, generator=g), torch.randn(kh, kw, 1, i, generator=g)
            out[k] = (a @ b).permute(2, 3, 0, 1).contiguous()
    return {k: scale * v for k, v in out.items()}


def test_fedkd_low_rank_update_round_trip_is_exact():
    upd = _low_rank_update()
    code = compress(upd, 0.95)
    for k, c in code.items():
        assert isinstance(c, torch.Tensor) == (len(CNN5_SHAPES[k]) == 1)  # every matrix went as factors
    assert payload_code_numel(code) < CNN5_PARAMS
    back = decompress(code, CNN5_SHAPES)
    for k in upd:
        torch.testing.assert_close(back[k], upd[k], rtol=1e-4, atol=1e-5)


def test_fedkd_server_averages_unweighted_and_recompresses():
    sim = make_sim(small_config(method="fedkd", rounds=1))
    m, c = sim.method, sim.clients[2]
    m.receive(c, sim.broadcast)  # the initial dense mentee
    start = snapshot(c.module("mentee"))
    T = m.energy(0)
    u1, u2 = _low_rank_update(1.0), _low_rank_update(3.0)  # same directions: the mean has the same ranks
    ups = [Upload(0, 0.1, compress(u1, T)), Upload(1, 0.9, compress(u2, T))]
    bc = m.server_update(sim.server, ups)
    got = decompress(bc["update"], CNN5_SHAPES)
    for k in u1:
        torch.testing.assert_close(got[k], 2.0 * u1[k], rtol=1e-4, atol=1e-5)  # unweighted: (1 + 3) / 2
    m.receive(c, bc)
    server = snapshot(sim.server.module("mentee"))
    for k, v in snapshot(c.module("mentee")).items():
        torch.testing.assert_close(v, start[k] + got[k])
        assert torch.equal(v, server[k])


def test_fedkd_conv_flatten_option_and_dense_fallback():
    w = (torch.randn(32, 1, 1, 1) * torch.randn(1, 16, 5, 5)).contiguous()  # rank 1 as a 32 x 400 matrix
    code = compress({"conv2.weight": w}, 0.95, conv_svd="flatten")["conv2.weight"]
    assert code["a"].shape == (32, 1) and code["b"].shape == (1, 400)
    back = decompress({"conv2.weight": code}, {"conv2.weight": w.shape})["conv2.weight"]
    torch.testing.assert_close(back, w, rtol=1e-4, atol=1e-5)
    # a small random matrix needs most of its rank: factors would exceed the dense 10 x 12 tensor
    m = torch.randn(10, 12, generator=torch.Generator().manual_seed(0))
    assert isinstance(compress({"x": m}, 0.95)["x"], torch.Tensor)
    assert code_numel(compress({"x": m}, 0.95, dense_fallback=False)["x"], m.shape) > m.numel()


def test_fedkd_diverged_update_travels_dense_instead_of_failing_the_svd():
    bad = torch.ones(6, 4)
    bad[2, 1] = float("nan")
    conv = torch.ones(3, 2, 5, 5)
    conv[0, 0, 0, 0] = float("inf")
    code = compress({"fc.weight": bad, "conv.weight": conv}, 0.95)
    assert isinstance(code["fc.weight"], torch.Tensor) and isinstance(code["conv.weight"], torch.Tensor)
    back = decompress(code, {"fc.weight": bad.shape, "conv.weight": conv.shape})
    assert torch.equal(back["fc.weight"].isnan(), bad.isnan()) and torch.equal(back["conv.weight"], conv)
    # a run whose mentee diverges finishes (an SVD of a non-finite update used to raise LinAlgError)
    sim = make_sim(small_config(method="fedkd", rounds=1, fraction=0.2, mentee_lr=3e38))
    seen = spy_server(sim)
    sim.run_round(1)
    (ups, _), = seen
    assert any(not bool(torch.isfinite(v).all()) for v in ups[0].payload.values() if isinstance(v, torch.Tensor))


def test_labels_record_the_choices():
    from baselines.fedkd import FedKD
    from baselines.fml import FML
    assert "alpha=0.3" in FML.label(FML.Params(fml_alpha=0.3)) and "cnn5" in FML.label(FML.Params())
    default = FedKD.label(FedKD.Params())
    assert "compress=update" in default and "0.95->0.98" in default
    assert "KL element-wise mean" in default and "clip 10.0 per module" in default
    assert "clip off" in FedKD.label(FedKD.Params(fedkd_clip=0.0))
    assert "HtFLlib variant" in FedKD.label(FedKD.Params(fedkd_compress="params"))


def test_fedkd_refuses_falling_threshold():
    from fedbench.errors import ConfigError
    with pytest.raises(ConfigError, match="energy-start"):
        small_config(method="fedkd", energy_start=0.99, energy_end=0.95)


# --- both -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["fml", "fedkd"])
def test_same_seed_same_metrics(method):
    r1 = make_sim(small_config(method=method, fraction=0.6)).run()
    r2 = make_sim(small_config(method=method, fraction=0.6)).run()
    for a, b in zip(r1, r2, strict=True):
        assert [(x.correct, x.bytes_up, x.bytes_down, x.train_macs) for x in a.rows] == \
               [(x.correct, x.bytes_up, x.bytes_down, x.train_macs) for x in b.rows]


@pytest.mark.parametrize("method", ["fml", "fedkd"])
def test_synthetic_smoke_learns(method):
    sim = make_sim(small_config(method=method, rounds=3))
    acc, _ = sim.run()[-1].accuracy()
    guess = own_class_guess(sim)  # always predicting the client's most frequent class: ~0.5 here
    assert acc >= guess + 0.2, f"{method} did not learn: {acc} (guessing own classes: {guess})"
