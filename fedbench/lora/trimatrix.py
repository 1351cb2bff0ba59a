"""Tri-matrix LoRA (CE-LoRA, spec §3.15) in PEFT's layout, next to the two-factor layers of layers.py.

For each target with frozen W0 (d_out x d_in): ``lora_A`` (r x d_in; for a convolution a conv with W0's
kernel, stride and padding into r channels), ``lora_C`` (r x r; a 1x1 convolution for a conv target),
``lora_B`` (d_out x r); output ``W0 x + s B (C (A x))``, so the effective weight is ``W0 + s B C A``.
The reference code (1503552056/CE-LoRA, ``LinearLoRATriple``) stores A as (d_in, r), C as (r, r), B as
(r, d_out) and computes ``x A C B``: the same map transposed (our A, C, B are its A^T, C^T, B^T).

Initialisations (``init``):
* ``peft``: A Kaiming-uniform(a = sqrt(5)) as PEFT, B = 0, C = I (W_eff = W0 at the start);
* ``random-b``: A and B Kaiming-uniform(a = sqrt(5)) (nn.Linear's default, B: U(+-1/sqrt(r))), C = 0
  (W_eff = W0 at the start, and dL/dC = s B^T g (A x)^T is not zero);
* ``reference``: the reference code's A ~ N(0, 1e-3^2), B = 0, C = I. With B = 0, dL/dC = s B^T g (A x)^T
  = 0 exactly: training C alone from this start never moves it (spec §6.5).

``TriLoRALayer`` is a ``LoRALayer`` (same merge and weight) whose forward also runs the two-factor
``AdapterSet`` of layers.py, so a backbone injected with it serves both kinds of adapters.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedbench.lora.layers import AdapterSet, LoRALayer, Target, inject
from fedbench.models.cnn import ModuleSpec, builder

TRI_INITS = ("peft", "random-b", "reference")
REFERENCE_A_STD = 1e-3  # LinearLoRATriple(init_scale=1e-3)


class TriAdapterSet(AdapterSet):
    """``lora_A``, ``lora_C``, ``lora_B`` and ``scaling`` of one party for every target."""

    def __init__(self, targets: tuple, rank: int, alpha: float, rslora: bool, init: str = "peft") -> None:
        super().__init__(targets, rank, alpha, rslora)  # A Kaiming-uniform, B = 0
        if init not in TRI_INITS:
            raise ValueError(f"tri-matrix init {init!r}: choose from {', '.join(TRI_INITS)}")
        self.init = init
        self.lora_C = nn.ModuleDict()
        for t in targets:
            c = nn.Linear(rank, rank, bias=False) if t.kind == "linear" else nn.Conv2d(rank, rank, 1, bias=False)
            with torch.no_grad():
                if init == "random-b":
                    c.weight.zero_()
                    nn.init.kaiming_uniform_(self.lora_B[t.key].weight, a=math.sqrt(5))
                else:
                    c.weight.copy_(torch.eye(rank).reshape(c.weight.shape))
                if init == "reference":
                    nn.init.normal_(self.lora_A[t.key].weight, mean=0.0, std=REFERENCE_A_STD)
            self.lora_C[t.key] = c

    def core(self, key: str) -> torch.Tensor:
        """C as r x r (a view of the parameter)."""
        w = self.lora_C[key].weight
        return w.reshape(w.shape[0], -1)

    def delta(self, key: str) -> torch.Tensor:
        """s B C A (d_out x d_in)."""
        a, b = self.factors(key)
        return self.scaling * (b @ self.core(key) @ a)


@builder("lora-tri-adapters")
def _build_tri(targets: tuple, rank: int, alpha: float, rslora: bool, init: str) -> TriAdapterSet:
    return TriAdapterSet(targets, rank, alpha, rslora, init)


def tri_adapter_spec(targets: list[Target], rank: int, alpha: float, rslora: bool, init: str) -> ModuleSpec:
    return ModuleSpec.of("lora-tri-adapters", targets=tuple(targets), rank=rank, alpha=alpha, rslora=rslora,
                         init=init)


class TriLoRALayer(LoRALayer):
    """A frozen base layer plus the active party's adapter: ``s B C A`` for a TriAdapterSet, ``s B A`` for a
    two-factor AdapterSet (as LoRALayer), nothing when none is active."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        ad = self.adapters
        if ad is not None:
            key = self.target.key
            h = ad.lora_A[key](x)
            if isinstance(ad, TriAdapterSet):
                h = ad.lora_C[key](h)
            out = out + ad.lora_B[key](h) * ad.scaling
        return out


def inject_tri(backbone: nn.Module, targets: list[Target]) -> dict[str, TriLoRALayer]:
    """Wrap every target of ``backbone`` in a TriLoRALayer (replacing a plain LoRALayer already there)."""
    return inject(backbone, targets, TriLoRALayer)
