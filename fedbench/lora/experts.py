"""Mixture of LoRA experts with a per-layer router (FedLEASE, spec §3.18), for linear targets.

For an adapted linear layer with frozen W0 the output is

    y = W0 x + sum_k g_k(x) s B_k A_k x,       k = 0..M-1,  s = alpha / r (rsLoRA: alpha / sqrt(r))

with the weights g(x) from a bias-free linear router on the layer's input, per token:

* ``adaptive`` (FedLEASE's adaptive top-M over 2M-1 choices, as read in the reference code's
  ``peft/tuners/lora.py`` [code: lei-wang-link/FedLEASE]; the spec has it only [secondary], so fedbench
  marks it [reconstruction]): the router has 2M-1 outputs; p = softmax(logits); keep the M largest p,
  renormalise them to sum 1; slot j < M stands for expert j, every slot j >= M for the client's own
  expert (its cluster's). g_k is the sum of the kept weights of the slots that stand for k. So
  sum_k g_k = 1, and a client can put all its weight on its own expert (up to M slots) or spread it
  over several: the number of experts used adapts per token.
* ``dense``: the router has M outputs, g = softmax(logits) (every expert, no selection).

With M = 1 both give g_0 = 1: the layer is a plain LoRA layer (tests/test_lora_part2d.py).

The layer wraps the family's :class:`~fedbench.lora.layers.LoRALayer` (left unchanged): with no
experts active it is that layer (W0 x, plus a plain LoRA if one is active); methods activate a
party's :class:`ExpertSet` with :func:`activate_experts`. Every product runs in ``nn.Linear`` modules
(A_k, B_k, router), so the FLOP meter counts the experts' and the router's work like any LoRA factor;
the routing itself (softmax, top-k, renormalisation, weighting) is elementwise and, like
``torch.utils.flop_counter``, not counted.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fedbench.lora.layers import LoRALayer, Target, scaling
from fedbench.models.cnn import ModuleSpec, builder

ROUTINGS = ("adaptive", "dense")


def router_slots(experts: int, routing: str) -> int:
    """Outputs of the router: 2M-1 (adaptive) or M (dense)."""
    return 2 * experts - 1 if routing == "adaptive" else experts


def route(logits: torch.Tensor, experts: int, own: int, routing: str) -> torch.Tensor:
    """Expert weights g (..., M) from router logits (..., slots), as defined in the module docstring."""
    p = F.softmax(logits, dim=-1, dtype=torch.float32)
    if routing == "dense":
        return p
    top_w, top_i = torch.topk(p, experts, dim=-1)
    top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    mapping = torch.full((logits.shape[-1],), own, dtype=torch.long, device=logits.device)
    mapping[:experts] = torch.arange(experts, device=logits.device)
    return p.new_zeros(*p.shape[:-1], experts).scatter_add(-1, mapping[top_i], top_w)


class ExpertSet(nn.Module):
    """One party's M LoRA experts and routers for every target: ``lora_A[key][k]`` (r x d_in),
    ``lora_B[key][k]`` (d_out x r), ``router[key]`` (slots x d_in, no bias), and ``scaling``."""

    def __init__(self, targets: tuple, experts: int, rank: int, alpha: float, rslora: bool, routing: str) -> None:
        super().__init__()
        if routing not in ROUTINGS:
            raise ValueError(f"routing {routing!r}: choose from {', '.join(ROUTINGS)}")
        self.experts = experts
        self.rank = rank
        self.routing = routing
        self.scaling = scaling(alpha, rank, rslora)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.router = nn.ModuleDict()
        for t in targets:
            if t.kind != "linear":
                raise ValueError(f"mixture of LoRA experts: {t.name} is a {t.kind} layer; only linear layers")
            self.lora_A[t.key] = nn.ModuleList(nn.Linear(t.d_in, rank, bias=False) for _ in range(experts))
            self.lora_B[t.key] = nn.ModuleList(nn.Linear(rank, t.d_out, bias=False) for _ in range(experts))
            self.router[t.key] = nn.Linear(t.d_in, router_slots(experts, routing), bias=False)
            for a in self.lora_A[t.key]:
                nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            for b in self.lora_B[t.key]:
                nn.init.zeros_(b.weight)
            nn.init.kaiming_uniform_(self.router[t.key].weight, a=math.sqrt(5))

    def factors(self, key: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_k, B_k) of target ``key``: the parameters themselves (r x d_in, d_out x r)."""
        return self.lora_A[key][k].weight, self.lora_B[key][k].weight

    def delta(self, key: str, k: int) -> torch.Tensor:
        """s B_k A_k (d_out x d_in)."""
        a, b = self.factors(key, k)
        return self.scaling * (b @ a)


@builder("lora-experts")
def _build_experts(targets: tuple, experts: int, rank: int, alpha: float, rslora: bool, routing: str) -> ExpertSet:
    return ExpertSet(targets, experts, rank, alpha, rslora, routing)


def experts_spec(targets: list[Target], experts: int, rank: int, alpha: float, rslora: bool,
                 routing: str) -> ModuleSpec:
    return ModuleSpec.of("lora-experts", targets=tuple(targets), experts=experts, rank=rank, alpha=alpha,
                         rslora=rslora, routing=routing)


class MixtureLayer(nn.Module):
    """A LoRALayer plus the active party's experts and router for it (none: the LoRALayer alone)."""

    def __init__(self, inner: LoRALayer) -> None:
        super().__init__()
        self.inner = inner
        self.target = inner.target
        self.experts: ExpertSet | None = None
        self.own = 0  # the active party's own expert (its cluster)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        ex = self.experts
        if ex is not None:
            key = self.target.key
            g = route(ex.router[key](x), ex.experts, self.own, ex.routing).to(out.dtype)
            for k in range(ex.experts):
                out = out + g[..., k:k + 1] * ex.lora_B[key][k](ex.lora_A[key][k](x)) * ex.scaling
        return out


def inject_experts(backbone: nn.Module, layers: dict[str, LoRALayer]) -> dict[str, MixtureLayer]:
    """Wrap every injected LoRALayer of ``backbone`` (``layers``: key -> layer, from ``inject``) in a
    MixtureLayer, once; returns key -> mixture layer."""
    out = {}
    for key, layer in layers.items():
        name = layer.target.name
        parent_name, _, child = name.rpartition(".")
        parent = backbone.get_submodule(parent_name) if parent_name else backbone
        current = getattr(parent, child)
        if isinstance(current, MixtureLayer):
            out[key] = current
            continue
        if current is not layer:
            raise RuntimeError(f"inject_experts: {name} is not the LoRA layer injected there")
        wrapped = MixtureLayer(layer)
        setattr(parent, child, wrapped)
        out[key] = wrapped
    return out


def activate_experts(layers: dict[str, MixtureLayer], experts: ExpertSet | None, own: int = 0) -> None:
    for layer in layers.values():
        layer.experts = experts
        layer.own = own
