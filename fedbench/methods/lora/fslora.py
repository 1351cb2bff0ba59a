"""FSLoRA, Federated Sketching LoRA (Fang, Han, Yuan, Hosseinalipour, Brinton, arXiv 2501.19389;
spec §3.14, §6.4).

    server:   keeps a global LoRA of rank r (--rank)
    client i: sketch size k_i <= r (--ranks, one per client, or k = round(r * --fslora-ratio) for all);
              samples k_i of the r rank indices (seeded by run seed, client, round): the sketch
              S_i = (r / k_i) diag(1 on the subset), E[S_i] = I;
              receives the sub-block B[:, idx], A[idx, :] and the indices; trains only that block under the
              sketched forward W0 + s B S_i A = W0 + s (r / k_i) B[:, idx] A[idx, :];
              sends the masked difference delta_i = (theta_sent - theta_i) on the block, and the indices
    server:   grad = sum_i scatter(delta_i) / N  (zero outside each client's block);
              theta <- Adam(theta, grad), lr 3e-4 (--server-opt, --server-lr; fedbench/lora/server_opt.py)
A shared head is a server parameter like the LoRA (the official code steps every trainable parameter, its
mask all ones outside lora_A / lora_B): it travels dense, the client sends theta_sent - theta_i for it,
and the server optimiser steps it with the same sum / N pseudo-gradient.
Scaling: a client's block is part of the one rank-r LoRA, so its base scaling is the global s under every
rule; r / k_i is the sketch's own unbiasedness factor. ``--rank-scaling`` therefore admits only
``constant`` here.
Sent each way: P(k_i) = k_i (d_in + d_out) 4-byte values per matrix plus the k_i indices once (uint8 for
r <= 256, else the smallest unsigned dtype holding r - 1), and the head when shared.
The client holds its block as a rank-k_i LoRA whose scaling is s (r / k_i) (s = alpha / r, or alpha /
sqrt(r) with rsLoRA): the sketch scale enters the forward, so autograd's gradient of the block is that
of the sketched model. (The released code scales B's columns and the gradient by (r / k_i)^2 instead;
not reproduced.)

``--reference-quirks`` (§6.4): the released code's sketch condition is never true, so masks and scales
are inactive: every client trains and sends the full rank-r LoRA (FedAvg-style differences with server
Adam); --ranks / --fslora-ratio are then ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedbench.errors import ConfigError
from fedbench.hparams import hparam
from fedbench.lora.layers import adapter_spec, scaling
from fedbench.lora.server_opt import server_lr_hparam, server_opt_hparam, server_optimizer, server_wd_hparam
from fedbench.methods.lora.flasc import index_dtype
from fedbench.methods.lora_family import FederatedLoRA, RankScalingParams, parse_ranks
from fedbench.registry import register_method
from fedbench.seeding import derive


def sketch_sizes(p, clients: int) -> list[int]:
    """k_i of every client: --ranks (each <= --rank), else round(--rank * --fslora-ratio)."""
    if p.reference_quirks:
        return [p.rank] * clients
    if p.ranks.strip():
        ks = parse_ranks(p, clients)
        if max(ks) > p.rank:
            raise ConfigError(f"--ranks {p.ranks!r}: FSLoRA's sketch sizes must be <= the global rank --rank "
                              f"{p.rank}, got {max(ks)}")
        return ks
    return [max(1, round(p.rank * p.fslora_ratio))] * clients


def sketch_indices(seed: int, client: int, t: int, r: int, k: int) -> torch.Tensor:
    """The k of r rank indices client ``client`` trains in round t (ascending), uniform without
    replacement."""
    g = torch.Generator().manual_seed(derive(seed, "fslora-sketch", client, t))
    return torch.randperm(r, generator=g)[:k].sort().values


@register_method("fslora")
class FSLoRA(FederatedLoRA):
    rule_revision = 1  # 1: a shared head stepped by the server optimiser
    code = "wenzhifang/Federated-Sketching-LoRA-Implementation"
    paper = "Fang, Han, Yuan, Hosseinalipour, Brinton, Federated Sketching LoRA (FSLoRA), arXiv 2501.19389"
    heterogeneous_ranks = True
    routes_head = True

    @dataclass
    class Params(RankScalingParams):
        fslora_ratio: float = hparam(0.5, "sketching ratio k / r for every client when --ranks is not given",
                                     low=0.0, high=1.0, low_open=True, marker="reconstruction")
        server_opt: str = server_opt_hparam()
        server_lr: float = server_lr_hparam(3e-4)
        server_wd: float = server_wd_hparam()

    @classmethod
    def display_name(cls) -> str:
        return "FSLoRA"

    @classmethod
    def label(cls, p) -> str:
        ks = f"sketch ks={p.ranks}" if p.ranks else f"sketch ratio={p.fslora_ratio}"
        wd = f" wd={p.server_wd}" if p.server_wd else ""
        return super().label(p)[:-1] + f", {ks}, server {p.server_opt} lr={p.server_lr}{wd})"

    @classmethod
    def check_config(cls, p, cfg) -> None:
        super().check_config(p, cfg)
        if p.rank_scaling != "constant":
            raise ConfigError(f"--rank-scaling {p.rank_scaling} with method fslora: a sketch is a block of the one "
                              f"rank-r LoRA at its scaling (r / k_i is the sketch's own factor); use constant")
        sketch_sizes(p, cfg.clients)

    @classmethod
    def check_backbone(cls, p, cfg, backbone):
        targets = super().check_backbone(p, cfg, backbone)
        bound = min(targets, key=lambda t: t.max_rank)
        if p.rank > bound.max_rank:
            raise ConfigError(f"--rank {p.rank} exceeds what layer {bound.name} allows: min(d_in, d_out) = "
                              f"{bound.max_rank}")
        return targets

    def setup(self, server, clients):
        super().setup(server, clients)
        self.ranks = sketch_sizes(self.hp, len(clients))   # k_i: each client's adapter is its block
        self.r_global = self.hp.rank
        self.opt = server_optimizer(self.hp)
        self.sent: dict[int, dict] = {}                    # client -> (indices, block it started from)

    def client_spec(self, k: int):
        """A rank-k adapter of scaling s r / k (exactly the run's spec when k = r)."""
        r, hp = self.r_global, self.hp
        if k == r:
            return self.spec(r)
        alpha = hp.lora_alpha if not hp.rslora else scaling(hp.lora_alpha, r, True) * r
        return adapter_spec(self.targets, k, alpha, False)

    def client_init(self, client):
        client.own("lora", self.client_spec(self.ranks[client.id]))
        if self.hp.head != "frozen":
            client.own("head", self.head_spec())

    def indices(self, client) -> torch.Tensor:
        k, r = self.ranks[client.id], self.r_global
        if k == r:
            return torch.arange(r)
        return sketch_indices(self.run.seed, client.id, client.round, r, k)

    # --- what travels ----------------------------------------------------------------------------
    def download(self, server, client, state):
        idx = self.indices(client)
        f = self.factors_of(server, ("A", "B"))
        payload = {"A": {k: a[idx].clone() for k, a in f["A"].items()},
                   "B": {k: b[:, idx].clone() for k, b in f["B"].items()},
                   "index": idx.to(index_dtype(self.r_global))}
        if self.hp.head == "shared":
            payload["head"] = self.head_of(server)
        return payload

    @torch.no_grad()
    def install(self, party, payload):
        payload = dict(payload)
        idx = payload.pop("index").long()
        if idx.numel() != self.ranks[party.id]:
            raise ValueError(f"FSLoRA: client {party.id} of sketch size {self.ranks[party.id]} got "
                             f"{idx.numel()} indices")
        super().install(party, payload)
        self.sent[party.id] = {"index": idx, **{p: payload[p] for p in ("A", "B", "head") if p in payload}}

    def upload(self, client):
        start = self.sent.pop(client.id)
        end = self.factors_of(client, ("A", "B"))
        payload = {part: {k: start[part][k] - end[part][k] for k in end[part]} for part in ("A", "B")}
        if "head" in start:
            end_head = self.head_of(client)
            payload["head"] = {k: start["head"][k] - end_head[k] for k in end_head}
        payload["index"] = start["index"].to(index_dtype(self.r_global))
        return payload

    # --- server ----------------------------------------------------------------------------------
    @torch.no_grad()
    def aggregate(self, server, uploads):
        f = self.factors_of(server, ("A", "B"))
        grads = {(part, k): torch.zeros_like(x) for part in ("A", "B") for k, x in f[part].items()}
        for u in uploads:
            idx = u.payload["index"].long()
            for k in f["A"]:
                grads["A", k][idx] += u.payload["A"][k]
                grads["B", k][:, idx] += u.payload["B"][k]
        if self.hp.head == "shared":
            head = dict(server.module("head").named_parameters())
            for k, p in head.items():
                f.setdefault("head", {})[k] = p.detach().clone()
                grads["head", k] = sum(u.payload["head"][k] for u in uploads)
        params = {f"{part}:{k}": f[part][k] for part, k in grads}
        self.opt.step(params, {f"{part}:{k}": g / len(uploads) for (part, k), g in grads.items()})
        self.set_global(server, f["A"], f["B"])
        if self.hp.head == "shared":
            for k, p in head.items():
                p.data.copy_(f["head"][k])
