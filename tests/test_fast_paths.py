"""The fast paths of the engine (gather transform, prefetch thread, channels_last, bf16 autocast) and the speed/scale benchmarks' own logic.

Synthetic data, CPU, a few seconds each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_sim, small_config

from fedbench.models.cnn import cnn_spec

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import scale  # noqa: E402
import speed  # noqa: E402

# parameters of CNN-1..5 with 10 classes (spec A.2; tests/test_models.py checks them against the spec)
CNN_PARAMS = {"cnn1": 2_621_558, "cnn2": 1_815_142, "cnn3": 1_320_558, "cnn4": 1_060_358, "cnn5": 670_058}
LORA_PARAMS = 8 * (500 + 10)  # FedLoRA head-lora, rank 8: A (8 x 500) + B (10 x 8), no bias


def _params(sim) -> dict:
    return {k: [t.detach().clone() for t in ts] for k, ts in sim.state.tensors.items()}


def test_channels_last_fp32_same_metrics_as_plain():
    """channels_last is a memory layout: the same convolutions in another summation order.

    Before training the two layouts give the same logits to float rounding (atol 1e-5) and the same
    predictions. After two rounds of training (SGD amplifies rounding differences only slowly at lr 0.01)
    the client weights agree to rtol 1e-3 and the per-client correct counts to at most 1 sample, i.e.
    a prediction that sits on a decision boundary may flip, nothing more.
    """
    plain = make_sim(small_config(method="standalone", channels_last=False))
    cl = make_sim(small_config(method="standalone", channels_last=True))
    assert any(t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
               and not t.is_contiguous() for ts in cl.state.tensors.values() for t in ts)
    for a, b in zip(plain.clients, cl.clients, strict=True):
        idx = plain.data.index["test"][a.id]
        with torch.no_grad():
            la = plain.method.predict(a, plain.data.transform.eval(plain.data.images[idx]))
            lb = cl.method.predict(b, cl.data.transform.eval(cl.data.images[idx]))
        torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-5)
        assert torch.equal(la.argmax(1), lb.argmax(1))
    for t in (1, 2):
        ra, rb = plain.run_round(t), cl.run_round(t)
        for x, y in zip(ra.rows, rb.rows, strict=True):
            assert x.total == y.total and x.train_samples == y.train_samples
            assert abs(x.correct - y.correct) <= 1
            assert x.train_macs == y.train_macs and x.eval_macs == y.eval_macs
    pa, pb = _params(plain), _params(cl)
    for k in pa:
        for x, y in zip(pa[k], pb[k], strict=True):
            torch.testing.assert_close(x, y.contiguous(), rtol=1e-3, atol=1e-4)


def test_bf16_compute_context_sees_weight_updates():
    """Inside the engine's precision context a forward must use the current weights.

    torch.autocast caches the bf16 cast of each fp32 leaf parameter until the context exits; SGD updates
    the parameter in place, so with the cache on, every forward of a client's round would reuse the
    weights the round started with. The context must be ``torch.autocast(..., cache_enabled=False)``
    (or wrap each forward only).
    """
    sim = make_sim(small_config(method="standalone", models="cnn5", precision="bf16"))
    c = sim.clients[0]
    x = sim.data.transform.eval(sim.data.images[sim.data.index["train"][0][:8]])
    with sim.compute():
        model = c.module("model")
        before = model(x)[0]
        with torch.no_grad():
            model.fc3.bias.add_(1.0)
        after = model(x)[0]
    assert not torch.equal(before, after), (
        "stale bf16 weights: Simulation.compute() must pass cache_enabled=False to torch.autocast")


def test_bf16_runs_and_learns():
    """bf16 autocast + channels_last trains like fp32: 3 rounds on the synthetic data lift the mean
    client accuracy above the 2-class chance level by 15 points (the bar of test_core_methods), and
    parameters stay fp32."""
    sim = make_sim(small_config(method="standalone", models="cnn5", rounds=3, precision="bf16",
                                channels_last=True))
    acc, _ = sim.run()[-1].accuracy()
    assert acc > 0.5 + 0.15, f"bf16 did not learn: {acc}"
    assert all(t.dtype == torch.float32 for ts in sim.state.tensors.values() for t in ts)


def test_client_state_bytes_equals_hand_computed_parameter_bytes():
    sim = make_sim(small_config(method="standalone", models="cnn5"))
    m = scale.client_state_bytes(sim)
    assert m["held_bytes"] == m["raw_param_bytes"] == 5 * CNN_PARAMS["cnn5"] * 4
    assert m["ratio"] == 1.0

    sim = make_sim(small_config(method="fedlora", models="hetero"))  # clients 0..4 get CNN-1..5
    m = scale.client_state_bytes(sim)
    expect = sum(4 * (CNN_PARAMS[f"cnn{i + 1}"] + LORA_PARAMS) for i in range(5))
    assert m["raw_param_bytes"] == expect and m["held_bytes"] == expect
    assert m["server_bytes"] == 4 * LORA_PARAMS  # the server's global adapter
    sim.run_round(1)
    assert scale.client_state_bytes(sim)["held_bytes"] == expect  # no growth


def test_ideal_formula_by_hand():
    cfg = small_config(method="fedlora")
    ceil = {"cnn1": {"train_ips": 100.0, "fwd_ips": 400.0, "eval_ips": 500.0},
            "cnn5": {"train_ips": 200.0, "fwd_ips": 800.0, "eval_ips": 1000.0}}
    work = speed.round_work(cfg, [("cnn1", 100), ("cnn5", 200)], [("cnn1", 50), ("cnn5", 100)])
    train, ev = speed.ideal_seconds(ceil, work)
    assert train == pytest.approx(100 / 100 + 100 / 400 + 200 / 200 + 200 / 800)
    assert ev == pytest.approx(50 / 500 + 100 / 1000)
    fml = small_config(method="fml")  # two models per sample: f_k and the shared CNN-5
    train, _ = speed.ideal_seconds(ceil, speed.round_work(fml, [("cnn1", 100)], []))
    assert train == pytest.approx(100 / 100 + 100 / 200)
    assert speed.counted_samples(cfg, 100) == 200 and speed.counted_samples(fml, 100) == 100


@pytest.mark.parametrize("mode", ["spec", "flip-crop", "none"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gather_transform_is_bit_identical_to_the_plain_steps(mode, channels_last):
    """The engine's one-gather transform changes speed only: the same random draws in the same order, the
    same pixels (sign of zero included), the same memory layout, for any batch size."""
    from fedbench.data.transforms import BatchTransform

    tf = BatchTransform((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), torch.device("cpu"),
                        channels_last=channels_last)
    images = torch.randint(0, 256, (300, 32, 32, 3), dtype=torch.uint8)
    for n in (1, 7, 64):
        idx = torch.randperm(300, generator=torch.Generator().manual_seed(n))[:n]
        ga, gb = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        a = tf.train(images[idx], mode, ga)
        b = tf.train_gather(images, idx, mode, gb)
        assert torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b))
        assert a.stride() == b.stride()
        assert torch.equal(ga.get_state(), gb.get_state())  # the same number of draws
        if mode != "none":
            assert not torch.equal(a, tf.eval(images[idx]))  # augmentation did something
    e = tf.eval(images[:50])
    ref = tf.to_nchw(tf.normalize(images[:50]))
    assert torch.equal(e, ref) and e.stride() == ref.stride()


def test_prefetch_thread_changes_nothing():
    """Preparing the next batch in a helper thread gives the same metrics, bytes, FLOPs, sample counts and
    weights as preparing it inline (FedLoRA: two batch streams per client and round)."""
    cfg = small_config(method="fedlora", rounds=2)
    on, off = make_sim(cfg), make_sim(cfg)
    on.batches.prefetch, off.batches.prefetch = True, False
    for t in (1, 2):
        ra, rb = on.run_round(t), off.run_round(t)
        assert ra.rows == rb.rows and ra.server_macs == rb.server_macs
    pa, pb = _params(on), _params(off)
    assert all(torch.equal(x, y) for k in pa for x, y in zip(pa[k], pb[k], strict=True))
    assert on.batches._pool is not None and off.batches._pool is None
    on.close()
    assert on.batches._pool is None


def test_prefetch_counts_only_batches_handed_out():
    """A method that stops reading early: the batch prepared ahead is not counted as trained."""
    sim = make_sim(small_config(method="standalone", batch_size=8))
    sim.batches.prefetch = True
    c = sim.clients[0]
    c.round, c.streams = 1, 0
    it = sim.train_batches(c, epochs=1, augment=True, shuffle=True)
    got = [next(it)[1].numel() for _ in range(2)]
    it.close()
    assert int(sim.batches.samples[c.id]) == sum(got) == 16
    sim.close()


def test_default_prefetch_rule():
    from fedbench.engine.simulation import default_prefetch

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_prefetch(cpu, threads=1, cores=2)      # a spare core: prepare batches on it
    assert not default_prefetch(cpu, threads=2, cores=2)  # every core computes
    assert not default_prefetch(cuda, threads=1, cores=16)


def test_speed_plain_variants_are_the_same_math():
    """The speed suite's 'fast path undone' patches compute what the engine computes."""
    from fedbench.data.transforms import BatchTransform

    tf = BatchTransform((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), torch.device("cpu"))
    images = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8)
    idx = torch.arange(0, 40, 3)
    assert torch.equal(speed._train_gather_plain(tf, images, idx, "spec", torch.Generator().manual_seed(1)),
                       tf.train_gather(images, idx, "spec", torch.Generator().manual_seed(1)))
    cfg = small_config(method="standalone", rounds=1)
    a = make_sim(cfg)
    with speed.patched([c for ch in speed.PLAIN.values() for c in ch]):  # some act when the engine is built
        b = make_sim(cfg)
        rb = b.run_round(1)
    ra = a.run_round(1)
    assert [(r.correct, r.train_macs, r.train_samples) for r in ra.rows] == \
        [(r.correct, r.train_macs, r.train_samples) for r in rb.rows]


