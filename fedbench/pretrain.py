"""Offline pretraining of the backbones on CIFAR-100, the weight cache, and the linear probe.

``pretrain(name, data_dir)`` trains backbone ``name`` (``fedbench/models/backbones.py``) on all 50k
CIFAR-100 training images with its :class:`Recipe`, evaluates it on the CIFAR-100 test set, runs the
linear probe on CIFAR-10 for it and for the randomly initialised network it started from, and writes

    <data_dir>/backbones/<name>-<key>.safetensors   every weight (the CIFAR-100 head included), fp32
    <data_dir>/backbones/<name>-<key>.json          sidecar: recipe, key, file sha256, metrics, torch
                                                    version, seconds, threads

``key`` = sha256 of the canonical JSON of (backbone name, recipe, architecture hyper-parameters and
``ARCH_VERSION``, CIFAR-100 content digest), first 16 hex digits: a different recipe, architecture
or dataset never reuses a cache. ``load_backbone`` reads it back (or a ``--model-path`` checkpoint)
and checks the file against its sidecar and the architecture; every problem is a one-line
:class:`ConfigError` naming the file.

The default recipe is the preset of the device that runs (``Recipe.for_device(name, "cpu")`` or
``"cuda"``), in ``pretrain`` and ``load_backbone`` alike, so both find the same cache on one machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedbench.data.sources import DATASETS, Arrays, default_data_dir, load_dataset, load_npz
from fedbench.data.transforms import AUGMENTATIONS, BatchTransform
from fedbench.errors import ConfigError, choice_error
from fedbench.files import file_sha256, write_atomic
from fedbench.models.backbones import BACKBONES, Backbone, ResNet, backbone_spec
from fedbench.seeding import derive, numpy_rng, torch_generator

OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("fp32", "bf16")
RECIPE_PRESETS = ("cpu", "cuda")
INITS = ("pretrained", "random")
SIDECAR_FORMAT = 1
PROBE_TRAIN_SUBSET = 10_000  # CIFAR-10 training images the linear probe fits on (fixed, seeded subset)
PROBE_L2 = (1e-4, 1e-3, 1e-2, 1e-1)  # L2 penalties tried on a held-out 20% of that subset

# Progress callback: (phase, done, total, info); phase is "train", "eval", "probe pretrained" or "probe random".
Progress = Callable[[str, int, int, dict], None]


@dataclass(frozen=True)
class Recipe:
    """How a backbone is pretrained. Every field is part of the cache key.

    The learning rate warms up linearly from 0 over ``warmup_epochs`` and then follows a cosine to 0,
    per step. Weight decay applies to weight matrices and kernels only (not to biases, norms or the
    position embedding). ``momentum`` is SGD's (Nesterov) momentum or AdamW's beta1. ``precision``
    ``bf16`` runs the training forward under bf16 autocast (weights, optimiser and the saved file stay
    fp32; evaluation and the probe run in fp32). ``augmentation`` is a ``BatchTransform`` train mode.
    """

    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    weight_decay: float
    warmup_epochs: float = 1.0
    momentum: float = 0.9
    label_smoothing: float = 0.1
    augmentation: str = "flip-crop"
    precision: str = "bf16"
    grad_clip: float = 0.0  # max gradient norm; 0 = no clipping
    seed: int = 0

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise choice_error("recipe optimizer", self.optimizer, OPTIMIZERS)
        if self.augmentation not in AUGMENTATIONS:
            raise choice_error("recipe augmentation", self.augmentation, AUGMENTATIONS)
        if self.precision not in PRECISIONS:
            raise choice_error("recipe precision", self.precision, PRECISIONS)
        for f, low in (("epochs", 1), ("batch_size", 1)):
            if getattr(self, f) < low:
                raise ConfigError(f"recipe {f} must be >= {low}, got {getattr(self, f)}")
        if not self.lr > 0:
            raise ConfigError(f"recipe lr must be > 0, got {self.lr}")
        for f in ("weight_decay", "warmup_epochs", "grad_clip", "momentum"):
            if getattr(self, f) < 0:
                raise ConfigError(f"recipe {f} must be >= 0, got {getattr(self, f)}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"recipe label_smoothing must lie in [0, 1), got {self.label_smoothing}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def for_device(cls, name: str, device: str = "cpu") -> Recipe:
        """The preset recipe of backbone ``name`` for ``device`` ("cpu" or "cuda")."""
        backbone_spec(name)
        if device not in RECIPE_PRESETS:
            raise choice_error("recipe preset", device, RECIPE_PRESETS)
        if (name, device) not in PRESETS:
            raise ConfigError(f"backbone {name} has no preset pretraining recipe; pretrain it with a Recipe "
                              f"(fedbench.pretrain.pretrain(..., recipe=Recipe(...))), load weights with "
                              f"--model-path, or run it with --backbone-init random")
        return PRESETS[(name, device)]


# CPU presets: sized for about 15 minutes each with one thread of the 2-core development CPU
# (measured: 14.5 and 16.7 minutes with the other core busy; docs/backbones.md). CUDA presets: more epochs and a bigger batch (not
# measured here: no GPU was available when they were written).
PRESETS: dict[tuple[str, str], Recipe] = {
    ("vit", "cpu"): Recipe(epochs=7, batch_size=256, optimizer="adamw", lr=2e-3, weight_decay=0.05,
                           warmup_epochs=1.0, momentum=0.9, grad_clip=1.0),
    ("vit", "cuda"): Recipe(epochs=100, batch_size=512, optimizer="adamw", lr=2e-3, weight_decay=0.05,
                            warmup_epochs=5.0, momentum=0.9, grad_clip=1.0),
    ("resnet", "cpu"): Recipe(epochs=10, batch_size=128, optimizer="sgd", lr=0.1, weight_decay=5e-4,
                              warmup_epochs=1.0, momentum=0.9),
    ("resnet", "cuda"): Recipe(epochs=100, batch_size=512, optimizer="sgd", lr=0.2, weight_decay=5e-4,
                               warmup_epochs=5.0, momentum=0.9),
}
# measured minutes of the CPU presets (one thread of the busy 2-core CPU), for the "no cache yet" message
PRESET_MINUTES = {("vit", "cpu"): 15, ("resnet", "cpu"): 17}


@dataclass(frozen=True)
class BackboneInfo:
    """What a loaded backbone is. ``digest``: sha256[:16] of the weight file, or ``random-<seed>``."""

    name: str
    digest: str
    source: str
    recipe: dict[str, Any]
    metrics: dict[str, Any]
    key: str | None = None
    arch: dict[str, Any] = field(default_factory=dict)
    trained_now: bool = False  # pretrain() trained it in this call (False: an existing cache was reused)


# --------------------------------------------------------------------------- keys, files


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_recipe(name: str, recipe: Recipe | str | None, device: str | None = None) -> Recipe:
    """``None`` or ``"auto"``: the preset of ``device`` (default: cuda if available, else cpu); a preset name; or
    a :class:`Recipe` as is."""
    if isinstance(recipe, Recipe):
        return recipe
    if recipe is None or recipe == "auto":
        recipe = device or default_device()
    return Recipe.for_device(name, str(recipe))


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def cache_key(name: str, recipe: Recipe, cifar100_digest: str) -> str:
    material = {"backbone": name, "recipe": recipe.to_dict(), "arch": backbone_spec(name).arch_record(),
                "cifar100": cifar100_digest}
    return hashlib.sha256(_canonical(material).encode()).hexdigest()[:16]


def cache_paths(name: str, data_dir: Path, key: str) -> tuple[Path, Path]:
    """(weights, sidecar) of backbone ``name`` with cache ``key`` in ``data_dir``."""
    stem = Path(data_dir) / "backbones" / f"{name}-{key}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


_DIGESTS: dict[tuple, str] = {}


def cifar100_digest(data_dir: Path) -> str:
    """Content digest of ``<data_dir>/cifar100.npz`` (memoised per file size and mtime)."""
    path = Path(data_dir) / "cifar100.npz"
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"no cifar100.npz in data dir {data_dir}: the pretrained backbone cache is identified "
                          f"by the CIFAR-100 it was trained on; set --data-dir, or load weights with "
                          f"--model-path") from None
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo not in _DIGESTS:
        _DIGESTS[memo] = load_npz(path, DATASETS["cifar100"]).digest
    return _DIGESTS[memo]


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file or a ``torch.save`` file (loaded with ``weights_only=True``;
    a top-level ``{"state_dict": ...}`` is unwrapped). Told apart by content, not by extension."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        if len(head) == 9 and head[8:9] == b"{":  # safetensors: u64 header length, then its JSON
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unreadable, truncated, a pickle that is not plain weights
        raise ConfigError(f"cannot read checkpoint {path}: {_first_line(e)}") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"checkpoint {path} is not a state dict (a mapping of parameter names to tensors)")
    return dict(state)


def load_weights(model: Backbone, state: Mapping[str, torch.Tensor], name: str, where: Path) -> None:
    """Copy every weight of ``state`` except the head into ``model``, after checking that it is exactly the
    architecture of ``model``: the first missing key, unexpected key or shape mismatch is named."""
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    given = {k: v for k, v in state.items() if not k.startswith("head.")}
    what = f"checkpoint {where} is not a {name} backbone of this architecture ({backbone_spec(name).about})"
    for k in expected:
        if k not in given:
            raise ConfigError(f"{what}: missing key {k!r}")
    for k in given:
        if k not in expected:
            raise ConfigError(f"{what}: unexpected key {k!r}")
    for k, v in expected.items():
        if tuple(given[k].shape) != tuple(v.shape):
            raise ConfigError(f"{what}: key {k!r} has shape {tuple(given[k].shape)}, expected {tuple(v.shape)}")
        if given[k].is_floating_point() and not torch.isfinite(given[k]).all():
            raise ConfigError(f"checkpoint {where}: key {k!r} holds non-finite values")
    with torch.no_grad():
        for k, v in expected.items():
            v.copy_(given[k])


def seeded_backbone(name: str, num_classes: int, seed: int) -> Backbone:
    """Backbone ``name`` initialised from ``seed`` without touching torch's global RNG. The body is built
    before the head, so its weights do not depend on ``num_classes``."""
    spec = backbone_spec(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive(seed, "backbone-init", name))
        return spec.build(num_classes)


# --------------------------------------------------------------------------- sidecar checks


def _read_sidecar(sidecar: Path) -> dict:
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"backbone sidecar {sidecar} is corrupt: {_first_line(e)}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), str):
        raise ConfigError(f"backbone sidecar {sidecar} is corrupt: no sha256 of its weight file")
    return meta


def _verified_state(weights: Path, sidecar: Path, fix: str) -> tuple[dict, dict[str, torch.Tensor], str]:
    """Sidecar, state and sha256 of a cache entry whose file matches its sidecar; else a ConfigError."""
    meta = _read_sidecar(sidecar)
    if not weights.is_file():
        raise ConfigError(f"backbone weights {weights} are missing (its sidecar {sidecar.name} exists); {fix}")
    sha = file_sha256(weights)
    if sha != meta["sha256"]:
        raise ConfigError(f"backbone weights {weights} are corrupt: sha256 {sha[:16]}... does not match "
                          f"{meta['sha256'][:16]}... recorded in {sidecar.name}; {fix}")
    return meta, read_state(weights), sha


def _pretrain_hints(name: str, data_dir: Path, recipe: Recipe) -> tuple[str, str]:
    """How to create the cache of ``recipe`` (with its duration), and how to rebuild it."""
    for preset in RECIPE_PRESETS:
        if PRESETS.get((name, preset)) == recipe:
            cmd = f"fedbench pretrain --backbone {name} --data-dir {data_dir}"
            if preset != default_device():
                cmd += f" --recipe {preset}"
            minutes = PRESET_MINUTES.get((name, preset))
            took = (f"about {minutes} minutes with one thread of a 2-core CPU" if minutes
                    else "a few minutes on a GPU (not measured)")
            return f"`{cmd}` ({took})", f"`{cmd} --force`"
    return "pretrain() with this recipe (it is not a preset)", "pretrain(..., force=True) with this recipe"


# --------------------------------------------------------------------------- load


def load_backbone(name: str, num_classes: int, data_dir: Path | str | None, *, model_path: Path | str | None = None,
                  init: str = "pretrained", seed: int = 0,
                  recipe: Recipe | str | None = None) -> tuple[Backbone, BackboneInfo]:
    """Backbone ``name`` with a fresh head for ``num_classes`` (seeded by ``seed``), in eval mode, on the CPU.

    * ``init="pretrained"`` (default): every weight but the head from the pretrained cache of ``recipe``
      (default: the preset of this machine's device) in ``data_dir``, or from ``model_path`` (a
      safetensors or ``torch.save`` state dict of the same architecture; a sidecar ``<stem>.json`` next
      to it, as the cache writes, is checked and read for recipe and metrics).
    * ``init="random"``: seeded random initialisation, digest ``random-<seed>``.
    """
    if init not in INITS:
        raise choice_error("backbone init", init, INITS)
    spec = backbone_spec(name)
    model = seeded_backbone(name, num_classes, seed)
    if init == "random":
        if model_path is not None:
            raise ConfigError("--model-path and a random backbone init exclude each other")
        return model.eval(), BackboneInfo(name, f"random-{seed}", "random", {}, {}, None, spec.arch_record())
    if model_path is not None:
        path = Path(model_path).expanduser()
        if not path.exists():
            raise ConfigError(f"--model-path {path} does not exist")
        if not path.is_file():
            raise ConfigError(f"--model-path {path} is not a file")
        sidecar = path.with_suffix(".json")
        meta: dict = {}
        if sidecar.is_file() and sidecar != path:
            meta, state, sha = _verified_state(path, sidecar, "replace the file or remove its sidecar")
        else:
            state, sha = read_state(path), file_sha256(path)
        load_weights(model, state, name, path)
        return model.eval(), BackboneInfo(name, sha[:16], str(path), meta.get("recipe", {}), meta.get("metrics", {}),
                                          meta.get("key"), spec.arch_record())
    data_dir = Path(data_dir).expanduser() if data_dir else default_data_dir()
    rec = resolve_recipe(name, recipe)
    key = cache_key(name, rec, cifar100_digest(data_dir))
    weights, sidecar = cache_paths(name, data_dir, key)
    create, rebuild = _pretrain_hints(name, data_dir, rec)
    if not sidecar.is_file():
        raise ConfigError(f"no pretrained {name} backbone for this recipe in {weights.parent} (expected "
                          f"{weights.name}); create it with {create}")
    meta, state, sha = _verified_state(weights, sidecar, f"rebuild it with {rebuild}")
    load_weights(model, state, name, weights)
    return model.eval(), BackboneInfo(name, sha[:16], str(weights), meta.get("recipe", rec.to_dict()),
                                      meta.get("metrics", {}), key, spec.arch_record())


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
        meta, state, sha = _verified_state(weights, sidecar, "rerun with --force to rebuild it")
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
