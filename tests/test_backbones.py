"""Backbones, their pretrained cache and the linear probe: interface, FLOPs of attention, cache round trip,
and one-line errors for every bad file."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode

from fedbench.cli import main
from fedbench.data.sources import load_dataset
from fedbench.errors import ConfigError
from fedbench.models.backbones import BACKBONES, Attention, ResNet, ViT, build_backbone
from fedbench.models.loading import Recipe, cache_key, cache_paths, load_backbone, read_state, seeded_backbone
from fedbench.pretrain import linear_probe, linear_probe_details, pretrain

TINY = Recipe(epochs=1, batch_size=64, optimizer="sgd", lr=0.05, weight_decay=5e-4, warmup_epochs=0.5)


def body(model):
    return {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}


def same_body(a, b):
    sa, sb = body(a), body(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Fabricated cifar100.npz and cifar10.npz (keras layout), small enough for a one-epoch recipe."""
    d = tmp_path_factory.mktemp("backbone-data")
    rng = np.random.default_rng(7)
    for name, k, n in (("cifar100", 100, 256), ("cifar10", 10, 200)):
        templates = rng.integers(30, 225, size=(k, 4, 4, 3)).repeat(8, axis=1).repeat(8, axis=2)
        y = np.sort(np.arange(n) % k)  # sorted by class, like the real archives
        x = np.clip(templates[y] + rng.normal(0, 30, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
        np.savez(d / f"{name}.npz", x_train=x, y_train=y, x_test=x[::2], y_test=y[::2])
    return d


@pytest.fixture(scope="module")
def cached(data_dir):
    """Both backbones pretrained with the tiny recipe into data_dir."""
    return {name: pretrain(name, data_dir, recipe=TINY, device="cpu") for name in BACKBONES}


@pytest.mark.parametrize("name", list(BACKBONES))
def test_interface_and_shapes(name):
    torch.manual_seed(0)
    m = build_backbone(name, 7)
    x = torch.randn(3, 3, 32, 32)
    f = m.features(x)
    assert f.shape == (3, m.feature_dim)
    assert isinstance(m.head, torch.nn.Linear) and (m.head.in_features, m.head.out_features) == (m.feature_dim, 7)
    assert torch.equal(m(x), m.head(f))
    assert not any(isinstance(mod, torch.nn.Dropout) for mod in m.modules())


def test_vit_layout():
    m = build_backbone("vit", 10)
    assert isinstance(m, ViT)
    pe = m.patch_embed
    assert isinstance(pe, torch.nn.Conv2d) and pe.kernel_size == (4, 4) and pe.stride == (4, 4)
    dim = pe.out_channels
    assert m.pos_embed.shape == (1, 64, dim)
    for blk in m.blocks:
        assert isinstance(blk.norm1, torch.nn.LayerNorm) and isinstance(blk.norm2, torch.nn.LayerNorm)
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(blk.attn, p)
            assert isinstance(lin, torch.nn.Linear) and (lin.in_features, lin.out_features) == (dim, dim)
        assert blk.mlp.fc1.in_features == dim and blk.mlp.fc2.out_features == dim
    assert isinstance(m.norm, torch.nn.LayerNorm)


def test_resnet_layout():
    m = build_backbone("resnet", 10)
    assert isinstance(m, ResNet)
    blocks = [b for b in m.modules() if hasattr(b, "shortcut")]
    assert blocks
    for b in blocks:
        for c in (b.conv1, b.conv2):
            assert isinstance(c, torch.nn.Conv2d) and c.bias is None
        assert isinstance(b.bn1, torch.nn.BatchNorm2d) and isinstance(b.bn2, torch.nn.BatchNorm2d)
    changed = [b for b in blocks if isinstance(b.shortcut, torch.nn.Sequential)]
    assert changed and all(b.shortcut[0].kernel_size == (1, 1) for b in changed)


def test_attention_extra_macs_match_flop_counter():
    attn = Attention(64, 4)
    x = torch.randn(2, 16, 64)
    with FlopCounterMode(display=False) as fc:
        attn(x)
    counts = fc.get_flop_counts()["Global"]
    linear = sum(v for op, v in counts.items() if "addmm" in str(op) or str(op).endswith(".mm"))
    matmuls = fc.get_total_flops() - linear
    assert linear == 4 * 2 * 2 * 16 * 64 * 64  # the four projections, counted apart
    assert matmuls > 0 and matmuls // 2 // x.shape[0] == attn.extra_macs_per_sample(x) == 2 * 16 * 16 * 64


def test_random_init_deterministic_by_seed(tmp_path):
    a, ia = load_backbone("vit", 10, tmp_path, init="random", seed=3)
    b, _ = load_backbone("vit", 10, tmp_path, init="random", seed=3)
    c, _ = load_backbone("vit", 10, tmp_path, init="random", seed=4)
    assert ia.digest == "random-3" and ia.source == "random"
    assert same_body(a, b) and torch.equal(a.head.weight, b.head.weight)
    assert not same_body(a, c)
    state = torch.get_rng_state()
    load_backbone("resnet", 10, tmp_path, init="random", seed=0)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone


def test_cache_round_trip(data_dir, cached):
    for name, info in cached.items():
        assert info.trained_now and len(info.digest) == 16 and info.key
        weights, sidecar = cache_paths(name, data_dir, info.key)
        assert str(weights) == info.source and sidecar.is_file()
        meta = json.loads(sidecar.read_text())
        assert meta["recipe"] == TINY.to_dict() and meta["sha256"][:16] == info.digest
        assert {"pretrained", "random"} <= meta["metrics"]["probe"].keys()
        assert meta["threads"] == torch.get_num_threads() and meta["torch"] == torch.__version__
        m, loaded = load_backbone(name, 10, data_dir, recipe=TINY)
        assert loaded.digest == info.digest and loaded.metrics == info.metrics and not m.training
        assert m.head.out_features == 10
        saved = load_file(str(weights))
        assert all(torch.equal(v, saved[k]) for k, v in body(m).items())
        again = pretrain(name, data_dir, recipe=TINY, device="cpu")  # reused, not retrained
        assert not again.trained_now and again.digest == info.digest


def test_cache_key_depends_on_everything(data_dir):
    digest = load_dataset("cifar100", data_dir).digest
    base = cache_key("vit", TINY, digest)
    assert base != cache_key("resnet", TINY, digest)
    assert base != cache_key("vit", Recipe(**{**TINY.to_dict(), "epochs": 2}), digest)
    assert base != cache_key("vit", TINY, "0" * 16)
    assert cache_key("vit", Recipe.for_device("vit", "cpu"), digest) != cache_key("vit", Recipe.for_device("vit", "cuda"), digest)


def test_no_cache_names_the_command(data_dir):
    with pytest.raises(ConfigError, match=r"fedbench pretrain --backbone vit --data-dir .* minutes"):
        load_backbone("vit", 10, data_dir, recipe="cpu")
    with pytest.raises(ConfigError, match="pretrain\\(\\) with this recipe"):
        load_backbone("vit", 10, data_dir, recipe=Recipe(**{**TINY.to_dict(), "seed": 5}))


def test_corrupt_cache(data_dir, cached, tmp_path):
    import shutil
    d = tmp_path / "copy"
    shutil.copytree(data_dir, d)
    info = cached["resnet"]
    weights, sidecar = cache_paths("resnet", d, info.key)
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0xFF  # one flipped byte in the tensor data: still a readable file
    weights.write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match=f"{weights}.*corrupt.*sha256") as e:
        load_backbone("resnet", 10, d, recipe=TINY)
    assert "\n" not in str(e.value) and "force" in str(e.value)
    with pytest.raises(ConfigError, match="corrupt"):  # pretrain does not reuse it silently either
        pretrain("resnet", d, recipe=TINY, device="cpu")
    sidecar.write_text("{not json")
    with pytest.raises(ConfigError, match=f"{sidecar}.*corrupt"):
        load_backbone("resnet", 10, d, recipe=TINY)


def test_model_path_checkpoints(cached, tmp_path):
    # a torch.save state dict of the same architecture
    vit = seeded_backbone("vit", 100, 11)
    p = tmp_path / "vit.pt"
    torch.save(vit.state_dict(), p)
    m, info = load_backbone("vit", 10, None, model_path=p)
    assert same_body(m, vit) and info.source == str(p) and info.recipe == {}
    # the cache file itself, with its sidecar beside it
    m, info = load_backbone("vit", 10, None, model_path=cached["vit"].source)
    assert info.digest == cached["vit"].digest and info.recipe == TINY.to_dict()
    # the other architecture: the first offending key is named
    p = tmp_path / "resnet.safetensors"
    save_file(seeded_backbone("resnet", 100, 0).state_dict(), str(p))
    with pytest.raises(ConfigError, match=f"{p}.*not a vit backbone.*missing key 'pos_embed'"):
        load_backbone("vit", 10, None, model_path=p)
    p = tmp_path / "vit.safetensors"
    save_file(vit.state_dict(), str(p))
    with pytest.raises(ConfigError, match="not a resnet backbone.*missing key 'conv1.weight'"):
        load_backbone("resnet", 10, None, model_path=p)
    # same keys, another width
    p = tmp_path / "vit64.pt"
    torch.save(ViT(100, dim=64).state_dict(), p)
    with pytest.raises(ConfigError, match=r"key 'pos_embed' has shape \(1, 64, 64\), expected \(1, 64, 128\)"):
        load_backbone("vit", 10, None, model_path=p)
    # an extra key
    p = tmp_path / "extra.pt"
    torch.save({**vit.state_dict(), "blocks.9.norm1.weight": torch.ones(3)}, p)
    with pytest.raises(ConfigError, match="unexpected key 'blocks.9.norm1.weight'"):
        load_backbone("vit", 10, None, model_path=p)


def test_model_path_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="--model-path .*nowhere.pt does not exist"):
        load_backbone("vit", 10, None, model_path=tmp_path / "nowhere.pt")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"certainly not a checkpoint")
    with pytest.raises(ConfigError, match=f"cannot read checkpoint {junk}"):
        load_backbone("vit", 10, None, model_path=junk)
    pickled = tmp_path / "module.pt"
    torch.save(seeded_backbone("vit", 10, 0), pickled)  # a whole module: refused by weights_only
    with pytest.raises(ConfigError, match=f"cannot read checkpoint {pickled}"):
        read_state(pickled)
    with pytest.raises(ConfigError, match="unknown backbone 'vgg'"):
        load_backbone("vgg", 10, None, init="random")
    with pytest.raises(ConfigError, match="unknown backbone init 'imagenet'"):
        load_backbone("vit", 10, None, init="imagenet")