def test_linear_fit_exact_line():
    f = scale.linear_fit([[1, 2, 3, 4]], [3, 5, 7, 9])
    assert f["slopes"][0] == pytest.approx(2) and f["intercept"] == pytest.approx(1) and f["r2"] == pytest.approx(1)


def test_macs_per_sample_matches_meter_convention():
    m = speed.macs_per_sample("cnn5", 10)
    assert m["fwd"] == pytest.approx(2.88e6, rel=0.01)
    # training: conv1 2x forward (no input gradient), every other layer 3x
    conv1 = 16 * 3 * 25 * 28 * 28
    assert m["train"] == 3 * m["fwd"] - conv1
    assert sum(p.numel() for p in cnn_spec("cnn5", 10).build().parameters()) == CNN_PARAMS["cnn5"]


def _run(script: str, args: list[str], tmp_path: Path) -> dict:
    out = tmp_path / f"{script}.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(BENCH.parent), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--dataset", "synthetic", "--quick",
                           "--threads", "1", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_speed_quick_smoke(tmp_path):
    res = _run("speed", ["--batch-size", "16", "--clients", "5", "--rounds", "2", "--variants", "fp32",
                         "--baseline", "fml", "--no-standalone", "--ceiling-time", "0.005"], tmp_path)
    assert set(res["ceiling"]["models"]["fp32"]) == set(CNN_PARAMS)
    assert res["ceiling"]["gemm"]["fp32"]["peak_gflops"] > 0 and res["ceiling"]["gemm"]["bf16"]["peak_gflops"] > 0
    ref = res["reference"]
    labels = [r["label"] for r in res["engine"]]
    assert labels == ["engine fedlora", "engine fml"]
    for r in [ref, *res["engine"]]:
        assert len(r["rounds"]) == 2 and r["s_per_round"] > 0 and 0 < r["efficiency"]
        assert r["final_accuracy"] is not None
    for r in res["engine"]:
        assert all(row["train_samples"] == row["expected_samples"] for row in r["rounds"])
        assert r["gflops"] > 0 and r["speedup_vs_reference"] > 0


