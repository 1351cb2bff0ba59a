"""LoRA layers in PEFT's anatomy, injected once into the shared frozen backbone.

For each target layer (``nn.Linear`` or ``nn.Conv2d``) with frozen weight W0 (d_out x d_in):
``lora_A`` (r x d_in; for a convolution a conv with W0's kernel, stride and padding into r channels),
``lora_B`` (d_out x r; a 1x1 convolution), B zero-initialised, A Kaiming-uniform(a = sqrt(5)) (PEFT's
default), scaling s = alpha / r (rsLoRA: alpha / sqrt(r)); output ``W0 x + s B (A x)``, so the
effective weight is ``W0 + s B A`` (A flattened over its kernel for a convolution).

Why not Hugging Face ``peft``'s layers: fedbench keeps one backbone in memory for all clients and a
client's adapters as tensors bound to one workspace module (engine/state.py), so a LoRA layer here
holds no adapter of its own: ``activate`` points every injected layer at the adapters of the client
being computed. PEFT's ``LoraLayer`` owns its adapters per module and name, so N clients would mean N
named adapters on every layer (and no way to bind a client's tensors without copying them). The math
and the parameter names (``lora_A``, ``lora_B``, ``scaling``) are PEFT's; ``tests/test_lora.py`` checks
our layer against ``peft`` when it is installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fedbench.errors import ConfigError
from fedbench.models.cnn import ModuleSpec, builder

# named target presets per backbone kind (a comma list of module-name suffixes also works)
TARGET_PRESETS = {
    "attn": ("q_proj", "v_proj"),
    "attn-all": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "attn-mlp": ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"),
    "conv": ("conv1", "conv2"),
}


@dataclass(frozen=True)
class Target:
    """One adapted layer of the backbone."""

    name: str            # module path in the backbone, e.g. "blocks.0.attn.q_proj"
    kind: str            # "linear" | "conv"
    d_in: int            # input features (conv: in_channels * kh * kw, the flattened fan-in)
    d_out: int
    conv: tuple = ()     # (in_channels, kernel, stride, padding) for a convolution

    @property
    def key(self) -> str:  # a ModuleDict key (no dots)
        return self.name.replace(".", "__")

    @property
    def max_rank(self) -> int:
        return min(self.d_in, self.d_out)

    def factor_numel(self, r: int) -> int:
        """P(r) = r (d_in + d_out): the parameters of A and B at rank r."""
        return r * (self.d_in + self.d_out)


def find_targets(backbone: nn.Module, targets: str) -> list[Target]:
    """The backbone's layers named by ``targets`` (a preset or a comma list of name suffixes)."""
    wanted = TARGET_PRESETS.get(targets) or tuple(t.strip() for t in targets.split(",") if t.strip())
    found: list[Target] = []
    seen_suffix = set()
    for name, m in backbone.named_modules():
        suffix = name.rsplit(".", 1)[-1]
        if suffix not in wanted or name.startswith("head"):
            continue
        if isinstance(m, nn.Linear):
            found.append(Target(name, "linear", m.in_features, m.out_features))
        elif isinstance(m, nn.Conv2d) and m.groups == 1 and m.dilation == (1, 1):
            kh, kw = m.kernel_size
            found.append(Target(name, "conv", m.in_channels * kh * kw, m.out_channels,
                                (m.in_channels, m.kernel_size, m.stride, m.padding)))
        else:
            continue
        seen_suffix.add(suffix)
    missing = [w for w in wanted if w not in seen_suffix]
    if missing or not found:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in backbone.named_modules()
                        if isinstance(m, (nn.Linear, nn.Conv2d)) and not n.startswith("head")})
        bad = missing[0] if missing else targets
        raise ConfigError(f"--targets: the backbone has no linear or convolution layer named {bad!r}; "
                          f"presets: {', '.join(TARGET_PRESETS)}; layer names: {', '.join(names)}")
    return found


def scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


class AdapterSet(nn.Module):
    """The LoRA factors of one party for every target: ``lora_A[key]``, ``lora_B[key]``, and ``scaling``."""

    def __init__(self, targets: tuple, rank: int, alpha: float, rslora: bool) -> None:
        super().__init__()
        self.rank = rank
        self.scaling = scaling(alpha, rank, rslora)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        for t in targets:
            if t.kind == "linear":
                a = nn.Linear(t.d_in, rank, bias=False)
                b = nn.Linear(rank, t.d_out, bias=False)
            else:
                cin, k, stride, pad = t.conv
                a = nn.Conv2d(cin, rank, k, stride, pad, bias=False)
                b = nn.Conv2d(rank, t.d_out, 1, bias=False)
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)
            self.lora_A[t.key] = a
            self.lora_B[t.key] = b

    def factors(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A as r x d_in, B as d_out x r): views of the parameters in PEFT's matrix layout."""
        a, b = self.lora_A[key].weight, self.lora_B[key].weight
        return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)

    def delta(self, key: str) -> torch.Tensor:
        """s B A (d_out x d_in)."""
        a, b = self.factors(key)
        return self.scaling * (b @ a)


@builder("lora-adapters")
def _build_adapters(targets: tuple, rank: int, alpha: float, rslora: bool) -> AdapterSet:
    return AdapterSet(targets, rank, alpha, rslora)


def adapter_spec(targets: list[Target], rank: int, alpha: float, rslora: bool) -> ModuleSpec:
    return ModuleSpec.of("lora-adapters", targets=tuple(targets), rank=rank, alpha=alpha, rslora=rslora)


class LoRALayer(nn.Module):
    """A frozen base layer plus the active party's adapter for it (none: the base layer alone)."""

    def __init__(self, base: nn.Module, target: Target) -> None:
        super().__init__()
        self.base = base
        self.target = target
        self.adapters: AdapterSet | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        ad = self.adapters
        if ad is not None:
            key = self.target.key
            out = out + ad.lora_B[key](ad.lora_A[key](x)) * ad.scaling
        return out

    @torch.no_grad()
    def merge(self, delta: torch.Tensor) -> None:
        """W0 <- W0 + delta (d_out x d_in): for methods that fold updates into the backbone (FLoRA,
        FedEx-LoRA). The backbone is shared, so this is the global model's backbone for every client."""
        w = self.base.weight
        w.add_(delta.to(w.dtype).reshape(w.shape))

    def weight(self) -> torch.Tensor:
        """The current base weight as d_out x d_in."""
        w = self.base.weight
        return w.reshape(w.shape[0], -1)


def inject(backbone: nn.Module, targets: list[Target], layer: type | None = None) -> dict[str, LoRALayer]:
    """Wrap every target of ``backbone`` in a LoRALayer (once); returns key -> layer. ``layer``: a
    LoRALayer subclass to wrap with instead (a LoRALayer of another class already there is replaced by
    one around the same base layer: its merges live in the base weight, so nothing is lost)."""
    layer = layer or LoRALayer
    layers = {}
    for t in targets:
        parent_name, _, child = t.name.rpartition(".")
        parent = backbone.get_submodule(parent_name) if parent_name else backbone
        current = getattr(parent, child)
        if isinstance(current, layer):
            layers[t.key] = current
            continue
        wrapped = layer(current.base if isinstance(current, LoRALayer) else current, t)
        setattr(parent, child, wrapped)
        layers[t.key] = wrapped
    return layers


def activate(layers: dict[str, LoRALayer], adapters: AdapterSet | None) -> None:
    for layer in layers.values():
        layer.adapters = adapters
