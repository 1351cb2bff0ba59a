"""ILoRA (Zhou, Liu, Shang, arXiv 2511.16069; spec §3.16). No code was found; the server's split and
the control variates are reconstructions (flags below).

    init:     Q, R = qr(W0) per adapted matrix; every client's B_k = Q[:, :r_k] (one shared orthonormal
              basis), A_k = 0, so the model starts at W0 exactly (``--ilora-init qr``; ``peft``: PEFT's
              Kaiming A, zero B)
    client k: train A_k, B_k of rank r_k with the run's optimiser on g - c_k + c[:r_k] (``--ilora-cv on``:
              SCAFFOLD-style rank-aware control variates, c the server's of rank r_max sliced to r_k);
              send A_k, B_k (and the control-variate change Δc_k)                      P(r_k) (x2 with cv)
    server:   A_c = [p_1 s_1 A_1; ...; p_N s_N A_N], B_c = [B_1 ... B_N]: ΔW = B_c A_c = sum_k p_k s_k B_k A_k
              exactly; Q, R = qr(B_c) (the thin d_out x sum r_k factor, not the d_out x d_in ΔW), then the
              small SVD R A_c = U S V^T, so ΔW = (Q U) (S V^T) with Q U orthonormal and the rows of S V^T
              in decreasing energy; client k receives B_k = (Q U)[:, :r_k], A_k = (S V^T)[:r_k] / s_k, the
              best rank-r_k approximation of ΔW (Eckart-Young); the global model is its rank-r_max one
[reconstruction]: the paper's description stops before the server's split. A QR of B_c alone (fedbench's
earlier rule) keeps the leading stacked columns, i.e. the column space of whichever upload comes first,
so the result depended on the order of the uploads; the SVD of the small R A_c factor makes it
order-invariant (up to numerical rounding) for the cost of one (sum r_k) x d_in SVD. The sign of each
singular pair is fixed (the largest-magnitude entry of each column of Q U is positive) so that the
downloaded factors, not only their products, do not depend on the order either.
The truncation error of rank r is exactly ||(S V^T)[r:]||_F = sqrt(sum_{j>r} σ_j^2); reported per client
rank as ``trunc_err_r{r}`` / ``trunc_err_rel_r{r}``. One QR, one SVD and three products per matrix per
round, metered.

Control variates (SCAFFOLD option II, [reconstruction]): with K local steps at learning rate eta,
c_k+ = c_k - c + (x - y_k) / (K eta) (x the downloaded factors, y_k the trained ones), Δc_k = c_k+ - c_k;
server c <- c + (1 / N_clients) sum_k pad(Δc_k). The correction is added to the gradient before each
step of the run's optimiser (AdamW in the vision tier); both c (down) and Δc_k (up) are counted.

Why not the spec's literal init ``A_k = R[:r_k]`` with the local model at W0 - B_k A_k: on one backbone
shared by every client that needs a frozen per-client offset -s Q_r R_r, whose aggregate does not cancel
when ranks differ (the clients' offsets differ, the server's ΔW carries them), so the starting point of
a round would no longer be the aggregate. The orthonormal B with A = 0 keeps the shared orthonormal
basis and starts at W0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedbench.hparams import hparam
from fedbench.lora import algebra
from fedbench.metering.algebra import product_macs, qr_macs
from fedbench.methods.lora_family import FederatedLoRA, RankScalingParams
from fedbench.registry import register_method


def stacked_svd(ps, As, Bs, ss, r_min_cols: int = 0, count=None):
    """ILoRA's exact aggregate in factored, energy-ordered form: (U, SV) with U = Q U' orthonormal
    (d_out x m), SV = S V'^T (m x d_in), U SV = sum_k p_k s_k B_k A_k, where Q R = qr(B_c) and
    U' S V'^T = svd(R A_c); U[:, :r] SV[:r] is the best rank-r approximation. Zero columns pad B_c to at
    least ``r_min_cols`` so U has that many orthonormal columns. Independent of the order of the uploads:
    each singular pair's sign is fixed by the largest-magnitude entry of its column of U."""
    a_c, b_c = algebra.stack(ps, As, Bs, ss, 1.0)
    if b_c.shape[1] < r_min_cols:
        a_c = algebra.zero_pad(a_c, r_min_cols, 0)
        b_c = algebra.zero_pad(b_c, r_min_cols, 1)
    if count is not None:
        count(qr_macs(*b_c.shape))
    q, rr = torch.linalg.qr(b_c)
    if count is not None:
        count(product_macs(rr.shape[0], rr.shape[1], a_c.shape[1]))
    u, sv, vh = algebra.svd(rr @ a_c, count)
    u = q @ u
    if count is not None:
        count(product_macs(q.shape[0], q.shape[1], u.shape[1]) + product_macs(sv.shape[0], 1, vh.shape[1]))
    peak = u.gather(0, u.abs().argmax(dim=0, keepdim=True))
    sign = torch.where(peak < 0, -1.0, 1.0).to(u.dtype)
    return u * sign, (sign.T * sv[:, None]) * vh


