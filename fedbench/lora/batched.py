"""Local LoRA training of several clients in one batched pass over the shared frozen backbone.

Generic over "a backbone with adapted layers + a head + a loss" (vision and language tiers alike): the
backbone is called once per step on the concatenated batches of every client still training; each
adapted layer (``LoRALayer``) applies each sample's own client adapter; each client has its own head
(or all share one frozen head); the loss is the sum of each client's own mean loss, so the gradient with
respect to a client's factors is exactly its gradient alone (the backbone is frozen and batch-independent:
eval-mode normalisation, no dropout).

* Factors are stacked per target: ``A`` (C x r_max x d_in), ``B`` (C x d_out x r_max), zero-padded to the
  largest rank. The padded rows of A and columns of B are zero, so ``B A`` and every output are those of
  the unpadded factors; their gradients are zero (the gradient of A's padded rows is s B_pad^T G x = 0, of
  B's padded columns s G (A_pad x)^T = 0), and a zero parameter with zero gradient stays zero under SGD
  (momentum, weight decay) and AdamW (moments 0, update 0 / (0 + eps), decoupled decay of 0): padding
  changes no result (``tests/test_batched.py`` pins it). Each client's scaling s_c = alpha / r_c is its own.
* Clients are ordered by their number of steps (most first), so the ones still training are always a
  prefix of the stack; a client whose batches are exhausted drops out of the batch.
* Optimiser states are stacked per client; the step is written batched and equals torch's SGD
  (momentum, weight decay, dampening 0) and AdamW per client; the gradient-norm clip is per client
  (over that client's own parameters, as ``clip_grad_norm_`` over its optimiser's parameters).
* Linear adapters: one batched matmul per factor when the clients' batches are equally large, else one
  matmul per client segment; convolution adapters: one convolution per client segment.
* FLOPs: the backbone's metered calls are credited to the clients by samples (``joint_pass``); each
  client's adapter and head work is counted at its own rank, with the backward terms of the meter's rule
  (``credit_macs``), so the per-client counts equal the one-by-one path's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fedbench.engine.lockstep import lockstep
from fedbench.lora.layers import LoRALayer, activate


@dataclass
class OptimSettings:
    """The local optimiser of every client: torch's SGD or AdamW hyper-parameters and the gradient clip."""

    kind: str                 # "sgd" | "adamw"
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip: float = 0.0

    @classmethod
    def of(cls, opt: torch.optim.Optimizer, clip: float) -> OptimSettings | None:
        """The settings of a torch optimiser (one parameter group), or None where the batched step does
        not implement it (another optimiser class, Nesterov, dampening, amsgrad, maximize)."""
        if len(opt.param_groups) != 1:
            return None
        g = opt.param_groups[0]
        if type(opt) is torch.optim.AdamW and not g.get("amsgrad") and not g.get("maximize"):
            return cls("adamw", float(g["lr"]), float(g["weight_decay"]), betas=tuple(g["betas"]),
                       eps=float(g["eps"]), clip=clip)
        if type(opt) is torch.optim.SGD and not g.get("nesterov") and not g.get("dampening") \
                and not g.get("maximize"):
            return cls("sgd", float(g["lr"]), float(g["weight_decay"]), momentum=float(g["momentum"]),
                       clip=clip)
        return None


@dataclass
class Member:
    """One client of a joint pass: its own tensors (written back in place at the end), its batches."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # key -> (A r x ..., B d_out x r x ...), its storage
    scaling: float
    batches: Iterable
    steps: int                                   # expected number of batches (orders the stack)
    head: tuple[torch.Tensor, torch.Tensor] | None = None  # (W K x F, b K) of its own trained head
    tag: object = None                           # handed to joint/credit (the engine's client)
    rank: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        a, _ = next(iter(self.factors.values()))
        self.rank = a.shape[0]


def _nothing(*_a, **_k):
    return contextlib.nullcontext()


class _JointView(nn.Module):
    """Stands in for an ``AdapterSet`` on the injected layers: ``lora_A[key](x)`` and ``lora_B[key](u)``
    apply each segment's own client factors (B's output already scaled per client; ``scaling`` is 1). A
    module without parameters or buffers: a layer's ``adapters`` slot takes modules only."""

    scaling = 1.0

    def __init__(self, trainer: JointTrainer, active: int, sizes: list[int]) -> None:
        super().__init__()
        self.lora_A = _Factor(trainer, active, sizes, "A")
        self.lora_B = _Factor(trainer, active, sizes, "B")