def test_linear_probe_sees_structure(data_dir):
    arrays = load_dataset("cifar10", data_dir)
    acc = linear_probe(seeded_backbone("resnet", 10, 0), arrays)
    assert 0.3 < acc <= 1.0  # class templates are linearly separable even through random features
    d = linear_probe_details(seeded_backbone("resnet", 10, 0), arrays, train_subset=150)
    assert d["accuracy"] == pytest.approx(linear_probe(seeded_backbone("resnet", 10, 0), arrays, train_subset=150))
    # the held-out part used to choose the L2 penalty holds every class, although the archive is class-sorted
    assert d["train_images"] == 150 and min(d["validation"].values()) > 0.9


def test_recipe_presets_and_validation():
    for name in BACKBONES:
        cpu, cuda = Recipe.for_device(name, "cpu"), Recipe.for_device(name, "cuda")
        assert cuda.epochs > cpu.epochs and cuda.batch_size > cpu.batch_size
    with pytest.raises(ConfigError, match="unknown recipe preset 'tpu'"):
        Recipe.for_device("vit", "tpu")
    with pytest.raises(ConfigError, match="unknown recipe optimizer 'lamb'"):
        Recipe(epochs=1, batch_size=8, optimizer="lamb", lr=0.1, weight_decay=0)
    with pytest.raises(ConfigError, match="lr must be > 0"):
        Recipe(epochs=1, batch_size=8, optimizer="sgd", lr=0, weight_decay=0)


