"""The local optimiser of a run: SGD or AdamW, a learning rate constant or cosine over rounds, the
protocol's gradient clip. Methods get optimisers from here (``client.optimizer``), never build their own.
"""

from __future__ import annotations

import math

import torch


class LocalOptimizer:
    def __init__(self, cfg, device: torch.device) -> None:
        self.cfg, self.device = cfg, device

    def lr_factor(self, t: int) -> float:
        """Multiplier of the base learning rate in round t (1-based): 1, or cosine from 1 at round 1 to
        lr_min / lr at the last round (OpenFedLLM's and FlowerTune's schedule over rounds)."""
        cfg = self.cfg
        if cfg.lr_schedule == "constant" or cfg.rounds <= 1:
            return 1.0
        floor = cfg.lr_min / cfg.lr
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * (t - 1) / (cfg.rounds - 1)))

    def make(self, params, lr: float | None = None, t: int | None = None) -> torch.optim.Optimizer:
        cfg = self.cfg
        lr = cfg.lr if lr is None else lr
        if t is not None and cfg.lr_schedule != "constant":
            lr = lr * self.lr_factor(t)
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(list(params), lr=lr, weight_decay=cfg.weight_decay)
        return torch.optim.SGD(list(params), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               fused=cfg.fused_sgd or None)

    def step(self, opt: torch.optim.Optimizer | tuple[torch.optim.Optimizer, ...], loss: torch.Tensor) -> None:
        """zero_grad, one backward of ``loss``, clip, step. Several optimisers: each is cleared, clipped on its
        own parameters and stepped, after the one backward (HtFLlib's FML steps its two models so)."""
        opts = opt if isinstance(opt, tuple) else (opt,)
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            if self.cfg.clip > 0:
                self.clip_gradients([p for g in o.param_groups for p in g["params"] if p.grad is not None])
            o.step()

    def clip_gradients(self, params: list[torch.Tensor]) -> None:
        """``clip_grad_norm_(params, clip)``, bit for bit. On the CPU the multiply is skipped when the
        clamped coefficient is exactly 1 (the usual case: a multiply by 1.0 changes no bit, and reading
        the coefficient costs no device sync there); elsewhere it always runs, sync-free."""
        max_norm = self.cfg.clip
        if self.device.type != "cpu":
            torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
            return
        grads = [p.grad for p in params]
        if not grads:
            return
        # one dtype (so one group): what torch's get_total_norm computes, without its grouping bookkeeping
        if all(g.dtype == grads[0].dtype for g in grads):
            total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
        else:
            total = torch.nn.utils.get_total_norm(grads, 2.0, False, True)
        if not float(max_norm / (total + 1e-6)) >= 1.0:  # torch's coefficient is below its clamp, or NaN
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