def test_scale_quick_smoke(tmp_path):
    res = _run("scale", ["--clients", "5,10", "--fractions", "0.4,1.0", "--rounds", "2", "--batch-size", "32"],
               tmp_path)
    assert [(p["clients"], p["sampled"]) for p in res["points"]] == [(5, 2), (5, 5), (10, 4), (10, 10)]
    for p in res["points"]:
        assert p["state_growth_bytes"] == 0
        assert p["memory"]["round_1"]["ratio"] == pytest.approx(1.0)
        assert p["memory"]["round_2"]["live_optimizer_state_bytes"] == 0
    assert 0 <= res["fits"]["train_vs_sampled"]["r2"] <= 1


def test_device_defaults_are_applied_only_when_unset_and_stored_concretely():
    from fedbench.config import DEVICE_DEFAULTS, config_to_cli, make_config

    base = dict(dataset="synthetic", method="standalone")
    assert make_config(base, "cpu").channels_last is DEVICE_DEFAULTS["cpu"]["channels_last"] is True
    assert make_config(base, "cuda").channels_last is False
    assert make_config(base).channels_last is False  # no device: the dataclass default
    assert make_config({**base, "channels_last": False}, "cpu").channels_last is False  # the user wins
    # the recorded command names the device-dependent option either way, so it reproduces anywhere
    on, off = make_config(base, "cpu"), make_config(base, "cuda")
    assert "--channels-last --fused-sgd" in config_to_cli(on)
    assert "--no-channels-last --no-fused-sgd" in config_to_cli(off)
    assert on.run_hash("d") != off.run_hash("d")


