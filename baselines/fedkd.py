"""FedKD (Wu et al., Nature Communications 2022), as specified in spec C.8.

Each client k holds a private heterogeneous **mentor** f_k, a private projection W_h (Linear 500->500,
no bias) and its copy of the shared homogeneous **mentee** m (CNN-5 by default). Per round t
(0-based) with energy threshold T(t) = T_start + ((t + 1) / T_rounds) (T_end - T_start):

    client (selected):
        m0 = m                                            # the global mentee it holds
        for E epochs, on every batch (x, y), mentor, mentee and W_h step together on L_t + L_s:
            L_task = CE_t + CE_s                          # CE of mentor and mentee
            L_t = CE_t + KL(m || f)/L_task + MSE(h_f, W_h h_m)/L_task
            L_s = CE_s + KL(f || m)/L_task + MSE(h_f, W_h h_m)/L_task
            KL(p || q) = sum_{i,c} p_ic (log p_ic - log q_ic) / (B K)   # element-wise mean
            clip the gradient norm of the mentor, of the mentee and of W_h separately at fedkd_clip
        upload SVD_T(t)(m - m0)                           # truncated SVD factors of the update
        m = m0                                            # keep the global mentee (see below)
    server:
        d = (1/|S|) sum_k reconstruct(upload_k)           # unweighted
        broadcast SVD_T(t)(d) to every client             # push = "all"
    every client: m = m + reconstruct(broadcast)
    evaluation: the mentor f_k alone (the default predict of Method: the client's "model").

As in both reference codes (wuch15/FedKD, TsingZ0/HtFLlib) nothing is detached: the gradient is that
of L_t + L_s with respect to all three modules, and the /L_task normalisers carry gradient too.

**KL reduction.** Both reference codes use ``nn.KLDivLoss()`` with torch's default reduction "mean":
the sum over the batch and the classes divided by B x K (an element-wise mean, 1/K of the per-sample
"batchmean" KL); TsingZ0/PFLlib's FedKD does the same. fedbench does likewise and offers no batchmean
option, since no published FedKD implementation uses it (FML's batchmean is ZJU-DAI's FML code, a
different method).

**Gradient clip.** TsingZ0/HtFLlib (and TsingZ0/PFLlib) clip after the backward pass with
``clip_grad_norm_(..., 10)`` applied separately to the mentor's, the mentee's and W_h's parameters,
the 10 fixed in the code; wuch15/FedKD does not clip. Because a reference fixes the value, FedKD does
not use the run's ``--clip`` (one norm over all parameters): ``--fedkd-clip`` (default 10, HtFLlib's
value; 0 = no clip, as wuch15/FedKD) is the per-module limit, recorded in the label.

**Truncated SVD.** A matrix M (m x n) with singular values s_1 >= s_2 >= ... keeps the smallest rank r
with sum_{i<=r} s_i^2 >= T * sum_i s_i^2 and is sent as two factors, A = U_r diag(s_r) (m x r) and
B = V_r^T (r x n): r (m + n) numbers. Conv weights (out, in, kh, kw) are one out x in matrix per
kernel position (kh*kw matrices, each with its own rank) [reconstruction; `--fedkd-conv-svd flatten`
uses one out x (in*kh*kw) matrix instead]. Per tensor, the factors are sent only if they are smaller
than the dense tensor, else the dense tensor [reconstruction, `--fedkd-dense-fallback`]; biases are
always dense. What is sent is what the engine counts.

**One global mentee.** The original simulation sets every client's student to "previous + aggregated
update", where "previous" is the student *before* this round's local training. Here the mentee a
client holds between rounds is the global mentee: a selected client trains its copy, uploads the
update and puts m0 back; the broadcast update is then applied by every client (selected or not) to
that same m0, so all clients and the server hold one identical mentee state at all times. (Adding the
update to the locally trained copy would double-count the client's own step and let the copies of
selected and unselected clients drift apart.) The server starts the state with a one-time dense
broadcast of the initial mentee in round 1, counted like any download.

``--fedkd-compress params`` is TsingZ0/HtFLlib's variant: the mentee *parameters* are compressed,
averaged and re-compressed, and every client replaces its mentee by the reconstruction. It deviates
from the original and is recorded in the label.

Client by client under ``--client-batching``: it trains a mentor and a mentee together with
per-module clips, so it is not ``StandardTraining`` (not ``batchable``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from baselines.fml import SHARED_MODELS, kl_elementwise_mean
from fedbench.errors import ConfigError
from fedbench.hparams import hparam
from fedbench.metering.algebra import svd_macs
from fedbench.methods.base import Method, mean, snapshot
from fedbench.models.cnn import REP_DIM, cnn_spec, linear_spec

Count = Callable[[int], None] | None


# --- losses ----------------------------------------------------------------------------------------

def fedkd_losses(logits_t: torch.Tensor, h_t: torch.Tensor, logits_s: torch.Tensor, proj_h_s: torch.Tensor,
                 y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_t, L_s): mentor (teacher, t) and mentee (student, s) losses of spec C.8.

    ``proj_h_s`` is W_h applied to the mentee's representation; nothing is detached.
    """
    ce_t = F.cross_entropy(logits_t, y)
    ce_s = F.cross_entropy(logits_s, y)
    task = ce_t + ce_s
    hidden = F.mse_loss(h_t, proj_h_s) / task
    l_t = ce_t + kl_elementwise_mean(logits_s, logits_t) / task + hidden
    l_s = ce_s + kl_elementwise_mean(logits_t, logits_s) / task + hidden
    return l_t, l_s


