"""FedIT (Zhang et al., "Towards Building the Federated GPT"; spec §3.1).

    client k: load the global (A, B); train A and B on the task loss; send A, B          P(r) up, P(r) down
    server:   A <- sum_k p_k A_k,  B <- sum_k p_k B_k   (p_k ∝ n_k)
Not exact: s (sum p_k B_k A_k - B̄ Ā) = s sum p_k (B_k - B̄)(A_k - Ā) is lost every round; reported as
``fedit_factor_error`` (absolute, Frobenius over all adapted matrices) and ``fedit_factor_error_rel``.

``--reference-quirks``: the FedIT branch of ATP-1010/FederatedLLM accumulates into a misspelled variable,
so the "average" is client 0's factors times p_0 (spec §6.3).
"""

from __future__ import annotations

from fedbench.lora import algebra
from fedbench.methods.lora_family import FederatedLoRA
from fedbench.registry import register_method


@register_method("fedit")
class FedIT(FederatedLoRA):
    code = "JayZhang42/FederatedGPT-Shepherd"
    paper = "Zhang et al., Towards Building the Federated GPT: Federated Instruction Tuning (FedIT), arXiv 2305.05644"
    trains = ("A", "B")
    sends = ("A", "B")

    @classmethod
    def display_name(cls) -> str:
        return "FedIT"

    def aggregate(self, server, uploads):
        ps = [u.weight for u in uploads]
        A, B = {}, {}
        err = ideal2 = 0.0
        s = server.module("lora").scaling
        for t in self.targets:
            As = [u.payload["A"][t.key] for u in uploads]
            Bs = [u.payload["B"][t.key] for u in uploads]
            if self.hp.reference_quirks:  # the misspelled accumulator: only the first client counts
                A[t.key], B[t.key] = ps[0] * As[0], ps[0] * Bs[0]
            else:
                A[t.key], B[t.key] = algebra.weighted_sum(ps, As), algebra.weighted_sum(ps, Bs)
            err += algebra.frob2(algebra.fedit_error(ps, [a.double() for a in As], [b.double() for b in Bs], s))
            ideal2 += algebra.frob2(algebra.ideal_update(ps, [a.double() for a in As], [b.double() for b in Bs],
                                                         [s] * len(ps)))
        self.set_global(server, A, B)
        server.report("fedit_factor_error", err ** 0.5)
        server.report("fedit_factor_error_rel", (err / ideal2) ** 0.5 if ideal2 > 0 else 0.0)
