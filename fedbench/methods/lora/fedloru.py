"""FedLoRU, FedIT with periodic merge-and-reset (Park & Klabjan, arXiv 2409.12371; spec §3.12, §6.6).

    client k: load the global (A, B) and the merges it missed; train A and B; send A_k, B_k      P(r) up
    server:   A <- sum_k p_k A_k,  B <- sum_k p_k B_k                                  (FedIT, p_k ∝ n_k)
              every τ rounds (t mod τ = 0, ``--fedloru-period``): W <- W + s B̄ Ā into the backbone, then
              re-initialise the global LoRA (A Kaiming-uniform from a seed of the round, B = 0), so the
              global effective weight is continuous across the merge: W' + s B' A' = W + s B̄ Ā
    download: P(r) (the global factors) + every merge since the client's last download as its factors
              (B̄, s Ā), P(r) per missed merge
The official code is CNN-only; on a pretrained backbone FedLoRU is "FedIT + merge-and-reset every τ
rounds" [reconstruction]. The default τ = 50 is the code's accumulation period (rounds 50, 100, ..., 350
of R = 400): a run of fewer than 50 rounds never merges and is exactly FedIT (a short run has to set
``--fedloru-period`` to see the method at all). D_t equals FedIT's factor error in every round.

``--reference-quirks`` (haemPark/fedloru_official's plain "accumulate", spec §6.6): merge W <- W + s B̄ Ā
without resetting A, B, so the next forward counts that update twice (W + 2 s B̄ Ā; D_t shows it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedbench.hparams import hparam
from fedbench.lora import algebra
from fedbench.metering.algebra import product_macs
from fedbench.methods.lora.merge_log import MissedMerges
from fedbench.methods.lora_family import FederatedLoRA, LoRAParams
from fedbench.registry import register_method
from fedbench.seeding import derive


@register_method("fedloru")
class FedLoRU(MissedMerges, FederatedLoRA):
    code = "haemPark/fedloru_official"
    paper = "Park & Klabjan, FedLoRU: federated low-rank updates accumulated into the model, arXiv 2409.12371"
    trains = ("A", "B")
    sends = ("A", "B")

    @dataclass
    class Params(LoRAParams):
        fedloru_period: int = hparam(50, "merge s B A into the backbone and reset the LoRA every τ rounds "
                                         "(the code's accumulation period; runs shorter than τ are FedIT)", low=1)

    @classmethod
    def display_name(cls) -> str:
        return "FedLoRU"

    @classmethod
    def label(cls, p) -> str:
        return super().label(p)[:-1] + f", period={p.fedloru_period})"

    def download(self, server, client, state):
        payload = super().download(server, client, state)
        payload.update(self.log.payload(client.id))
        return payload

    @torch.no_grad()
    def aggregate(self, server, uploads):
        ps = [u.weight for u in uploads]
        ad = server.module("lora")
        s = ad.scaling
        A, B = {}, {}
        err = 0.0
        for t in self.targets:
            As = [u.payload["A"][t.key] for u in uploads]
            Bs = [u.payload["B"][t.key] for u in uploads]
            A[t.key], B[t.key] = algebra.weighted_sum(ps, As), algebra.weighted_sum(ps, Bs)  # as FedIT does
            err += algebra.frob2(algebra.fedit_error(ps, [algebra.as_matrix(a).double() for a in As],
                                                     [algebra.as_matrix(b).double() for b in Bs], s))
        self.set_global(server, A, B)
        server.report("fedit_factor_error", err ** 0.5)
        if server.round % self.hp.fedloru_period == 0:
            self.merge_and_reset(server)

    @torch.no_grad()
    def merge_and_reset(self, server) -> None:
        ad = server.module("lora")
        part = {"A": {}, "B": {}}
        for t in self.targets:
            a, b = (x.double() for x in ad.factors(t.key))
            server.count_macs(product_macs(t.d_out, a.shape[0], t.d_in))
            self.merge(t.key, ad.scaling * (b @ a))
            part["B"][t.key], part["A"][t.key] = b.float(), (ad.scaling * a).float()
        self.log.record(server.round, part)
        if self.hp.reference_quirks:
            return  # the plain accumulate: A, B kept, so s B A now counts twice
        g = torch.Generator().manual_seed(derive(self.run.seed, "fedloru-reset", server.round))
        for key in ad.lora_A:
            w = ad.lora_A[key].weight
            w.copy_(torch.nn.init.kaiming_uniform_(torch.empty(w.shape), a=math.sqrt(5), generator=g))
            ad.lora_B[key].weight.zero_()