def clip_per_module(groups: list[list[torch.Tensor]], max_norm: float) -> None:
    """``clip_grad_norm_(group, max_norm)`` for each group on its own (HtFLlib: mentor, mentee, W_h);
    ``max_norm`` 0 leaves the gradients as they are."""
    if max_norm <= 0:
        return
    for params in groups:
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)


# --- truncated-SVD compression -------------------------------------------------------------------------

def energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest r with sum_{i<=r} s_i^2 >= energy * sum_i s_i^2 (s descending); 0 for a zero matrix."""
    e = s.double().square()
    total = float(e.sum())
    if total == 0.0:
        return 0
    cum = torch.cumsum(e, 0)
    r = int((cum < energy * total).sum()) + 1
    return min(r, len(s))


def svd_factors(mat: torch.Tensor, energy: float, count: Count = None) -> dict[str, torch.Tensor]:
    """Truncated SVD of one matrix as {"a": U_r diag(s_r) (m x r), "b": V_r^T (r x n)}."""
    m, n = mat.shape
    if count is not None:
        count(svd_macs(m, n))
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    r = energy_rank(s, energy)
    return {"a": u[:, :r] * s[:r], "b": vh[:r].clone()}  # own storage: only r rows are sent


def _product(f: dict[str, torch.Tensor], count: Count) -> torch.Tensor:
    if count is not None:
        count(f["a"].shape[0] * f["a"].shape[1] * f["b"].shape[1])  # (m x r)(r x n): m r n multiply-adds
    return f["a"] @ f["b"]


def factor_numel(code) -> int:
    """Numbers sent for one tensor's code (dense tensor, factor pair, or list of pairs)."""
    if isinstance(code, torch.Tensor):
        return code.numel()
    if isinstance(code, dict):
        return code["a"].numel() + code["b"].numel()
    return sum(factor_numel(c) for c in code)


def compress_tensor(t: torch.Tensor, energy: float, count: Count = None, conv_svd: str = "per-position",
                    dense_fallback: bool = True):
    """Code of one tensor: the dense tensor (ndim < 2, or not finite), a factor pair (matrix), or for a
    4-D conv weight one factor pair per kernel position (``per-position``) or one for the out x
    (in*kh*kw) matrix (``flatten``). With ``dense_fallback`` the dense tensor is sent when it is not
    larger."""
    t = t.detach()
    if t.dim() < 2 or not bool(torch.isfinite(t).all()):
        # a diverged update (inf/NaN) has no SVD: it travels dense, as any method's NaN model would
        return t.clone()
    if t.dim() == 2:
        code = svd_factors(t, energy, count)
    elif t.dim() == 4 and conv_svd == "per-position":
        out, inp, kh, kw = t.shape
        mats = t.permute(2, 3, 0, 1).reshape(kh * kw, out, inp)  # one out x in matrix per kernel position
        code = [svd_factors(mats[p], energy, count) for p in range(kh * kw)]
    else:
        code = svd_factors(t.reshape(t.shape[0], -1), energy, count)
    if dense_fallback and factor_numel(code) >= t.numel():
        return t.clone()
    return code


