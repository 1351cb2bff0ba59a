"""FLASC, Federated LoRA with Sparse Communication (Kuo et al., arXiv 2406.05233; spec §3.13).

    server:   keeps the dense global LoRA theta (every A and B, flattened in target order, A before B, then
              the head's weight and bias when the head is shared: the official code's server parameters
              are every trainable parameter, the classifier included)
    download: m_dl = top-k(|theta|) at density d_dl over the whole vector; send theta[m_dl] + indices
    client:   theta_c <- theta (x) m_dl (zeros elsewhere); train the dense LoRA (all of A and B) from it;
              delta = theta (x) m_dl - theta_c;  send top-k(|delta|) at density d_ul, values + indices
    server:   grad = sum_i delta_i / N  (spec: unweighted over the N participants);
              theta <- ServerOpt(theta, grad)   (Adam, lr 1e-3 by default; fedbench/lora/server_opt.py)
Sizes: k = ceil(d n) of the n = sum_matrices P(r) (+ head) entries, each a 4-byte value plus an index in
the smallest unsigned integer dtype holding n - 1 (uint8 up to n = 256, uint16 up to 65,536, uint32 up to
2^32, else int64); at density 1.0 the dense vector travels without indices (4 n bytes). A shared head is
part of theta: masked by the same top-k, stepped by the same server optimiser, its bytes inside the
density budget. A local head never travels; a frozen one is not trained.
Not exact (factor-space pseudo-gradient, like FedIT's averaging, plus sparsification); D_t is reported.
Densities 1.0 with ``--server-opt sgd --server-lr 1`` is FedAvg of the factors (tests).
Not implemented: the reference code's per-round density decay, freeze-to-mask option and DP noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedbench.hparams import hparam
from fedbench.lora.server_opt import server_lr_hparam, server_opt_hparam, server_optimizer, server_wd_hparam
from fedbench.methods.lora_family import FederatedLoRA, LoRAParams
from fedbench.registry import register_method


def index_dtype(n: int) -> torch.dtype:
    """The smallest unsigned integer dtype that holds every index 0 .. n-1 (int64 beyond uint32)."""
    for dt, bits in ((torch.uint8, 8), (torch.uint16, 16), (torch.uint32, 32)):
        if n <= 2 ** bits:
            return dt
    return torch.int64


def kept(density: float, n: int) -> int:
    """Entries a density keeps: ceil(d n), at least 1 (the rounding guards against 0.1 * 40 = 4.000...01)."""
    return min(n, max(1, math.ceil(round(density * n, 9))))


def top_k(vec: torch.Tensor, density: float) -> dict[str, torch.Tensor]:
    """The payload of top-k(|vec|) at ``density``: {"values", "index"} (index ascending, smallest dtype);
    density 1: {"values"} alone, the dense vector."""
    n = vec.numel()
    if density >= 1.0:
        return {"values": vec.detach().clone()}
    idx = torch.topk(vec.detach().abs(), kept(density, n), sorted=False).indices.sort().values
    return {"values": vec.detach()[idx].clone(), "index": idx.to(index_dtype(n))}


def densify(payload: dict[str, torch.Tensor], n: int) -> torch.Tensor:
    """The n-vector a top-k payload stands for (zeros where nothing was sent)."""
    values = payload["values"]
    if "index" not in payload:
        if values.numel() != n:
            raise ValueError(f"FLASC: a dense payload of {values.numel()} values for a vector of {n}")
        return values.clone()
    out = values.new_zeros(n)
    out[payload["index"].long()] = values
    return out


@register_method("flasc")
class FLASC(FederatedLoRA):
    rule_revision = 1  # 1: a shared head inside the density mask and the server optimiser
    code = "imkevinkuo/flasc"
    paper = "Kuo et al., Federated LoRA with Sparse Communication (FLASC), arXiv 2406.05233"
    routes_head = True

    @dataclass
    class Params(LoRAParams):
        flasc_down: float = hparam(1.0, "download density d_dl: the fraction of the global LoRA's entries sent "
                                        "(top-k by magnitude)", low=0.0, high=1.0, low_open=True)
        flasc_up: float = hparam(1.0, "upload density d_ul: the fraction of the client's update sent (top-k by "
                                      "magnitude)", low=0.0, high=1.0, low_open=True)
        server_opt: str = server_opt_hparam()
        server_lr: float = server_lr_hparam(1e-3)
        server_wd: float = server_wd_hparam()

    @classmethod
    def display_name(cls) -> str:
        return "FLASC"

    @classmethod
    def label(cls, p) -> str:
        wd = f" wd={p.server_wd}" if p.server_wd else ""
        return super().label(p)[:-1] + f", d_dl={p.flasc_down}, d_ul={p.flasc_up}, server {p.server_opt} " \
                                       f"lr={p.server_lr}{wd})"

    def setup(self, server, clients):
        super().setup(server, clients)
        self.opt = server_optimizer(self.hp)
        self.sent: dict[int, torch.Tensor] = {}  # client -> the masked theta it started from

    # --- the flattened LoRA (and shared head) ---------------------------------------------------------
    def pieces(self, party) -> list[tuple[str, str, torch.Tensor]]:
        """(part, key, tensor) in theta's order: per target A then B; then the head when it is shared."""
        f = self.factors_of(party, ("A", "B"))
        out = [(part, t.key, f[part][t.key]) for t in self.targets for part in ("A", "B")]
        if self.hp.head == "shared":
            out += [("head", k, v) for k, v in self.head_of(party).items()]
        return out

    def flat(self, party) -> torch.Tensor:
        return torch.cat([x.reshape(-1) for _, _, x in self.pieces(party)])

    def unflat(self, vec: torch.Tensor, like) -> dict[str, dict]:
        """{"A": ..., "B": ... (, "head": ...)} of a theta vector, shaped like ``like``'s parameters."""
        out, at = {}, 0
        for part, key, x in self.pieces(like):
            n = x.numel()
            out.setdefault(part, {})[key] = vec[at:at + n].reshape(x.shape).clone()
            at += n
        if at != vec.numel():
            raise ValueError(f"FLASC: a vector of {vec.numel()} entries for a LoRA of {at}")
        return out

    # --- what travels ----------------------------------------------------------------------------
    def download(self, server, client, state):
        payload = {"theta": top_k(self.flat(server), self.hp.flasc_down)}
        return self.with_head(payload, server)

    @torch.no_grad()
    def install(self, party, payload):
        payload = dict(payload)
        n = sum(x.numel() for _, _, x in self.pieces(party))
        theta = densify(payload.pop("theta"), n)
        super().install(party, {**self.unflat(theta, party), **payload})
        self.sent[party.id] = theta

    def upload(self, client):
        delta = self.sent.pop(client.id) - self.flat(client)
        payload = {"delta": top_k(delta, self.hp.flasc_up)}
        return self.with_head(payload, client)

    # --- server ----------------------------------------------------------------------------------
    @torch.no_grad()
    def aggregate(self, server, uploads):
        theta = self.flat(server)
        grad = sum(densify(u.payload["delta"], theta.numel()) for u in uploads) / len(uploads)
        params = {"theta": theta}
        self.opt.step(params, {"theta": grad})
        new = self.unflat(params["theta"], server)
        self.set_global(server, new["A"], new["B"])
        if "head" in new:
            with torch.no_grad():
                for k, p in server.module("head").named_parameters():
                    p.copy_(new["head"][k])
