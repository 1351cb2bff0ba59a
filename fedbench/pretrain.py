"""Offline pretraining of the backbones on CIFAR-100 into the weight cache, and the linear probe.

``pretrain(name, data_dir)`` trains backbone ``name`` (``fedbench/models/backbones.py``) on all 50k
CIFAR-100 training images with its :class:`Recipe`, evaluates it on the CIFAR-100 test set, runs the
linear probe on CIFAR-10 for it and for the randomly initialised network it started from, and writes

    <data_dir>/backbones/<name>-<key>.safetensors   every weight (the CIFAR-100 head included), fp32
    <data_dir>/backbones/<name>-<key>.json          sidecar: recipe, key, file sha256, metrics, torch
                                                    version, seconds, threads

``key``, the recipes and the run-time loader (``load_backbone``) live in ``fedbench/models/loading.py``:
every federated-LoRA run loads its backbone through it; only ``fedbench pretrain`` trains one.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedbench.data.sources import Arrays, default_data_dir, load_dataset
from fedbench.data.transforms import BatchTransform
from fedbench.errors import ConfigError, choice_error
from fedbench.files import file_sha256, write_atomic
from fedbench.models.backbones import BACKBONES, Backbone, ResNet, backbone_spec
from fedbench.models.loading import (
    SIDECAR_FORMAT,
    BackboneInfo,
    Recipe,
    cache_key,
    cache_paths,
    default_device,
    load_weights,
    resolve_recipe,
    seeded_backbone,
    verified_state,
)
from fedbench.seeding import numpy_rng, torch_generator

PROBE_TRAIN_SUBSET = 10_000  # CIFAR-10 training images the linear probe fits on (fixed, seeded subset)
PROBE_L2 = (1e-4, 1e-3, 1e-2, 1e-1)  # L2 penalties tried on a held-out 20% of that subset

# Progress callback: (phase, done, total, info); phase is "train", "eval", "probe pretrained" or "probe random".
Progress = Callable[[str, int, int, dict], None]


# --------------------------------------------------------------------------- training


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.ndim >= 2 and not n.endswith("pos_embed") else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _optimizer(model: nn.Module, r: Recipe) -> torch.optim.Optimizer:
    groups = _param_groups(model, r.weight_decay)
    if r.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=r.lr, betas=(r.momentum, 0.999))
    return torch.optim.SGD(groups, lr=r.lr, momentum=r.momentum, nesterov=r.momentum > 0)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up from 0 over ``warmup`` steps, then a cosine from 1 to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _transform(model: nn.Module, info, device: torch.device) -> BatchTransform:
    # channels-last convolutions are ~1.3x faster on the CPU (the engine's CPU default); same math
    return BatchTransform(info.mean, info.std, device, channels_last=device.type == "cpu" and isinstance(model, ResNet))


def train_backbone(model: Backbone, arrays: Arrays, recipe: Recipe, device: torch.device,
                   progress: Progress | None = None) -> dict[str, float]:
    """Train ``model`` in place on ``arrays``' training split; returns last-epoch loss and accuracy."""
    r = recipe
    images = torch.from_numpy(arrays.x_train).to(device)
    labels = torch.from_numpy(arrays.y_train).to(device)
    n = images.shape[0]
    bs = min(r.batch_size, n)
    steps = n // bs  # the last incomplete batch is dropped (stable BatchNorm statistics)
    total = r.epochs * steps
    tf = _transform(model, arrays.info, device)
    if tf.channels_last:
        model.to(memory_format=torch.channels_last)
    opt = _optimizer(model, r)
    warmup = round(r.warmup_epochs * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))
    order = numpy_rng(r.seed, "pretrain", "order")
    gen = torch_generator(device, r.seed, "pretrain", "augment")
    model.train()
    last = {}
    for epoch in range(r.epochs):
        perm = torch.from_numpy(order.permutation(n)).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for s in range(steps):
            idx = perm[s * bs:(s + 1) * bs]
            x = tf.train_gather(images, idx, r.augmentation, gen)
            y = labels[idx]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=r.precision == "bf16"):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=r.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if r.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
            opt.step()
            sched.step()
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y).sum()
            if progress is not None and (s % 10 == 9 or s == steps - 1):
                mean = loss_sum.item() / (s + 1)
                if not math.isfinite(mean):
                    raise ConfigError(f"pretraining diverged in epoch {epoch + 1} (loss {mean}); lower the recipe lr")
                progress("train", epoch * steps + s + 1, total,
                         {"epoch": epoch + 1, "epochs": r.epochs, "step": s + 1, "steps": steps, "loss": mean})
        last = {"train_loss": loss_sum.item() / steps, "train_accuracy": correct.item() / (steps * bs)}
        if not math.isfinite(last["train_loss"]):
            raise ConfigError(f"pretraining diverged in epoch {epoch + 1} (loss {last['train_loss']}); "
                              f"lower the recipe lr")
    model.to(memory_format=torch.contiguous_format)
    return last