@pytest.mark.parametrize("argv, message", [
    (["pretrain", "--backbone", "nope"], "fedbench: error: unknown backbone 'nope'; choose from: vit, resnet, all"),
    (["pretrain", "--backbone", "vit", "--recipe", "tpu"], "fedbench: error: unknown --recipe 'tpu'"),
    (["list", "nope"], "fedbench: error: unknown list topic 'nope'"),
])
def test_cli_errors_one_line(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--data-dir", str(tmp_path)] if argv[0] == "pretrain" else argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_cli_pretrain_reuses_cache(data_dir, cached, capsys, monkeypatch):
    import fedbench.models.loading as pt
    monkeypatch.setitem(pt.PRESETS, ("resnet", "cpu"), TINY)  # the tiny recipe as the CPU preset
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--backbone", "resnet", "--data-dir", str(data_dir), "--recipe", "cpu"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "(cached)" in out and "resnet" in out


def test_cli_pretrain_trains_with_progress(data_dir, cached, capsys, monkeypatch, tmp_path):
    import shutil

    import fedbench.models.loading as pt
    d = tmp_path / "copy"
    shutil.copytree(data_dir, d)
    monkeypatch.setitem(pt.PRESETS, ("resnet", "cpu"), TINY)
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--backbone", "resnet", "--data-dir", str(d), "--recipe", "cpu", "--force", "--threads", "1"])
    assert e.value.code == 0
    captured = capsys.readouterr()
    assert "resnet train" in captured.err and "epoch 1/1" in captured.err and "probe random" in captured.err
    assert "(cached)" not in captured.out and "1 threads" in captured.out
    # the same recipe and seed give the same network up to float rounding: bf16 autocast kernels may pick
    # another summation order in a fresh process state (bit-identity held in one suite order, not in another)
    weights, sidecar = cache_paths("resnet", d, cached["resnet"].key)
    assert json.loads(sidecar.read_text())["recipe"] == cached["resnet"].recipe
    again, first = load_file(weights), load_file(cache_paths("resnet", data_dir, cached["resnet"].key)[0])
    assert again.keys() == first.keys()
    for k in first:
        torch.testing.assert_close(again[k], first[k], rtol=0.05, atol=2e-3)


def test_cli_list_backbones(capsys):
    with pytest.raises(SystemExit) as e:
        main(["list", "backbones"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("vit:") and "resnet:" in out and "MACs per sample" in out


def _real_cache(real_data_dir, name):
    if not (real_data_dir / "cifar100.npz").exists():
        pytest.skip("real CIFAR-100 not materialized in FEDBENCH_DATA_DIR")
    try:
        return load_backbone(name, 100, real_data_dir, recipe="cpu")
    except ConfigError as e:
        if "no pretrained" in str(e):
            pytest.skip(f"no pretrained {name} cache: {e}")
        raise


@pytest.mark.parametrize("name", list(BACKBONES))
def test_real_cache_reproduces_its_accuracy(real_data_dir, name):
    """The cached weights, loaded the way federated runs load them, with the stored CIFAR-100 head put back,
    give the CIFAR-100 test accuracy the sidecar recorded (same normalisation, layout and eval mode) on a
    random fifth of the test set (sd of that estimate about 1 point; a loading bug costs tens)."""
    import dataclasses

    from fedbench.pretrain import evaluate
    m, info = _real_cache(real_data_dir, name)
    saved = load_file(info.source)
    m.head.load_state_dict({"weight": saved["head.weight"], "bias": saved["head.bias"]})
    c100 = load_dataset("cifar100", real_data_dir)
    pick = np.random.default_rng(0).permutation(len(c100.y_test))[:2000]  # the archive is class-sorted
    acc = evaluate(m, dataclasses.replace(c100, x_test=c100.x_test[pick], y_test=c100.y_test[pick]),
                   torch.device("cpu"))
    assert acc == pytest.approx(info.metrics["cifar100_test_accuracy"], abs=0.04)
    probe = info.metrics["probe"]
    assert probe["pretrained"]["accuracy"] > probe["random"]["accuracy"] + 0.05


@pytest.mark.nightly
@pytest.mark.parametrize("name", list(BACKBONES))
def test_real_pretraining_is_useful(real_data_dir, name):
    """The CPU preset trains (about 14 minutes, or reuses the cache) to a backbone whose CIFAR-10 linear
    probe clearly beats the random initialisation it started from."""
    info = pretrain(name, real_data_dir, recipe="cpu", device="cpu")
    probe = info.metrics["probe"]
    assert info.metrics["cifar100_test_accuracy"] > 0.25
    assert probe["pretrained"]["accuracy"] > probe["random"]["accuracy"] + 0.10