class _Factor:
    def __init__(self, trainer: JointTrainer, active: int, sizes: list[int], which: str) -> None:
        self.t, self.active, self.sizes, self.which = trainer, active, sizes, which
        self.equal = all(n == sizes[0] for n in sizes)

    def __getitem__(self, key: str):
        return lambda x: self.t.apply(key, self.which, x, self.active, self.sizes, self.equal)


class JointTrainer:
    """Trains the members' adapters (and heads) jointly: ``run()`` does every member's local steps."""

    def __init__(self, layers: dict[str, LoRALayer], features: Callable[[torch.Tensor], torch.Tensor],
                 members: list[Member], optim: OptimSettings, *, trains: tuple[str, ...] = ("A", "B"),
                 shared_head: Callable | None = None, loss: Callable = F.cross_entropy,
                 joint: Callable = _nothing, credit: Callable | None = None) -> None:
        self.layers, self.features, self.optim, self.trains = layers, features, optim, trains
        self.shared_head, self.loss = shared_head, loss
        self.joint, self.credit = joint, credit
        self.order = sorted(range(len(members)), key=lambda i: -members[i].steps)  # stable: ties keep order
        self.members = [members[i] for i in self.order]
        ms = self.members
        dev = next(iter(ms[0].factors.values()))[0].device
        self.r_max = max(m.rank for m in ms)
        self.scale = torch.tensor([m.scaling for m in ms], device=dev)
        self.A: dict[str, torch.Tensor] = {}
        self.B: dict[str, torch.Tensor] = {}
        for key in layers:
            a0, b0 = ms[0].factors[key]
            A = a0.new_zeros((len(ms), self.r_max, *a0.shape[1:]))
            B = b0.new_zeros((len(ms), b0.shape[0], self.r_max, *b0.shape[2:]))
            for c, m in enumerate(ms):
                a, b = m.factors[key]
                A[c, :a.shape[0]] = a.detach()
                B[c, :, :b.shape[1]] = b.detach()
            self.A[key] = A.requires_grad_("A" in trains)
            self.B[key] = B.requires_grad_("B" in trains)
        self.own_heads = ms[0].head is not None
        if self.own_heads:
            self.W = torch.stack([m.head[0].detach() for m in ms]).requires_grad_(True)
            self.b = torch.stack([m.head[1].detach() for m in ms]).requires_grad_(True)
        self.params = [*(self.A.values() if "A" in trains else ()), *(self.B.values() if "B" in trains else ())]
        if self.own_heads:
            self.params += [self.W, self.b]
        self.state = [dict() for _ in self.params]
        self.step_no = 0

    # --- the adapters in the forward -----------------------------------------------------------------
    def apply(self, key: str, which: str, x: torch.Tensor, active: int, sizes: list[int], equal: bool):
        layer = self.layers[key]
        tg = layer.target
        conv = tg.kind == "conv"
        if which == "A":
            W = self.A[key][:active]
            if conv:
                _, kernel, stride, pad = tg.conv
                out = torch.cat([F.conv2d(xs, W[c], None, stride, pad)
                                 for c, xs in enumerate(x.split(sizes))])
            elif equal:
                out = torch.einsum("cnd,crd->cnr", x.reshape(active, -1, x.shape[-1]), W
                                   ).reshape(*x.shape[:-1], self.r_max)
            else:
                out = torch.cat([F.linear(xs, W[c]) for c, xs in enumerate(x.split(sizes))])
            trained = "A" in self.trains
        else:
            W = self.B[key][:active]
            s = self.scale[:active]
            if conv:
                out = torch.cat([F.conv2d(us, W[c]) * s[c] for c, us in enumerate(x.split(sizes))])
            elif equal:
                out = (torch.einsum("cnr,cor->cno", x.reshape(active, -1, x.shape[-1]), W)
                       * s[:, None, None]).reshape(*x.shape[:-1], W.shape[1])
            else:
                out = torch.cat([F.linear(us, W[c]) * s[c] for c, us in enumerate(x.split(sizes))])
            trained = "B" in self.trains
        if self.credit is not None:
            self._count(tg, which, x, out, sizes, trained)
        return out

    def _count(self, tg, which: str, x: torch.Tensor, out: torch.Tensor, sizes: list[int], trained: bool) -> None:
        """What the meter counts for the one-by-one call of this factor on each client's batch, at its rank:
        forward, + one for the weight gradient if trained, + one for the input gradient if the input needs
        it (only where the output is back-propagated)."""
        n_all = x.shape[0]
        per = out[0].numel() // self.r_max if which == "A" else x[0].numel() // self.r_max  # positions
        width = tg.d_in if which == "A" else tg.d_out
        # B's input is A's output here as one by one: it needs a gradient in both iff A is trained or A's
        # input did (the stacked factors require gradients exactly where the client's would)
        x_grad = x.requires_grad
        back = torch.is_grad_enabled() and (trained or x_grad)
        factor = 1 + (int(trained) + int(x_grad) if back else 0)
        for c, n in enumerate(sizes):
            self.credit(self.members[c].tag, factor * n * per * width * self.members[c].rank)
        assert sum(sizes) == n_all

    def _heads(self, feats: torch.Tensor, active: int, sizes: list[int]) -> torch.Tensor:
        if not self.own_heads:
            return self.shared_head(feats)
        W, b = self.W[:active], self.b[:active]
        if all(n == sizes[0] for n in sizes):
            f = feats.reshape(active, -1, feats.shape[-1])
            out = torch.baddbmm(b[:, None, :], f, W.transpose(1, 2)).reshape(*feats.shape[:-1], W.shape[1])
        else:
            out = torch.cat([F.linear(fs, W[c], b[c]) for c, fs in enumerate(feats.split(sizes))])
        if self.credit is not None:
            per = feats[0].numel() // feats.shape[-1]
            factor = 1 + (1 + int(feats.requires_grad) if torch.is_grad_enabled() else 0)
            for c, n in enumerate(sizes):
                self.credit(self.members[c].tag, factor * n * per * W.shape[2] * W.shape[1])
        return out

    # --- the loop ---------------------------------------------------------------------------------------
    def run(self) -> None:
        for batch in lockstep((m.batches for m in self.members), "joint training"):
            self.step(len(batch), batch)
        self.write_back()

    def step(self, active: int, batch: list) -> None:
        sizes = [len(y) for _, y in batch]
        x = torch.cat([b[0] for b in batch])
        view = _JointView(self, active, sizes)
        activate(self.layers, view)
        try:
            with self.joint([(self.members[c].tag, n) for c, n in enumerate(sizes)]):
                logits = self._heads(self.features(x), active, sizes)
        finally:
            activate(self.layers, None)
        loss = sum(self.loss(lg, y) for lg, (_, y) in zip(logits.split(sizes), batch, strict=True))
        grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads, strict=True)]
        self.update(active, grads)

    @torch.no_grad()
    def update(self, active: int, grads: list[torch.Tensor]) -> None:
        o = self.optim
        gs = [g[:active] for g in grads]
        if o.clip > 0:  # per client: clip_grad_norm_ over that client's parameters
            sq = sum(g.reshape(active, -1).double().square().sum(1) for g in gs)
            coef = (o.clip / (sq.sqrt() + 1e-6)).clamp(max=1.0).to(gs[0].dtype)
            gs = [g * coef.view(-1, *([1] * (g.dim() - 1))) for g in gs]
        self.step_no += 1
        for p, g, st in zip(self.params, gs, self.state, strict=True):
            p = p.detach()[:active]
            if o.kind == "adamw":
                if not st:
                    st["m"] = p.new_zeros((len(self.members), *p.shape[1:]))
                    st["v"] = torch.zeros_like(st["m"])
                m, v = st["m"][:active], st["v"][:active]
                b1, b2 = o.betas
                p.mul_(1 - o.lr * o.weight_decay)
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                bc1 = 1 - b1 ** self.step_no
                bc2 = 1 - b2 ** self.step_no
                denom = (v.sqrt() / math.sqrt(bc2)).add_(o.eps)
                p.addcdiv_(m, denom, value=-o.lr / bc1)
            else:
                d = g.add(p, alpha=o.weight_decay) if o.weight_decay else g
                if o.momentum:
                    if "buf" not in st:
                        st["buf"] = p.new_zeros((len(self.members), *p.shape[1:]))
                        st["buf"][:active] = d
                    else:
                        st["buf"][:active].mul_(o.momentum).add_(d)
                    d = st["buf"][:active]
                p.add_(d, alpha=-o.lr)

    @torch.no_grad()
    def write_back(self) -> None:
        """Each client's trained tensors back into its own storage (the padding dropped)."""
        for c, m in enumerate(self.members):
            for key, (a, b) in m.factors.items():
                a.copy_(self.A[key][c, :a.shape[0]])
                b.copy_(self.B[key][c, :, :b.shape[1]])
            if self.own_heads:
                m.head[0].copy_(self.W[c])
                m.head[1].copy_(self.b[c])
