"""FedLoRA / pFedLoRA (Yi et al., arXiv 2310.13283) as fedbench reconstructs it (spec Part B).

The paper's method section was not available: the adapter design, the loss with mu, the epoch split
and the inference path below are fedbench's **reconstruction**, following the same authors' pFedES
and pFedAFM code, and every choice is a flag recorded with each result.

Algorithm (per round, client k with heterogeneous local model f_k and homogeneous adapter g):
    receive the global adapter g
    phase 1, g frozen, E1 epochs:  L1 = (1 - mu) CE(f_k(x), y) + mu CE(f_k(x) (+) g(x), y)
    phase 2, f_k frozen, E2 epochs: L2 = CE(f_k(x) (+) g(x), y)
    upload g
server:
    g = sum_k (n_k / sum n) g_k   (FedAvg-style, factor-wise for LoRA's A and B)
where (+) is ``fc3(h) + s B A h`` for design H (head-lora) and ``f_k(x) + g(x)`` for design S.

Client by client under ``--client-batching``: its training has two phases and an adapter
beside the CNN, so it is not ``StandardTraining`` (not ``batchable``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedbench.errors import ConfigError
from fedbench.hparams import hparam
from fedbench.methods.base import Method, frozen, load, snapshot, weighted_mean
from fedbench.models import adapters  # noqa: F401  (registers the adapter builders)
from fedbench.models.cnn import CNN_WIDTHS, REP_DIM, ModuleSpec
from fedbench.registry import register_method

ADAPTERS = ("head-lora", "small-cnn-dimred", "small-cnn-decomp")


def max_rank(adapter: str, num_classes: int) -> tuple[int, str]:
    """The largest meaningful --rank of an adapter design, and why.

    head-lora: B A maps the 500-d h to K logits, so its rank is at most min(500, K); a larger r only
    adds parameters. The small CNNs are CNN-5-shaped: dimred narrows CNN-5's FC widths (500) to r, and
    decomp factors fc1 (800 -> 500), fc2 (500 -> 500) and fc3 (500 -> K) at one rank r, which no layer
    can use beyond 500 = max_l min(d_in, d_out).
    """
    if adapter == "head-lora":
        return min(REP_DIM, num_classes), f"min(500, K) = min(500, {num_classes})"
    fc_width = CNN_WIDTHS["cnn5"][2]
    if adapter == "small-cnn-dimred":
        return fc_width, f"CNN-5's FC width {fc_width}, which dimred narrows"
    return fc_width, f"max over fc1..fc3 of min(d_in, d_out) = {fc_width}"


def phase1_loss(both: torch.Tensor, local: torch.Tensor, y: torch.Tensor, mu: float) -> torch.Tensor:
    """L1 = (1 - mu) CE(f_k(x), y) + mu CE(f_k(x) (+) g(x), y), from the combined and the local logits."""
    return (1 - mu) * F.cross_entropy(local, y) + mu * F.cross_entropy(both, y)


@register_method("fedlora")
class FedLoRA(Method):
    code = "none public: a reconstruction from the same authors' LipingYi/pFedES and LipingYi/pFedAFM"
    paper = "Yi et al., FedLoRA/pFedLoRA: Model-Heterogeneous Personalized FL with LoRA Tuning, arXiv 2310.13283"
    heterogeneous = True
    push = "selected"

    @dataclass
    class Params:
        adapter: str = hparam("head-lora", "adapter design: head-lora (LoRA beside fc3 on h), small-cnn-dimred, "
                                           "small-cnn-decomp", choices=ADAPTERS, marker="reconstruction")
        rank: int = hparam(8, "adapter rank r", low=1, marker="reconstruction")
        adapter_scale: float = hparam(1.0, "head-lora scaling s in fc3(h) + s B A h", marker="reconstruction")
        adapter_init: str = hparam("kaiming", "init of A (B is always 0): kaiming (PEFT) or normal",
                                   choices=("kaiming", "normal"), marker="reconstruction")
        mu: float = hparam(0.5, "weight of the combined-model loss in phase 1", low=0.0, high=1.0,
                           marker="reconstruction")
        adapter_epochs: int = hparam(0, "phase-2 epochs E2 (0 = same as --epochs; pFedES uses E + 10)", low=0,
                                     marker="reconstruction")
        eval_mode: str = hparam("combined", "predict with f_k (+) g (combined) or f_k alone (local)",
                                choices=("combined", "local"), marker="reconstruction")
        eval_adapter: str = hparam("client", "adapter used by combined evaluation: the client's after phase 2, "
                                             "or the latest global one", choices=("client", "global"),
                                   marker="reconstruction")

    @classmethod
    def check_config(cls, p, cfg) -> None:
        top, why = max_rank(p.adapter, cfg.num_classes)
        if p.rank > top:
            raise ConfigError(f"--rank {p.rank} is out of range for --adapter {p.adapter} on {cfg.dataset}: "
                              f"1 <= r <= {top} ({why})")

    @classmethod
    def label(cls, p) -> str:
        return (f"FedLoRA (reconstruction: {p.adapter}, r={p.rank}, mu={p.mu}, "
                f"E2={p.adapter_epochs or 'E'}, eval={p.eval_mode}"
                f"{'/' + p.eval_adapter if p.eval_mode == 'combined' else ''})")

    def adapter_spec(self) -> ModuleSpec:
        hp, K = self.hp, self.run.num_classes
        if hp.adapter == "head-lora":
            return ModuleSpec.of("lora-head", rank=hp.rank, num_classes=K, scale=hp.adapter_scale,
                                 init=hp.adapter_init)
        return ModuleSpec.of("small-cnn", variant=hp.adapter.rsplit("-", 1)[1], rank=hp.rank, num_classes=K)

    def combined(self, model, adapter, x, out=None):
        """Logits of f_k (+) g, and f_k's own logits."""
        logits, h = model(x) if out is None else out
        g = adapter(h) if self.hp.adapter == "head-lora" else adapter(x)
        return logits + g, logits

    # --- algorithm ----------------------------------------------------------------------------
    def client_init(self, client):
        client.own("model", client.model_spec)
        client.own("adapter", self.adapter_spec())

    def server_init(self, server):
        self.server = server
        return snapshot(server.own("adapter", self.adapter_spec()))

    def client_update(self, client, g):
        model, adapter = client.module("model"), client.module("adapter")
        load(adapter, g)
        mu = self.hp.mu
        e1 = self.run.epochs
        e2 = self.hp.adapter_epochs or e1

        with frozen(adapter):  # phase 1: train f_k, adapter frozen
            opt = client.optimizer(model.parameters())
            for x, y in client.batches(e1):
                both, local = self.combined(model, adapter, x)
                client.step(opt, phase1_loss(both, local, y, mu))

        opt = client.optimizer(adapter.parameters())  # phase 2: train g, f_k frozen (forward only)
        for x, y in client.batches(e2):
            with torch.no_grad():
                out = model(x)
            both, _ = self.combined(model, adapter, x, out)
            client.step(opt, F.cross_entropy(both, y))
        return snapshot(adapter)

    def server_update(self, server, uploads):
        g = weighted_mean(uploads)
        load(server.module("adapter"), g)
        return g

    def view(self, client, g):
        """pfllib protocol: the client at the start of its next round holds the global adapter."""
        load(client.module("adapter"), g)

    def predict(self, client, x):
        model = client.module("model")
        if self.hp.eval_mode == "local":
            return model(x)[0]
        adapter = client.module("adapter") if self.hp.eval_adapter == "client" else self.server.module("adapter")
        return self.combined(model, adapter, x)[0]