def test_fused_sgd_same_metrics_as_plain_sgd():
    """torch's fused SGD is the same update to float rounding: after two rounds the weights agree to
    1e-4 (the bound of the channels_last test; measured 2e-5) and the per-client correct counts to at most 1 sample; bytes, FLOPs and samples are identical."""
    plain = make_sim(small_config(method="fedlora", fused_sgd=False))
    fused = make_sim(small_config(method="fedlora", fused_sgd=True))
    opt = fused.make_optimizer([torch.zeros(2, requires_grad=True)])
    assert opt.defaults["fused"] is True
    for t in (1, 2):
        ra, rb = plain.run_round(t), fused.run_round(t)
        for x, y in zip(ra.rows, rb.rows, strict=True):
            assert (x.bytes_up, x.bytes_down, x.train_macs, x.eval_macs, x.train_samples) == \
                (y.bytes_up, y.bytes_down, y.train_macs, y.eval_macs, y.train_samples)
            assert abs(x.correct - y.correct) <= 1
    pa, pb = _params(plain), _params(fused)
    for k in pa:
        for x, y in zip(pa[k], pb[k], strict=True):
            torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-4)  # as channels_last: rounding, amplified


def test_late_fields_keep_earlier_run_ids():
    """A field added after results were stored is left out of the identity while at its default."""
    from fedbench.config import LATE_FIELDS, make_config

    cfg = make_config(dict(dataset="synthetic", method="fedlora"))
    assert all(f'"{k}"' not in cfg.canonical_json() for k in LATE_FIELDS)
    assert all(k in cfg.to_dict() for k in LATE_FIELDS)  # still shown in tables
    on = make_config(dict(dataset="synthetic", method="fedlora", fused_sgd=True))
    assert '"fused_sgd":true' in on.canonical_json() and on.run_hash("d") != cfg.run_hash("d")


def test_prefetch_env_override(monkeypatch):
    from fedbench.engine.simulation import PREFETCH_ENV, default_prefetch

    cpu = torch.device("cpu")
    monkeypatch.setenv(PREFETCH_ENV, "off")
    assert not default_prefetch(cpu, threads=1, cores=4)
    monkeypatch.setenv(PREFETCH_ENV, "on")
    assert default_prefetch(cpu, threads=4, cores=4)
    assert not default_prefetch(torch.device("cuda"), threads=1, cores=4)  # never on CUDA
    monkeypatch.setenv(PREFETCH_ENV, "auto")
    assert default_prefetch(cpu, threads=1, cores=4)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 100.0, float("nan"), "just-below", "just-above"])
def test_engine_clip_is_torch_clip_bit_for_bit(scale):
    """The engine's clip skips the multiply by exactly 1.0 on the CPU; the gradients are those of
    torch.nn.utils.clip_grad_norm_ below, around and above the threshold (down to the last bit of the
    total norm), and with a NaN."""
    sim = make_sim(small_config(method="standalone", clip=5.0))
    g = torch.Generator().manual_seed(0)
    shapes = ((16, 3, 5, 5), (300, 400), (10, 50), (10,))
    grads = [torch.randn(s, generator=g) for s in shapes]
    if isinstance(scale, str):  # the largest scale at which torch leaves the gradients alone, or the next one
        total = torch.nn.utils.get_total_norm(grads, 2.0, False, True)
        steps = [float(5.0 / total) * (1 + n * 1e-7) for n in range(-40, 41)]

        def clamped(f):  # torch's coefficient max_norm / (total + 1e-6) reaches its clamp at 1
            return float(5.0 / (torch.nn.utils.get_total_norm([gr * f for gr in grads], 2.0, False, True) + 1e-6)) >= 1
        below = max(i for i, f in enumerate(steps) if clamped(f))
        assert not clamped(steps[below + 1])
        f = steps[below] if scale == "just-below" else steps[below + 1]
        grads = [gr * f for gr in grads]
    else:
        grads = [gr * scale for gr in grads]
    ours = [torch.zeros(s, requires_grad=True) for s in shapes]
    theirs = [torch.zeros(s, requires_grad=True) for s in shapes]
    for a, b, gr in zip(ours, theirs, grads, strict=True):
        a.grad = gr.clone()
        b.grad = gr.clone()
    sim.optim.clip_gradients(ours)
    torch.nn.utils.clip_grad_norm_(theirs, 5.0, foreach=True)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.grad.nan_to_num(7.0), b.grad.nan_to_num(7.0))
