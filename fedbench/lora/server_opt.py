"""A server optimiser over a dict of tensors that takes a pseudo-gradient (FLASC, FSLoRA; spec §3.13,
§3.14): the server treats the mean client difference ``grad = mean_i (theta_sent - theta_i)`` as a
gradient and steps ``theta`` with SGD, Adam or AdamW. Its state (moments, step count) lives here, one
entry per tensor name, so it survives the rounds; the update is torch.optim.Adam's/AdamW's formula
(no amsgrad, no maximise), elementwise and therefore deterministic.

    Adam:  g <- g + wd theta;   m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
           theta <- theta - (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    AdamW: theta <- theta (1 - lr wd) first, then the Adam step without the wd term in g
    SGD:   theta <- theta - lr g          (lr 1 and grad = theta - mean theta_i gives FedAvg)
"""

from __future__ import annotations

import math

import torch

from fedbench.errors import ConfigError
from fedbench.hparams import hparam

KINDS = ("adam", "adamw", "sgd")


def server_opt_hparam() -> str:
    """The ``--server-opt`` field of a method that steps a server optimiser."""
    return hparam("adam", "server optimiser on the mean client update (the pseudo-gradient)", choices=KINDS)


def server_lr_hparam(default: float) -> float:
    """The ``--server-lr`` field, with the method's published default."""
    return hparam(default, "server learning rate", low=0.0, low_open=True)


def server_wd_hparam() -> float:
    """The ``--server-wd`` field: the server optimiser's weight decay (0: none; torch.optim.AdamW's own
    default, 0.01, is what FLASC's and FSLoRA's official code step with)."""
    return hparam(0.0, "server optimiser weight decay (adamw: decoupled; adam, sgd: added to the gradient)",
                  low=0.0, late=True)


def server_optimizer(p) -> ServerOptimizer:
    """The server optimiser of a method's options (``server_opt``, ``server_lr``, ``server_wd``)."""
    return ServerOptimizer(p.server_opt, p.server_lr, weight_decay=p.server_wd)


class ServerOptimizer:
    def __init__(self, kind: str = "adam", lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        if kind not in KINDS:
            raise ConfigError(f"server optimiser {kind!r}: choose from {', '.join(KINDS)}")
        self.kind, self.lr, self.betas, self.eps, self.wd = kind, float(lr), betas, float(eps), float(weight_decay)
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}
        self.t: dict[str, int] = {}

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
        """Update every tensor of ``params`` in place with its pseudo-gradient ``grads[name]``."""
        for name, p in params.items():
            g = grads[name].to(p.dtype)
            if self.kind == "sgd":
                if self.wd:
                    g = g + self.wd * p
                p.sub_(self.lr * g)
                continue
            b1, b2 = self.betas
            if self.kind == "adamw":
                p.mul_(1.0 - self.lr * self.wd)
            elif self.wd:
                g = g + self.wd * p
            if name not in self.m:
                self.m[name], self.v[name], self.t[name] = torch.zeros_like(p), torch.zeros_like(p), 0
            m, v = self.m[name], self.v[name]
            self.t[name] += 1
            t = self.t[name]
            m.lerp_(g, 1.0 - b1)
            v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
            denom = (v.sqrt() / math.sqrt(1.0 - b2 ** t)).add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / (1.0 - b1 ** t))
