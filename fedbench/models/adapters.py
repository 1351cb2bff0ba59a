"""Adapters for FedLoRA (spec B.3). All are [reconstruction]s: the paper's adapter is unknown.

* ``LoRAHead`` (design H): LoRA in parallel with the shared classifier fc3 on the 500-d
  representation: ``logits = fc3(h) + scale * B(A(h))``, A: rep_dim -> r, B: r -> K, B zero-initialised
  (PEFT naming: ``lora_A``, ``lora_B``, ``scaling``).
* ``SmallCNN`` (design S): a small homogeneous CNN reading the image, added to the local logits.
  ``dimred`` narrows it (conv 8/16 channels, FC widths r); ``decomp`` keeps CNN-5's convolutions and
  factors every FC weight W (out x in) as B (out x r) A (r x in).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fedbench.models.cnn import REP_DIM, builder


class LoRAHead(nn.Module):
    def __init__(self, rank: int, num_classes: int, scale: float = 1.0, init: str = "kaiming",
                 rep_dim: int = REP_DIM):
        super().__init__()
        self.lora_A = nn.Linear(rep_dim, rank, bias=False)
        self.lora_B = nn.Linear(rank, num_classes, bias=False)
        self.scaling = scale
        self.init = init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.init == "normal":
            nn.init.normal_(self.lora_A.weight, 0.0, 1.0)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.lora_A(h)) * self.scaling


class LowRankLinear(nn.Module):
    """W ~ B A with rank r (A: in -> r without bias, B: r -> out with bias)."""

    def __init__(self, d_in: int, d_out: int, rank: int):
        super().__init__()
        self.A = nn.Linear(d_in, rank, bias=False)
        self.B = nn.Linear(rank, d_out)

    def forward(self, x):
        return self.B(self.A(x))


class SmallCNN(nn.Module):
    def __init__(self, variant: str, rank: int, num_classes: int):
        super().__init__()
        if variant == "dimred":
            c1, c2, f1, f2 = 8, 16, rank, rank
            self.conv1, self.conv2 = nn.Conv2d(3, c1, 5), nn.Conv2d(c1, c2, 5)
            self.fc1, self.fc2 = nn.Linear(c2 * 25, f1), nn.Linear(f1, f2)
            self.fc3 = nn.Linear(f2, num_classes)
        elif variant == "decomp":
            self.conv1, self.conv2 = nn.Conv2d(3, 16, 5), nn.Conv2d(16, 32, 5)
            self.fc1 = LowRankLinear(800, 500, rank)
            self.fc2 = LowRankLinear(500, REP_DIM, rank)
            self.fc3 = LowRankLinear(REP_DIM, num_classes, rank)
        else:
            raise ValueError(variant)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


@builder("lora-head")
def _build_lora_head(rank: int, num_classes: int, scale: float, init: str) -> LoRAHead:
    return LoRAHead(rank, num_classes, scale, init)


@builder("small-cnn")
def _build_small_cnn(variant: str, rank: int, num_classes: int) -> SmallCNN:
    return SmallCNN(variant, rank, num_classes)
