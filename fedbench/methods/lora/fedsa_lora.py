"""FedSA-LoRA, share A and keep B local (Guo et al., ICLR 2025; spec §3.3).

    client k: load the global A; train A and B; send A                                r d_in up and down
    server:   A <- sum_k p_k A_k;  B and the head stay on the client
The head is local by default, as in the official configuration (Pengxin-Guo/FedSA-LoRA's GLUE config
lists lora_B and the classifier as FederatedScope local parameters; ``--head shared`` averages it instead).
Personalised: each client is evaluated with its own B; there is no global model, so neither global
accuracy nor D_t is defined.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedbench.hparams import hparam
from fedbench.lora import algebra
from fedbench.methods.lora_family import HEADS, FederatedLoRA, LoRAParams
from fedbench.registry import register_method


@register_method("fedsa-lora")
class FedSALoRA(FederatedLoRA):
    paper = "Guo et al., Selective Aggregation for Low-Rank Adaptation in Federated Learning (FedSA-LoRA), ICLR 2025"
    trains = ("A", "B")
    sends = ("A",)
    personalised = True

    @dataclass
    class Params(LoRAParams):
        head: str = hparam("local", "classifier head: local (never sent: the official configuration), shared "
                                    "(averaged) or frozen (random, never trained)", choices=HEADS)

    @classmethod
    def display_name(cls) -> str:
        return "FedSA-LoRA"

    def aggregate(self, server, uploads):
        ps = [u.weight for u in uploads]
        A = {t.key: algebra.weighted_sum(ps, [u.payload["A"][t.key] for u in uploads]) for t in self.targets}
        self.set_global(server, A=A)