@torch.no_grad()
def extract_features(model: Backbone, x_u8: np.ndarray, info, device: torch.device, batch: int = 500,
                     progress: Progress | None = None, phase: str = "eval",
                     fn: Callable[[Backbone, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``fn(model, x)`` (default ``model.features``) over uint8 NHWC images, fp32, in eval mode, on the CPU."""
    model.eval()
    tf = BatchTransform(info.mean, info.std, device)
    fn = fn or (lambda m, x: m.features(x))
    out = []
    n = x_u8.shape[0]
    for i in range(0, n, batch):
        x = tf.eval(torch.from_numpy(x_u8[i:i + batch]).to(device))
        out.append(fn(model, x).float().cpu())
        if progress is not None:
            progress(phase, min(i + batch, n), n, {})
    return torch.cat(out) if out else torch.zeros(0)


def evaluate(model: Backbone, arrays: Arrays, device: torch.device, progress: Progress | None = None) -> float:
    """Accuracy of ``model`` (its head included) on ``arrays``' test split."""
    logits = extract_features(model, arrays.x_test, arrays.info, device, progress=progress, fn=lambda m, x: m(x))
    return (logits.argmax(1) == torch.from_numpy(arrays.y_test)).float().mean().item()


# --------------------------------------------------------------------------- linear probe


def _fit_linear(feats: torch.Tensor, y: torch.Tensor, k: int, l2: float, iters: int = 300) -> nn.Linear:
    """Multinomial logistic regression, full batch L-BFGS from zero weights, in float64."""
    lin = nn.Linear(feats.shape[1], k).double()
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), lr=1.0, max_iter=iters, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-7, tolerance_change=1e-10)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(feats), y) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return lin


