"""``uniform-lora``: FedIT's factor averaging with equal client weights (a plugin method in one file)."""

from __future__ import annotations

from fedbench.lora import algebra
from fedbench.methods.lora_family import FederatedLoRA


class UniformLoRA(FederatedLoRA):
    paper = "none: a plugin demonstration"
    code = ""

    def aggregate(self, server, uploads):
        ps = [1.0 / len(uploads)] * len(uploads)
        A = {t.key: algebra.weighted_sum(ps, [u.payload["A"][t.key] for u in uploads]) for t in self.targets}
        B = {t.key: algebra.weighted_sum(ps, [u.payload["B"][t.key] for u in uploads]) for t in self.targets}
        self.set_global(server, A, B)
        server.report("uniform_lora_clients", float(len(uploads)))
