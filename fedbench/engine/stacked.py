"""Same-architecture CNN clients (models/cnn.py) trained in one pass: the MHPFL family's batched local
training and evaluation (``--client-batching``).

Each client's tensors are stacked along a new leading dimension (client c at index c); a training step
runs every active client's batch through its own parameters at once and updates every client with its
own optimiser state and clip, so each client takes exactly the steps it takes alone:

* the convolutions run per client segment (one conv per client: ``vmap`` over stacked conv weights
  lowers to a grouped convolution, which measured slower here; benchmarks/batched_clients.py);
* the fully connected layers run as one batched matmul (``_StackedLinear``) when the active clients'
  batches are equally large, else per client segment; the weight gradient is one matmul per client
  (a batched matmul with the batch as the contracted dimension measured ~4x slower on the CPU);
* the loss is the sum of each client's own mean cross-entropy, so the gradient of a client's
  parameters is its gradient alone;
* the gradient-norm clip is per client (``clip_grad_norm_`` over that client's parameters: the norm of
  the per-tensor norms, coefficient ``clip / (norm + 1e-6)`` clamped at 1);
* the step is torch's own functional SGD or AdamW (``torch.optim.sgd.sgd`` / ``torch.optim.adamw.adamw``,
  with the flags of the optimiser ``client.optimizer`` builds: fused, foreach) on the stacked tensors of
  the active clients: elementwise, so each client's update is the one its own optimiser makes;
* clients are ordered by their number of steps (most first): those still training are a prefix of the
  stack, and a client whose batches are exhausted drops out;
* FLOPs: each client is credited, per layer, what the meter counts for the same call on its own batch
  (``FlopMeter.call_macs``), so its row equals the one-by-one row.

Equal to client-by-client training within float tolerance (summation order of the batched matmuls),
not bit for bit; tests/test_stacked_clients.py compares every tensor and row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.optim.adamw import adamw
from torch.optim.sgd import sgd

from fedbench.engine.lockstep import lockstep

CONVS = ("conv1", "conv2")
LINEARS = ("fc1", "fc2", "fc3")
LAYERS = CONVS + LINEARS


class _StackedLinear(torch.autograd.Function):
    """y_c = x_c W_c^T + b_c for every client c: x (C, B, in), W (C, out, in), b (C, out)."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        x, wd = x.to(gy.dtype), w.to(gy.dtype)
        gx = torch.bmm(gy, wd) if ctx.needs_input_grad[0] else None
        gw = torch.empty(w.shape, dtype=gy.dtype, device=gy.device)
        for c in range(len(w)):  # one matmul per client: the batched form contracts a short dimension slowly
            torch.mm(gy[c].t(), x[c], out=gw[c])
        return gx, gw, gy.sum(1)


def cnn_forward(p: dict[str, list[torch.Tensor] | torch.Tensor], xs: list[torch.Tensor], equal: bool,
                seen: Callable[[str, list[torch.Tensor]], None] | None = None) -> list[torch.Tensor]:
    """The logits of models/cnn.py's CNN for each client's batch ``xs[c]`` with its parameters: conv
    parameters per client (``p["conv1.weight"][c]``), linear parameters stacked (C, ...) when ``equal``
    (equally large batches) else per client. ``seen(layer, inputs)`` gets each layer's per-client inputs
    (for metering)."""
    hs = xs
    for name in CONVS:
        if seen is not None:
            seen(name, hs)
        w, b = p[f"{name}.weight"], p[f"{name}.bias"]
        hs = [F.max_pool2d(F.relu(F.conv2d(h, w[c], b[c])), 2) for c, h in enumerate(hs)]
    hs = [h.flatten(1) for h in hs]
    if equal:
        h = torch.stack(hs)
        for name in LINEARS:
            if seen is not None:
                seen(name, list(h))
            h = _StackedLinear.apply(h, p[f"{name}.weight"], p[f"{name}.bias"])
            if name != LINEARS[-1]:
                h = F.relu(h)
        return list(h)
    for name in LINEARS:
        if seen is not None:
            seen(name, hs)
        w, b = p[f"{name}.weight"], p[f"{name}.bias"]
        hs = [F.linear(h, w[c], b[c]) for c, h in enumerate(hs)]
        if name != LINEARS[-1]:
            hs = [F.relu(h) for h in hs]
    return hs


@dataclass
class Member:
    """One client of a joint pass: its own parameter tensors (written back in place), its batches."""

    tensors: dict[str, torch.Tensor]  # parameter name -> the client's own storage
    batches: Iterable
    steps: int                        # expected number of batches (orders the stack)
    tag: object = None                # handed to ``credit`` (the engine's client)