def decompress_tensor(code, shape: torch.Size, count: Count = None) -> torch.Tensor:
    if isinstance(code, torch.Tensor):
        return code
    if isinstance(code, dict):
        return _product(code, count).reshape(shape)
    out, inp, kh, kw = shape
    mats = torch.stack([_product(c, count) for c in code])  # (kh*kw, out, in)
    return mats.reshape(kh, kw, out, inp).permute(2, 3, 0, 1).contiguous()


def compress(tensors: dict[str, torch.Tensor], energy: float, count: Count = None,
             conv_svd: str = "per-position", dense_fallback: bool = True) -> dict:
    return {k: compress_tensor(v, energy, count, conv_svd, dense_fallback) for k, v in tensors.items()}


def decompress(code: dict, shapes: dict[str, torch.Size], count: Count = None) -> dict[str, torch.Tensor]:
    return {k: decompress_tensor(c, shapes[k], count) for k, c in code.items()}


# --- the method -----------------------------------------------------------------------------------------

class FedKD(Method):
    code = "wuch15/FedKD; TsingZ0/HtFLlib"
    paper = ("Wu et al., Communication-efficient federated learning via knowledge distillation, "
             "Nature Communications 13, 2032 (2022)")
    heterogeneous = True
    push = "all"  # HtFLlib sends the mentee to all clients (spec C.8, A.6); the bytes are counted for all

    @dataclass
    class Params:
        shared_model: str = hparam("cnn5", "architecture of the shared model (FML meme, FedKD mentee), the same "
                                           "for every client", choices=SHARED_MODELS)
        energy_start: float = hparam(0.95, "FedKD: SVD energy threshold T_start of the first round",
                                     low=0.0, high=1.0, low_open=True, marker="code: wuch15/FedKD tmin, HtFLlib")
        energy_end: float = hparam(0.98, "FedKD: SVD energy threshold T_end of the last round",
                                   low=0.0, high=1.0, low_open=True, marker="code: wuch15/FedKD tmax, HtFLlib")
        fedkd_compress: str = hparam("update", "FedKD: compress the mentee update new - old (the original code) "
                                               "or the mentee parameters (HtFLlib's variant)",
                                     choices=("update", "params"), marker="reconstruction")
        mentee_lr: float = hparam(0.01, "FedKD: learning rate of the mentee (mentor and W_h use --lr)",
                                  low=0.0, low_open=True, marker="code: HtFLlib tuned script")
        fedkd_clip: float = hparam(10.0, "FedKD: gradient-norm clip applied to the mentor, the mentee and W_h "
                                         "separately, instead of the run's --clip (0 = off, as wuch15/FedKD)",
                                   low=0.0, marker="code: TsingZ0/HtFLlib")
        fedkd_conv_svd: str = hparam("per-position", "FedKD: SVD of a conv weight, one out x in matrix per kernel "
                                                     "position or one out x (in*kh*kw) matrix",
                                     choices=("per-position", "flatten"), marker="reconstruction")
        fedkd_dense_fallback: bool = hparam(True, "FedKD: send a tensor dense when its SVD factors would be "
                                                  "larger (so a payload never exceeds the dense mentee)",
                                            marker="reconstruction")

        def check(self) -> None:
            if self.energy_start > self.energy_end:
                raise ConfigError(f"--energy-start {self.energy_start} exceeds --energy-end {self.energy_end}; "
                                  f"the FedKD threshold must not fall over the rounds")

    @classmethod
    def label(cls, p) -> str:
        mode = "update" if p.fedkd_compress == "update" else "params (HtFLlib variant, deviates from the original)"
        return (f"FedKD (mentee={p.shared_model}, T={p.energy_start}->{p.energy_end}, compress={mode}, "
                f"mentee-lr={p.mentee_lr}, KL element-wise mean, "
                f"clip {f'{p.fedkd_clip} per module' if p.fedkd_clip > 0 else 'off'}, conv-svd={p.fedkd_conv_svd}"
                f"{'' if p.fedkd_dense_fallback else ', no dense fallback'})")

    def mentee_spec(self):
        return cnn_spec(self.hp.shared_model, self.run.num_classes)

    def energy(self, t: int) -> float:
        """T(t) = T_start + ((t + 1) / T_rounds) (T_end - T_start), t the 0-based round."""
        hp = self.hp
        return hp.energy_start + ((t + 1) / self.run.rounds) * (hp.energy_end - hp.energy_start)

    def _compress(self, tensors, t, count):
        return compress(tensors, self.energy(t), count, self.hp.fedkd_conv_svd, self.hp.fedkd_dense_fallback)

    def _shapes(self, party):
        return {k: v.shape for k, v in party.module("mentee").named_parameters()}

    # --- algorithm ----------------------------------------------------------------------------
    def client_init(self, client):
        client.own("model", client.model_spec)          # mentor
        client.own("mentee", self.mentee_spec())
        client.own("W_h", linear_spec(REP_DIM, REP_DIM, bias=False))

    def server_init(self, server):
        # the global mentee starts as the server's; round 1 sends it densely to every client
        return {"init": snapshot(server.own("mentee", self.mentee_spec()))}

    def client_update(self, client, broadcast):
        # push = "all": the broadcast was already installed by receive(); the mentee is the global one
        mentor, mentee, w_h = client.module("model"), client.module("mentee"), client.module("W_h")
        m0 = snapshot(mentee)
        opt = client.optimizer(mentor.parameters())
        opt.add_param_group({"params": list(w_h.parameters())})
        opt.add_param_group({"params": list(mentee.parameters()), "lr": self.hp.mentee_lr})
        modules = [list(m.parameters()) for m in (mentor, mentee, w_h)]
        for x, y in client.batches(self.run.epochs):
            logits_t, h_t = mentor(x)
            logits_s, h_s = mentee(x)
            l_t, l_s = fedkd_losses(logits_t, h_t, logits_s, w_h(h_s), y)
            # not client.step: the clip is per module (HtFLlib), not the run's one norm over all parameters
            opt.zero_grad(set_to_none=True)
            (l_t + l_s).backward()  # one backward = HtFLlib's two accumulated backward passes
            clip_per_module(modules, self.hp.fedkd_clip)
            opt.step()
        with torch.no_grad():
            trained = snapshot(mentee)
            target = {k: trained[k] - m0[k] for k in m0} if self.hp.fedkd_compress == "update" else trained
            upload = self._compress(target, client.round - 1, client.count_macs)
            for k, p in mentee.named_parameters():
                p.copy_(m0[k])  # back to the global mentee; the aggregated update is added in receive()
        return upload

    @torch.no_grad()
    def server_update(self, server, uploads):
        shapes = self._shapes(server)
        dense = [decompress(u.payload, shapes, server.count_macs) for u in uploads]
        avg = mean(dense)  # unweighted (spec C.8)
        code = self._compress(avg, server.round - 1, server.count_macs)
        key = "update" if self.hp.fedkd_compress == "update" else "params"
        self._install(server, {key: code}, server.count_macs)  # the server tracks the global mentee
        return {key: code}

    def receive(self, client, broadcast):
        self._install(client, broadcast, client.count_macs)

    @torch.no_grad()
    def _install(self, party, broadcast, count):
        mentee = party.module("mentee")
        params = dict(mentee.named_parameters())
        if "init" in broadcast:
            for k, v in broadcast["init"].items():
                params[k].copy_(v)
        elif "update" in broadcast:
            for k, v in decompress(broadcast["update"], self._shapes(party), count).items():
                params[k].add_(v)
        else:
            for k, v in decompress(broadcast["params"], self._shapes(party), count).items():
                params[k].copy_(v)
