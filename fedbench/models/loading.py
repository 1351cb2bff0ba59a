"""The run-time backbone loader: the pretrained weight cache's recipes, keys and files, and
``load_backbone``, which every federated-LoRA run goes through (the trainer that fills the cache is
``fedbench/pretrain.py``).

``key`` = sha256 of the canonical JSON of (backbone name, recipe, architecture hyper-parameters and
``ARCH_VERSION``, CIFAR-100 content digest), first 16 hex digits: a different recipe, architecture or
dataset never reuses a cache. ``load_backbone`` reads it back (or a ``--model-path`` checkpoint) and
checks the file against its sidecar and the architecture; every problem is a one-line
:class:`ConfigError` naming the file.

The default recipe is the preset of the device that runs (``Recipe.for_device(name, "cpu")`` or
``"cuda"``), in ``pretrain`` and ``load_backbone`` alike, so both find the same cache on one machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedbench.data.sources import DATASETS, default_data_dir, load_npz
from fedbench.data.transforms import AUGMENTATIONS
from fedbench.errors import ConfigError, choice_error
from fedbench.files import file_sha256
from fedbench.models.backbones import Backbone, backbone_spec
from fedbench.seeding import derive

OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("fp32", "bf16")
RECIPE_PRESETS = ("cpu", "cuda")
INITS = ("pretrained", "random")
SIDECAR_FORMAT = 1

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


def verified_state(weights: Path, sidecar: Path, fix: str) -> tuple[dict, dict[str, torch.Tensor], str]:
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
            meta, state, sha = verified_state(path, sidecar, "replace the file or remove its sidecar")
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
    meta, state, sha = verified_state(weights, sidecar, f"rebuild it with {rebuild}")
    load_weights(model, state, name, weights)
    return model.eval(), BackboneInfo(name, sha[:16], str(weights), meta.get("recipe", rec.to_dict()),
                                      meta.get("metrics", {}), key, spec.arch_record())