def split(q: torch.Tensor, ra: torch.Tensor, r: int, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Client factors of rank r and scaling s: B = U[:, :r], A = (S V^T)[:r] / s."""
    return q[:, :r].clone(), ra[:r] / s


@register_method("ilora")
class ILoRA(FederatedLoRA):
    rule_revision = 1  # 1: order-invariant QR + SVD split; --rank-scaling constant
    code = "none found"
    paper = "Zhou, Liu, Shang, ILoRA, arXiv 2511.16069 (no code found; server split (QR + SVD of the stacked " \
            "update) and control variates reconstructed)"
    heterogeneous_ranks = True

    @dataclass
    class Params(RankScalingParams):
        ilora_init: str = hparam("qr", "initial factors: qr (B = Q[:, :r_k] of qr(W0), A = 0: orthonormal, starts at "
                                       "W0) or peft (Kaiming A, zero B)", choices=("qr", "peft"),
                                 marker="reconstruction")
        ilora_cv: str = hparam("on", "rank-aware SCAFFOLD control variates (their bytes counted)",
                               choices=("on", "off"), marker="reconstruction")

    @classmethod
    def display_name(cls) -> str:
        return "ILoRA"

    @classmethod
    def label(cls, p) -> str:
        return super().label(p)[:-1] + f", init={p.ilora_init}, cv={p.ilora_cv}, split=qr+svd [reconstruction])"

    def setup(self, server, clients):
        super().setup(server, clients)
        self.factors: dict[str, tuple] = {}   # key -> (Q U, S V^T) of the last aggregate
        self.cv = self.hp.ilora_cv == "on"
        self.c: dict[str, dict] = {}          # the server's control variate, rank r_max
        self.ck: dict[int, dict] = {}         # each client's, rank r_k
        self.local: dict[int, dict] = {}      # client -> {"x", "c", "steps", "lr"} during its round

    def server_init(self, server):
        out = super().server_init(server)
        if self.hp.ilora_init == "qr":
            A, B = {}, {}
            for t in self.targets:
                q, _ = torch.linalg.qr(self.layers[t.key].weight().detach().double())
                B[t.key] = q[:, :self.r_global].float()
                A[t.key] = torch.zeros(self.r_global, t.d_in)
            self.set_global(server, A, B)
        if self.cv:
            f = self.factors_of(server, ("A", "B"))
            self.c = {part: {k: torch.zeros_like(v) for k, v in f[part].items()} for part in ("A", "B")}
        return out

    def rate(self, cid: int) -> float:
        return self.client_scaling(self.ranks[cid])

    # --- what travels ----------------------------------------------------------------------------
    def download(self, server, client, state):
        r = self.ranks[client.id]
        if not self.factors:
            payload = super().download(server, client, state)
        else:
            A, B = {}, {}
            mods = client.module("lora").lora_B
            for key, (q, ra) in self.factors.items():
                b, A[key] = split(q, ra, r, self.rate(client.id))
                B[key] = b.reshape(mods[key].weight.shape)  # a convolution's B is d_out x r x 1 x 1
            payload = self.with_head({"A": A, "B": B}, server)
        if self.cv:
            payload["cv"] = {"A": {k: v[:r].clone() for k, v in self.c["A"].items()},
                             "B": {k: v[:, :r].clone() for k, v in self.c["B"].items()}}
        return payload

    @torch.no_grad()
    def install(self, party, payload):
        payload = dict(payload)
        c = payload.pop("cv", None)
        super().install(party, payload)
        if self.cv:
            if c is None:
                raise ValueError(f"ILoRA: client {party.id}'s download has no control variate")
            x = self.factors_of(party, ("A", "B"))
            if party.id not in self.ck:
                self.ck[party.id] = {p: {k: torch.zeros_like(v) for k, v in x[p].items()} for p in ("A", "B")}
            self.local[party.id] = {"x": x, "c": c, "steps": 0, "lr": 0.0}

    @torch.no_grad()
    def correct_gradients(self, client, opt):
        """g <- g - c_k + c[:r_k] on every factor (SCAFFOLD), before each step."""
        if not self.cv:
            return
        st, ck = self.local[client.id], self.ck[client.id]
        st["steps"] += 1
        st["lr"] = opt.param_groups[0]["lr"]
        ad = client.module("lora")
        for part, mods in (("A", ad.lora_A), ("B", ad.lora_B)):
            for k, m in mods.items():
                if m.weight.grad is not None:
                    m.weight.grad.add_(st["c"][part][k] - ck[part][k])

    def upload(self, client):
        payload = super().upload(client)
        if self.cv:
            st, ck = self.local.pop(client.id), self.ck[client.id]
            denom = st["steps"] * st["lr"]
            dc = {}
            for part in ("A", "B"):
                dc[part] = {}
                for k, y in payload[part].items():
                    new = ck[part][k] - st["c"][part][k] + ((st["x"][part][k] - y) / denom if denom > 0 else 0.0)
                    dc[part][k] = new - ck[part][k]
                    ck[part][k] = new
            payload["cv"] = dc
        return payload

    # --- server ----------------------------------------------------------------------------------
    @torch.no_grad()
    def aggregate(self, server, uploads):
        ps = [u.weight for u in uploads]
        ranks = sorted(set(self.ranks))
        tails = dict.fromkeys(ranks, 0.0)
        total = 0.0
        s_g = server.module("lora").scaling
        A_g, B_g = {}, {}
        for t in self.targets:
            As = [u.payload["A"][t.key].reshape(u.payload["A"][t.key].shape[0], -1) for u in uploads]
            Bs = [u.payload["B"][t.key].reshape(u.payload["B"][t.key].shape[0], -1) for u in uploads]
            ss = [self.rate(u.client) for u in uploads]
            q, ra = stacked_svd(ps, As, Bs, ss, self.r_global, server.count_macs)
            shape_a = self.server.module("lora").lora_A[t.key].weight.shape
            self.factors[t.key] = (q, ra.reshape(ra.shape[0], *shape_a[1:]))
            B_g[t.key], A_g[t.key] = split(q, self.factors[t.key][1], self.r_global, s_g)
            e = ra.double().square().sum(dim=1)
            total += float(e.sum())
            for r in ranks:
                tails[r] += float(e[r:].sum())
        self.set_global(server, A_g, B_g)
        for r in ranks:
            server.report(f"trunc_err_r{r}", tails[r] ** 0.5)
            server.report(f"trunc_err_rel_r{r}", (tails[r] / total) ** 0.5 if total > 0 else 0.0)
        if self.cv:
            n = len(self.clients)
            for part, dim in (("A", 0), ("B", 1)):
                for k, c in self.c[part].items():
                    c.add_(sum(algebra.zero_pad(u.payload["cv"][part][k], c.shape[dim], dim) for u in uploads) / n)