def _accuracy(lin: nn.Linear, feats: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (lin(feats).argmax(1) == y).double().mean().item()


def linear_probe_details(backbone: Backbone, cifar10_arrays: Arrays, *, device: torch.device | str = "cpu",
                         train_subset: int = PROBE_TRAIN_SUBSET, progress: Progress | None = None,
                         phase: str = "probe") -> dict[str, Any]:
    """Frozen ``features`` of a fixed seeded subset of ``train_subset`` CIFAR-10 training images and of the
    whole test set (normalised with the dataset's own statistics, as federated runs do), standardised with
    the training features' mean and std; a multinomial logistic regression by full-batch L-BFGS, its L2
    penalty chosen from ``PROBE_L2`` on a held-out 20% of the subset, refit on the whole subset; accuracy
    on the test set."""
    device = torch.device(device)
    a = cifar10_arrays
    n = a.x_train.shape[0]
    # in random order: the archives are sorted by class, and the last 20% of the subset is the validation part
    idx = numpy_rng(0, "probe", "subset").permutation(n)[:min(train_subset, n)]
    total = len(idx) + a.x_test.shape[0]

    def tick(offset):
        return None if progress is None else (lambda _p, d, _t, i: progress(phase, offset + d, total, i))

    f_tr = extract_features(backbone, a.x_train[idx], a.info, device, progress=tick(0)).double()
    f_te = extract_features(backbone, a.x_test, a.info, device, progress=tick(len(idx))).double()
    mu, sd = f_tr.mean(0), f_tr.std(0).clamp_min(1e-6)
    f_tr, f_te = (f_tr - mu) / sd, (f_te - mu) / sd
    y_tr, y_te = torch.from_numpy(a.y_train[idx]), torch.from_numpy(a.y_test)
    k = a.info.num_classes
    cut = int(0.8 * len(idx))
    val = {l2: _accuracy(_fit_linear(f_tr[:cut], y_tr[:cut], k, l2), f_tr[cut:], y_tr[cut:]) for l2 in PROBE_L2}
    best = max(PROBE_L2, key=lambda l2: (val[l2], -l2))  # ties: the smaller penalty
    lin = _fit_linear(f_tr, y_tr, k, best)
    return {"accuracy": _accuracy(lin, f_te, y_te), "train_accuracy": _accuracy(lin, f_tr, y_tr), "l2": best,
            "validation": {str(l2): v for l2, v in val.items()}, "train_images": len(idx),
            "test_images": int(a.x_test.shape[0]), "dataset": a.info.name}


def linear_probe(backbone: Backbone, cifar10_arrays: Arrays, *, device: torch.device | str = "cpu",
                 train_subset: int = PROBE_TRAIN_SUBSET) -> float:
    """CIFAR-10 test accuracy of a linear classifier on the frozen features (see linear_probe_details)."""
    return linear_probe_details(backbone, cifar10_arrays, device=device, train_subset=train_subset)["accuracy"]


# --------------------------------------------------------------------------- pretrain


def pretrain(name: str, data_dir: Path | str | None, *, recipe: Recipe | str | None = None,
             progress: Progress | None = None, device: str | None = None, force: bool = False) -> BackboneInfo:
    """Pretrain backbone ``name`` on CIFAR-100 from ``data_dir`` and write its cache; an existing valid cache
    is reused (``force`` trains again), a corrupt one is an error. ``recipe``: a Recipe, a preset name, or
    None for the preset of ``device`` (default: cuda if available, else cpu). Needs cifar10.npz too (probe)."""
    spec = backbone_spec(name)
    dev = torch.device(device or default_device())
    rec = resolve_recipe(name, recipe, dev.type)
    data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
    c100 = load_dataset("cifar100", data_dir)
    key = cache_key(name, rec, c100.digest)
    weights, sidecar = cache_paths(name, data_dir, key)
    if sidecar.is_file() and not force:
        meta, state, sha = verified_state(weights, sidecar, "rerun with --force to rebuild it")
        load_weights(seeded_backbone(name, c100.info.num_classes, rec.seed), state, name, weights)  # still this architecture
        return BackboneInfo(name, sha[:16], str(weights), meta.get("recipe", rec.to_dict()), meta.get("metrics", {}),
                            key, spec.arch_record())
    c10 = load_dataset("cifar10", data_dir)
    t0 = time.perf_counter()
    model = seeded_backbone(name, c100.info.num_classes, rec.seed).to(dev)
    train_stats = train_backbone(model, c100, rec, dev, progress)
    t_train = time.perf_counter() - t0
    test_acc = evaluate(model, c100, dev, progress)
    t_eval = time.perf_counter() - t0 - t_train
    probe = {"pretrained": linear_probe_details(model, c10, device=dev, progress=progress, phase="probe pretrained")}
    random_ref = seeded_backbone(name, c100.info.num_classes, rec.seed).to(dev)  # the network training started from
    probe["random"] = linear_probe_details(random_ref, c10, device=dev, progress=progress, phase="probe random")
    t_probe = time.perf_counter() - t0 - t_train - t_eval

    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    from safetensors.torch import save_file
    write_atomic(weights, lambda tmp: save_file(state, tmp, metadata={"backbone": name, "key": key}))
    sha = file_sha256(weights)
    metrics = {"cifar100_test_accuracy": test_acc, **{f"cifar100_{k}": v for k, v in train_stats.items()},
               "probe": probe}
    meta = {
        "format": SIDECAR_FORMAT, "backbone": name, "key": key, "weights": weights.name, "sha256": sha,
        "recipe": rec.to_dict(), "arch": spec.arch_record(), "cifar100_digest": c100.digest,
        "cifar10_digest": c10.digest, "metrics": metrics, "torch": torch.__version__, "device": str(dev),
        "threads": torch.get_num_threads(),
        "seconds": {"train": round(t_train, 1), "eval": round(t_eval, 1), "probe": round(t_probe, 1),
                    "total": round(time.perf_counter() - t0, 1)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_atomic(sidecar, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return BackboneInfo(name, sha[:16], str(weights), rec.to_dict(), metrics, key, spec.arch_record(), trained_now=True)


def backbone_names(which: str) -> list[str]:
    """Backbone names for ``--backbone``: one name or ``all``."""
    if which == "all":
        return list(BACKBONES)
    if which not in BACKBONES:
        raise choice_error("backbone", which, [*BACKBONES, "all"])
    return [which]
