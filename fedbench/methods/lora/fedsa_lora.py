"""FedSA-LoRA, share A and keep B local (Guo et al., ICLR 2025; spec §3.3).

    client k: load the global A; train A and B; send A                                r d_in up and down
    server:   A <- sum_k p_k A_k;  B (and, in the reference configs, the head) stays on the client
Personalised: each client is evaluated with its own B; there is no global model, so neither global
accuracy nor D_t is defined.
"""

from __future__ import annotations

from fedbench.lora import algebra
from fedbench.methods.lora_family import FederatedLoRA
from fedbench.registry import register_method


@register_method("fedsa-lora")
class FedSALoRA(FederatedLoRA):
    paper = "Guo et al., Selective Aggregation for Low-Rank Adaptation in Federated Learning (FedSA-LoRA), ICLR 2025"
    trains = ("A", "B")
    sends = ("A",)
    personalised = True
    evaluations = ("personalised",)

    @classmethod
    def display_name(cls) -> str:
        return "FedSA-LoRA"

    def aggregate(self, server, uploads):
        ps = [u.weight for u in uploads]
        A = {t.key: algebra.weighted_sum(ps, [u.payload["A"][t.key] for u in uploads]) for t in self.targets}
        self.set_global(server, A=A)
