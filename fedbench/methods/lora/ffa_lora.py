"""FFA-LoRA, Federated Freeze-A LoRA (Sun et al., ICLR 2024; spec §3.2).

    A: initialised once from a seed shared by all (the server's initial A), never trained, never sent
    client k: load the global B; train B (A frozen); send B                           r d_out up and down
    server:   B <- sum_k p_k B_k
Exact: A is common, so B̄ A = sum p_k B_k A (D_t = 0 up to float rounding).
"""

from __future__ import annotations

from fedbench.lora import algebra
from fedbench.methods.lora_family import FederatedLoRA
from fedbench.registry import register_method


@register_method("ffa-lora")
class FFALoRA(FederatedLoRA):
    code = "none dedicated; freeze-A modes in Pengxin-Guo/FedSA-LoRA, RaghavSinghal10/fedex-lora, imkevinkuo/flasc"
    paper = "Sun et al., Improving LoRA in Privacy-preserving Federated Learning (FFA-LoRA), ICLR 2024"
    trains = ("B",)
    sends = ("B",)

    @classmethod
    def display_name(cls) -> str:
        return "FFA-LoRA"

    def server_init(self, server):
        state = super().server_init(server)
        shared_a = self.factors_of(server, ("A",))  # the shared seed's A: every client builds the same
        for c in self.clients:
            self.install(c, shared_a)
        return state

    def aggregate(self, server, uploads):
        ps = [u.weight for u in uploads]
        B = {t.key: algebra.weighted_sum(ps, [u.payload["B"][t.key] for u in uploads]) for t in self.targets}
        self.set_global(server, B=B)
