"""CNN-1 .. CNN-5 (spec A.2, from the pFedLoRA authors' code).

Input 3x32x32; 5x5 convolutions without padding, each followed by ReLU and 2x2 max-pooling; then
fc1 (ReLU), fc2 (ReLU, the 500-d representation h) and the classifier fc3. ``forward`` returns
``(logits, h)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedbench.errors import ConfigError, choice_error

REP_DIM = 500

# name -> (conv1 channels, conv2 channels, fc1 width)
CNN_WIDTHS: dict[str, tuple[int, int, int]] = {
    "cnn1": (16, 32, 2000),
    "cnn2": (16, 16, 2000),
    "cnn3": (16, 32, 1000),
    "cnn4": (16, 32, 800),
    "cnn5": (16, 32, 500),
}
MODEL_GROUPS = ("hetero", *CNN_WIDTHS)


class CNN(nn.Module):
    def __init__(self, conv1: int, conv2: int, fc1: int, num_classes: int, rep_dim: int = REP_DIM):
        super().__init__()
        self.conv1 = nn.Conv2d(3, conv1, 5)
        self.conv2 = nn.Conv2d(conv1, conv2, 5)
        self.fc1 = nn.Linear(conv2 * 5 * 5, fc1)
        self.fc2 = nn.Linear(fc1, rep_dim)
        self.fc3 = nn.Linear(rep_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The 500-d representation h."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return F.relu(self.fc2(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.fc3(h), h


@dataclass(frozen=True)
class ModuleSpec:
    """A hashable recipe for a module: ``kind`` picks the builder, ``args`` its keyword arguments.

    Client state is tensors; the engine keeps one module per spec as a workspace and binds the
    current client's tensors to it, so no model object is built per client per round.
    """

    kind: str
    args: tuple[tuple[str, Any], ...]

    @staticmethod
    def of(kind: str, **args) -> ModuleSpec:
        return ModuleSpec(kind, tuple(sorted(args.items())))

    def build(self) -> nn.Module:
        return BUILDERS[self.kind](**dict(self.args))

    def __str__(self) -> str:
        inner = ", ".join(f"{k}={v}" for k, v in self.args)
        return f"{self.kind}({inner})"


BUILDERS: dict[str, Any] = {}


def builder(kind: str):
    def deco(fn):
        BUILDERS[kind] = fn
        return fn
    return deco


@builder("cnn")
def _build_cnn(name: str, num_classes: int) -> CNN:
    return CNN(*CNN_WIDTHS[name], num_classes=num_classes)


@builder("linear")
def _build_linear(d_in: int, d_out: int, bias: bool = True) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=bias)


def linear_spec(d_in: int, d_out: int, bias: bool = True) -> ModuleSpec:
    return ModuleSpec.of("linear", d_in=d_in, d_out=d_out, bias=bias)


def cnn_spec(name: str, num_classes: int) -> ModuleSpec:
    if name not in CNN_WIDTHS:
        raise choice_error("model", name, CNN_WIDTHS)
    return ModuleSpec.of("cnn", name=name, num_classes=num_classes)


def model_assignment(models: str, num_clients: int) -> list[str]:
    """Architecture name per client: ``hetero`` gives client i CNN-(i mod 5 + 1)."""
    if models == "hetero":
        return [f"cnn{i % 5 + 1}" for i in range(num_clients)]
    if models in CNN_WIDTHS:
        return [models] * num_clients
    raise ConfigError(f"unknown --models {models!r}; choose from: {', '.join(MODEL_GROUPS)}")
