"""FedSA-LoRA, share A and keep B local (Guo et al., ICLR 2025; spec §3.3).

    client k: load the global A; train A and B; send A                                r d_in up and down
    server:   A <- sum_k p_k A_k;  B and the head stay on the client
The head is local by default, as in the official configuration (Pengxin-Guo/FedSA-LoRA's GLUE config
lists lora_B and the classifier as FederatedScope local parameters; ``--head shared`` averages it instead).
Personalised: each client is evaluated with its own B; there is no global model, so neither global
accuracy nor D_t is defined. D_t of the shared part, ``agg_deviation_shared``: the same ratio on A alone,
||A^{t+1} - sum_k p_k A_k|| / ||sum_k p_k (A_k - A^t)|| (0 when the server keeps the p-weighted mean).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedbench.hparams import hparam
from fedbench.lora import algebra
from fedbench.methods.lora_family import HEADS, FederatedLoRA, LoRAParams, report_deviation_parts
from fedbench.registry import register_method


@register_method("fedsa-lora")
class FedSALoRA(FederatedLoRA):
    code = "Pengxin-Guo/FedSA-LoRA"
    paper = "Guo et al., Selective Aggregation for Low-Rank Adaptation in Federated Learning (FedSA-LoRA), ICLR 2025"
    trains = ("A", "B")
    sends = ("A",)
    personalised = True
    evaluations = ("personalised",)

    @dataclass
    class Params(LoRAParams):
        head: str = hparam("local", "classifier head: local (never sent: the official configuration), shared "
                                    "(averaged) or frozen (random, never trained)", choices=HEADS)

    @classmethod
    def display_name(cls) -> str:
        return "FedSA-LoRA"

    def aggregate(self, server, uploads):
        ps = [u.weight for u in uploads]
        start = self.factors_of(server, ("A",))["A"]  # what every participant downloaded
        A = {t.key: algebra.weighted_sum(ps, [u.payload["A"][t.key] for u in uploads]) for t in self.targets}
        self.set_global(server, A=A)
        kept = self.factors_of(server, ("A",))["A"]
        num = den = 0.0
        for k in kept:
            n, d = algebra.deviation_parts(ps, [u.payload["A"][k] for u in uploads], [start[k]] * len(ps), kept[k])
            num, den = num + n, den + d
        report_deviation_parts(server, "agg_deviation_shared", num, den)
