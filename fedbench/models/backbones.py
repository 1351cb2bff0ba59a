"""Small backbones for 32x32 RGB input, pretrained offline on CIFAR-100 (``fedbench/pretrain.py``) and
fine-tuned with LoRA in federated runs, and the registry of backbones.

A backbone is one class registered by name: ``@register_backbone("name")`` on a :class:`Backbone`
subclass whose class attributes ``arch`` (its architecture hyper-parameters, keyword arguments of its
constructor and part of the pretrained cache key) and ``about`` (one line) describe it; a separate
package adds one through entry points in group ``fedbench.backbones`` naming the class.

Every backbone has the same interface (the LoRA engine relies on it exactly):

* ``feature_dim``; ``features(x)`` maps a normalised NCHW float batch to ``(B, feature_dim)``;
* ``head = nn.Linear(feature_dim, num_classes)``; ``forward(x) = head(features(x))``.

No dropout anywhere: the frozen backbone runs in eval mode during federated fine-tuning, and BatchNorm
then uses its running statistics.

* ``vit``: 4x4 patches (64 tokens), learned position embedding, pre-norm blocks
  (``norm1``, ``attn`` with separate ``q_proj``/``k_proj``/``v_proj``/``o_proj``, ``norm2``,
  ``mlp.fc1``/``mlp.fc2`` with GELU), a final ``norm`` and a mean over tokens. Attention scores are two
  explicit ``torch.matmul`` calls, so that ``torch.utils.flop_counter`` sees them;
  ``Attention.extra_macs_per_sample`` gives their multiply-adds for the FLOP meter, which only
  counts parametrised layers.
* ``resnet``: a CIFAR ResNet-8 (3x3 stem, one BasicBlock per stage at widths 32-64-128, 1x1
  projection shortcuts where the shape changes, global average pool).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedbench.plugins import Names, Registry

# Bump when a change to this file alters what a given set of hyper-parameters computes: it is part of
# the pretrained cache key, so stale caches are never reused.
ARCH_VERSION = 1


class Backbone(nn.Module):
    """Base class: subclasses build their body, call ``_make_head`` and implement ``features``. The
    constructor takes ``num_classes`` and the keyword arguments of ``arch``."""

    feature_dim: int
    head: nn.Linear
    arch: dict[str, Any] = {}  # the registered architecture: constructor keywords (part of the cache key)
    about: str = ""  # one line for `fedbench list backbones`

    def _make_head(self, feature_dim: int, num_classes: int) -> None:
        self.feature_dim = feature_dim
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


BACKBONE_REGISTRY = Registry("backbone", "fedbench.backbones", core=())  # the core's register below


def register_backbone(name: str):
    """Class decorator: register a :class:`Backbone` subclass (with its ``arch`` and ``about``) under ``name``."""
    return BACKBONE_REGISTRY.register(name)


# --------------------------------------------------------------------------- ViT


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        B, T, D = t.shape
        return t.view(B, T, self.heads, D // self.heads).transpose(1, 2)  # (B, h, T, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q = self._split(self.q_proj(x) * self.scale)
        k = self._split(self.k_proj(x))
        v = self._split(self.v_proj(x))
        scores = torch.matmul(q, k.transpose(-2, -1))  # (B, h, T, T)
        attn = scores.float().softmax(dim=-1).to(v.dtype)  # softmax in fp32 under autocast
        y = torch.matmul(attn, v).transpose(1, 2).reshape(B, T, D)
        return self.o_proj(y)

    def extra_macs_per_sample(self, x: torch.Tensor) -> int:
        """Multiply-adds per sample of the two parameter-free matmuls (q k^T and attn v) for ``x`` of
        shape (B, T, dim): each is heads x T x T x (dim / heads)."""
        _, T, D = x.shape
        return 2 * T * T * D


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


@register_backbone("vit")
class ViT(Backbone):
    arch = {"dim": 128, "depth": 4, "heads": 4, "mlp_ratio": 2, "patch": 4}
    about = "ViT, 4x4 patches (64 tokens), dim 128, depth 4, 4 heads, MLP 256"

    def __init__(self, num_classes: int, dim: int = 128, depth: int = 4, heads: int = 4, mlp_ratio: int = 2,
                 patch: int = 4, image: int = 32):
        super().__init__()
        tokens = (image // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, dim * mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self._make_head(dim, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight  # like a linear layer on the flattened patch
        nn.init.trunc_normal_(w, std=math.sqrt(1.0 / w[0].numel()))
        nn.init.zeros_(self.patch_embed.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, T, dim)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x).mean(dim=1)


# --------------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


@register_backbone("resnet")
class ResNet(Backbone):
    arch = {"widths": (32, 64, 128), "blocks": (1, 1, 1)}
    about = "CIFAR ResNet-8, widths 32-64-128, one BasicBlock per stage"

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (32, 64, 128), blocks: tuple[int, ...] = (1, 1, 1)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        c = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks, strict=True)):
            layer = []
            for j in range(n):
                layer.append(BasicBlock(c, w, 2 if i > 0 and j == 0 else 1))
                c = w
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
        self.n_stages = len(widths)
        self._make_head(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.n_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x.mean(dim=(2, 3))


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone class and its architecture hyper-parameters (part of the pretrained cache key)."""

    cls: type[Backbone]
    arch: dict[str, Any] = field(default_factory=dict)
    about: str = ""

    def build(self, num_classes: int) -> Backbone:
        return self.cls(num_classes=num_classes, **self.arch)

    def arch_record(self) -> dict[str, Any]:
        """JSON-ready architecture description: class, hyper-parameters, ARCH_VERSION."""
        return {"class": self.cls.__name__, "version": ARCH_VERSION,
                **{k: list(v) if isinstance(v, tuple) else v for k, v in self.arch.items()}}


BACKBONES = Names(BACKBONE_REGISTRY)  # the names, listed when asked (plugins included)


def backbone_spec(name: str) -> BackboneSpec:
    """The registered backbone ``name`` with its architecture; ``ConfigError`` naming the choices otherwise."""
    cls = BACKBONE_REGISTRY.get(name)
    return BackboneSpec(cls, dict(cls.arch), cls.about)


def build_backbone(name: str, num_classes: int) -> Backbone:
    """A freshly initialised backbone (torch's global RNG; see ``fedbench.models.loading.seeded_backbone`` for seeding)."""
    return backbone_spec(name).build(num_classes)


def macs_per_sample(model: nn.Module, image: int = 32) -> int:
    """Forward multiply-adds of one 3 x image x image sample, as ``torch.utils.flop_counter`` counts them
    (linear layers, convolutions and the attention matmuls; 2 FLOPs per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters())
    x = torch.zeros(1, 3, image, image, device=p.device, dtype=p.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() // 2
