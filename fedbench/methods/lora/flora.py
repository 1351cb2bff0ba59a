"""FLoRA, stacking (Wang et al., NeurIPS 2024; spec §3.5).

    client k: start from a fresh LoRA of its rank r_k (PEFT init) on the merged backbone; train; send A_k, B_k
    server:   A_stack = [p_1 s_1/s A_1; ...; p_N s_N/s A_N],  B_stack = [B_1 ... B_N]   (only A weighted)
              W0 <- W0 + s B_stack A_stack  = W0 + sum_k p_k s_k B_k A_k   (exact: D_t = 0)
    download: the stacks merged since the client last synced (sum_k P(r_k) per round; ``--flora-download
              dense``: the merged d_out x d_in update instead)
The stack is sized from the clients actually received (the reference code assumes full participation).
The backbone is shared, so every client computes on the latest merged backbone; the stacks a client
missed are counted in its next download. Evaluation (``evaluations``: personalised and global): a client
is scored with what it holds, the LoRA (and head) it trained in its last round on the backbone as it
last downloaded it (the stacks merged since are not counted), as the merging methods do (merge_log.py);
the global model is the latest merged backbone with the server's head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fedbench.hparams import hparam
from fedbench.lora import algebra
from fedbench.methods.lora.merge_log import backbone_less
from fedbench.methods.lora_family import FederatedLoRA, RankScalingParams
from fedbench.registry import register_method
from fedbench.seeding import derive


@register_method("flora")
class FLoRA(FederatedLoRA):
    rule_revision = 1  # 1: clients scored with the model they hold, not the latest merge; --rank-scaling constant
    code = "ATP-1010/FederatedLLM"
    paper = "Wang et al., FLoRA: Federated Fine-Tuning LLMs with Heterogeneous Low-Rank Adaptations, NeurIPS 2024"
    heterogeneous_ranks = True

    @dataclass
    class Params(RankScalingParams):
        flora_download: str = hparam("stack", "what a client downloads: the stacked factors it missed (stack) "
                                              "or the merged dense update (dense)", choices=("stack", "dense"))

    @classmethod
    def display_name(cls) -> str:
        return "FLoRA"

    def setup(self, server, clients):
        super().setup(server, clients)
        self.stacks: list[tuple[int, dict]] = []   # (round, {key: (A_stack, B_stack)}) merged so far
        self.synced = [0] * len(clients)          # last round whose merge each client has

    def download(self, server, client, state):
        missed = [(t, st) for t, st in self.stacks if t > self.synced[client.id]]
        if self.hp.flora_download == "dense":
            s = server.module("lora").scaling
            payload = {"dense": {k: sum(s * (algebra.as_matrix(st[k][1]) @ algebra.as_matrix(st[k][0]))
                                         for _, st in missed) for k in self.layers}} \
                if missed else {}
        else:
            payload = {"stacks": {str(t): {"A": {k: a for k, (a, _) in st.items()},
                                           "B": {k: b for k, (_, b) in st.items()}} for t, st in missed}}
        if self.hp.head == "shared":
            payload["head"] = self.head_of(server)
        return payload

    @torch.no_grad()
    def install(self, party, payload):
        payload = dict(payload)
        through = self.stacks[-1][0] if self.stacks else 0
        stacks, dense = payload.pop("stacks", None), payload.pop("dense", None)
        have = self.synced[party.id]
        rounds = sorted(int(t) for t in (stacks or {}))
        expected = [t for t, _ in self.stacks if have < t <= through]
        if (stacks is not None and rounds != expected) or (dense is None and stacks is None and expected):
            raise ValueError(f"FLoRA: client {party.id} synced at round {have} got merges {rounds}, needs {expected}")
        self.synced[party.id] = through  # the shared backbone already holds these merges
        super().install(party, payload)
        self.fresh_lora(party)

    @torch.no_grad()
    def fresh_lora(self, client) -> None:
        """A new PEFT-initialised LoRA for this round (seeded by client and round): A Kaiming, B = 0."""
        g = torch.Generator().manual_seed(derive(self.run.seed, "flora-fresh", client.id, client.round))
        ad = client.module("lora")
        for key in ad.lora_A:
            w = ad.lora_A[key].weight
            w.copy_(torch.nn.init.kaiming_uniform_(torch.empty(w.shape), a=math.sqrt(5), generator=g))
            ad.lora_B[key].weight.zero_()

    @torch.no_grad()
    def aggregate(self, server, uploads):
        ps = [u.weight for u in uploads]
        s_out = server.module("lora").scaling
        stacked = {}
        for t in self.targets:
            As = [u.payload["A"][t.key] for u in uploads]
            Bs = [u.payload["B"][t.key] for u in uploads]
            ss = [self.scaling_of(u.client) for u in uploads]
            a, b = algebra.stack(ps, As, Bs, ss, s_out)
            am, bm = algebra.as_matrix(a), algebra.as_matrix(b)  # a convolution's stacks in matrix form
            server.count_macs(algebra.product_macs(bm.shape[0], bm.shape[1], am.shape[1]))
            self.merge(t.key, s_out * (bm @ am))
            stacked[t.key] = (a, b)
        self.stacks.append((server.round, stacked))

    def scaling_of(self, cid: int) -> float:
        return self.client_scaling(self.ranks[cid])

    def missed_merges(self, cid: int) -> dict[str, torch.Tensor]:
        """The update the stacks merged since client ``cid`` last downloaded add to each target (empty if none)."""
        missed = [st for t, st in self.stacks if t > self.synced[cid]]
        if not missed:
            return {}
        s = self.server.module("lora").scaling
        return {k: sum(s * (algebra.as_matrix(st[k][1]).double() @ algebra.as_matrix(st[k][0]).double())
                       for st in missed) for k in self.layers}

    def predict(self, client, x):
        """What the client holds: its last round's LoRA and head on the backbone as it last downloaded it."""
        with backbone_less(self.layers, self.missed_merges(client.id)):
            return super().predict(client, x)