class StackedTrainer:
    """Trains the members (same CNN architecture) jointly: ``run()`` does every member's local steps.

    ``opt`` is an optimiser of the run's settings (``client.optimizer`` on a probe tensor): only its
    class and hyper-parameters are read. ``layer_macs(layer, x, input_grad)`` gives what the meter counts
    for the one-by-one training call of ``layer`` (a name of ``LAYERS``) on ``x``; ``credit(tag, macs)``
    books it for a member."""

    def __init__(self, members: list[Member], opt: torch.optim.Optimizer, clip: float, *,
                 layer_macs: Callable | None = None, credit: Callable | None = None) -> None:
        if type(opt) not in (torch.optim.SGD, torch.optim.AdamW) or len(opt.param_groups) != 1:
            raise ValueError(f"stacked training implements SGD and AdamW, not {type(opt).__name__}")
        self.group = dict(opt.param_groups[0])
        if self.group.get("amsgrad"):
            raise ValueError("stacked training does not implement AdamW's amsgrad")
        self.kind = "adamw" if type(opt) is torch.optim.AdamW else "sgd"
        self.clip = clip
        self.layer_macs, self.credit = layer_macs, credit
        self.order = sorted(range(len(members)), key=lambda i: -members[i].steps)  # stable
        self.members = [members[i] for i in self.order]
        self.names = list(self.members[0].tensors)
        self.P = {n: torch.stack([m.tensors[n].detach() for m in self.members]) for n in self.names}
        self.state: dict[str, list] = {}
        self.cpu = next(iter(self.P.values())).device.type == "cpu"

    def run(self) -> None:
        for batch in lockstep((m.batches for m in self.members), "stacked training"):
            self.step(batch)
        self.write_back()

    def step(self, batch: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        a = len(batch)
        sizes = [len(y) for _, y in batch]
        equal = all(n == sizes[0] for n in sizes)
        leaves: dict[str, list[torch.Tensor] | torch.Tensor] = {}
        for n, t in self.P.items():
            if equal and n.split(".")[0] in LINEARS:
                leaves[n] = t.detach()[:a].requires_grad_()
            else:
                leaves[n] = [t.detach()[c].requires_grad_() for c in range(a)]
        logits = cnn_forward(leaves, [x for x, _ in batch], equal, self._count if self.credit else None)
        loss = sum(F.cross_entropy(lg, y) for lg, (_, y) in zip(logits, batch, strict=True))
        flat = [t for n in self.names for t in (leaves[n] if isinstance(leaves[n], list) else [leaves[n]])]
        grads = list(torch.autograd.grad(loss, flat))
        stacked = []
        for n in self.names:
            if isinstance(leaves[n], list):
                k = len(leaves[n])
                stacked.append(torch.stack(grads[:k]))
                del grads[:k]
            else:
                stacked.append(grads.pop(0))
        self.update(a, stacked)

    def _count(self, layer: str, inputs: list[torch.Tensor]) -> None:
        """Credit each member the meter's count of this layer's training call on its own batch (every
        parameter is trained; the input needs a gradient above the first layer)."""
        for c, x in enumerate(inputs):
            self.credit(self.members[c].tag, self.layer_macs(layer, x, layer != LAYERS[0]))

    @torch.no_grad()
    def update(self, a: int, grads: list[torch.Tensor]) -> None:
        if self.clip > 0:
            norms = torch.stack([torch.linalg.vector_norm(g.reshape(a, -1), dim=1) for g in grads])
            coef = (self.clip / (torch.linalg.vector_norm(norms, dim=0) + 1e-6)).clamp(max=1.0)
            # as LocalOptimizer.clip_gradients: on the CPU the multiply by exactly 1 is skipped
            if not self.cpu or bool((coef < 1.0).any()):
                grads = [g * coef.to(g.dtype).view(-1, *([1] * (g.dim() - 1))) for g in grads]
        params = [self.P[n][:a] for n in self.names]
        g = self.group
        if self.kind == "sgd":
            bufs = self.state.setdefault("momentum", [None] * len(params))
            views = [None if b is None else b[:a] for b in bufs]
            sgd(params, grads, views, foreach=g["foreach"], fused=g["fused"],
                                weight_decay=g["weight_decay"], momentum=g["momentum"], lr=g["lr"],
                                dampening=g["dampening"], nesterov=g["nesterov"], maximize=g["maximize"])
            for i, (b, v) in enumerate(zip(bufs, views, strict=True)):
                if b is None:
                    bufs[i] = v  # created by the first step (all members that train are active then)
            return
        st = self.state
        if not st:
            st["exp_avg"] = [torch.zeros_like(p) for p in params]
            st["exp_avg_sq"] = [torch.zeros_like(p) for p in params]
            # where torch's AdamW keeps its step counts: on the device only when fused (or capturable)
            on = params[0].device if g["fused"] or g["capturable"] else "cpu"
            st["step"] = [torch.zeros((), dtype=torch.float32, device=on) for _ in params]
        adamw(params, grads, [t[:a] for t in st["exp_avg"]], [t[:a] for t in st["exp_avg_sq"]],
                                [], st["step"], foreach=g["foreach"], fused=g["fused"], amsgrad=g["amsgrad"],
                                beta1=g["betas"][0], beta2=g["betas"][1], lr=g["lr"],
                                weight_decay=g["weight_decay"], eps=g["eps"], maximize=g["maximize"])

    @torch.no_grad()
    def write_back(self) -> None:
        """Each member's trained tensors back into its own storage."""
        for c, m in enumerate(self.members):
            for n, t in m.tensors.items():
                t.copy_(self.P[n][c])

