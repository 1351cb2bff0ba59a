"""CE-LoRA, tri-matrix personalised LoRA (Li, Liu, Huang, Zhang, Yuan, Hong, arXiv 2503.23869).

    adapter:  W_eff = W0 + s B C A  (PEFT layout: A r x d_in, C r x r, B d_out x r; fedbench/lora/trimatrix.py)
              A, B (and C's start) from one seed shared by all clients: nothing but C ever travels
    client i: load its C; train A, C and B (see --celora-init); send C                              r^2 up
              (with --celora-weights similarity also its label histogram: num_classes values)
    server:   uniform:    C <- sum_j p_j C_j for everyone (FedAvg of C)
              similarity: C_i <- sum_j w_ij C_j,  w_ij = p_j e^{sim_ij / tau} / sum_k p_k e^{sim_ik / tau}
                          sim_ij = mix cos(h_i, h_j) + (1 - mix) cos(vec(C_i - C_0), vec(C_j - C_0))
                          h: label histograms (data space), C_0 the common start of C (parameter space)
    download: the client's own C_i of its last round (a client never seen: sum_j p_j C_j)          r^2 down
Personalised: no global model (neither global accuracy nor D_t is defined). The head follows --head.
D_t of the shared part, ``agg_deviation_shared``: ||C̄ - sum_j p_j C_j|| / ||sum_j p_j (C_j - C_j^start)||
with C̄ the server's FedAvg of C and C_j^start the C client j downloaded (0 when C̄ is the p-weighted mean).

Local training (``--celora-init``):
* ``train-ABC`` (default): Algorithm 1 of the paper and the official code (1503552056/CE-LoRA,
  ``models/base_models.py``: ``TRAIN_ABC = True``, every A, B and C trainable, ``train_c_only=False``)
  train A, C and B in every round and send only C; A and B stay on the client. The start is the code's
  ``LinearLoRATriple`` initialisation: A ~ N(0, 1e-3^2), B = 0, C = I (W_eff = W0; B gets a gradient,
  then C does). After the first round the C's of two clients act in their own A, B bases.
* ``train-AB-first`` [reconstruction]: fedbench's earlier rule: A Kaiming, B = 0, C = I; A, B and C in a
  client's first participation, afterwards C only.
* ``random-B`` [reconstruction]: A and B Kaiming from the shared seed, frozen for the whole run, C = 0
  (W_eff = W0 at the start; with C = I the random s B A would perturb the backbone). All C's share one
  basis, so the uniform rule is exact: s B (sum_j p_j C_j) A = sum_j p_j s B C_j A.
The similarity rule's formula is not in the material read (the official code's server side is not in
the repository, only a per-class GMM of each client's features is prepared for it): sim, mix and tau are
fedbench's [reconstruction]; tau -> inf gives the uniform rule, and every row of w sums to one.

``--reference-quirks``: the code's C-only mode (``train_c_only=True``: A and B frozen) from its start
(A ~ N(0, 1e-3^2), B = 0, C = I): with B = 0 frozen, dL/dC = s B^T g (A x)^T = 0 exactly, so
C keeps zero gradient and only the head learns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedbench.hparams import hparam
from fedbench.lora import algebra
from fedbench.lora.trimatrix import inject_tri, tri_adapter_spec
from fedbench.metering.algebra import product_macs
from fedbench.methods.lora_family import FederatedLoRA, LoRAParams, copy_strict, report_deviation_parts
from fedbench.registry import register_method


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity of the rows of x (M x D); a zero row has similarity 0 to every row
    (1 to itself)."""
    norms = x.norm(dim=1)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    cos = (x @ x.T) / (safe[:, None] * safe[None, :])
    cos = torch.where((norms[:, None] > 0) & (norms[None, :] > 0), cos, torch.zeros_like(cos))
    return cos.fill_diagonal_(1.0)


def similarity_weights(ps, hists: torch.Tensor, cores: torch.Tensor, mix: float, tau: float) -> torch.Tensor:
    """w (M x M): w_ij = p_j exp(sim_ij / tau) / sum_k p_k exp(sim_ik / tau), sim = mix cos(h) + (1 - mix)
    cos(cores); hists are the label histograms (M x classes), cores the flattened C - C_0 (M x D)."""
    sim = mix * cosine_matrix(hists) + (1.0 - mix) * cosine_matrix(cores)
    logp = torch.log(torch.as_tensor(ps, dtype=sim.dtype))
    return torch.softmax(sim / tau + logp[None, :], dim=1)


@register_method("ce-lora")
class CELoRA(FederatedLoRA):
    code = "1503552056/CE-LoRA (partial)"
    paper = ("Li, Liu, Huang, Zhang, Yuan, Hong, Communication-Efficient and Personalized Federated Foundation "
             "Model Fine-Tuning via Tri-Matrix Adaptation (CE-LoRA), arXiv 2503.23869")
    trains = ("A", "C", "B")  # the default (train-ABC); see trainable()
    sends = ("C",)
    personalised = True
    evaluations = ("personalised",)

    @dataclass
    class Params(LoRAParams):
        celora_init: str = hparam("train-ABC", "local training: train-ABC (A, C and B every round, only C sent: "
                                               "the paper's Algorithm 1 and the official code), train-AB-first "
                                               "(A, B, C in a client's first participation, then C only) or "
                                               "random-B (A, B random shared and frozen, C = 0)",
                                  choices=("train-ABC", "train-AB-first", "random-B"), marker="reconstruction")
        celora_weights: str = hparam("similarity", "server rule: similarity (personalised C_i = sum_j w_ij C_j "
                                                   "from label-histogram and C similarity) or uniform (FedAvg "
                                                   "of C)", choices=("similarity", "uniform"),
                                     marker="reconstruction")
        celora_temperature: float = hparam(0.5, "softmax temperature tau of the similarity weights (large: "
                                                "the uniform rule)", low=0.0, low_open=True, marker="reconstruction")
        celora_mix: float = hparam(0.5, "share of data-space (label histogram) similarity in sim; the rest "
                                        "is parameter-space (C) similarity", low=0.0, high=1.0,
                                   marker="reconstruction")

    @classmethod
    def display_name(cls) -> str:
        return "CE-LoRA"

    @classmethod
    def label(cls, p) -> str:
        init = "reference init" if p.reference_quirks else p.celora_init
        rule = p.celora_weights if p.celora_weights == "uniform" else \
            f"similarity tau={p.celora_temperature} mix={p.celora_mix}"
        return super().label(p)[:-1] + f", {init}, {rule})"

    @property
    def tri_init(self) -> str:
        if self.hp.reference_quirks or self.hp.celora_init == "train-ABC":
            return "reference"  # the official LinearLoRATriple start
        return "random-b" if self.hp.celora_init == "random-B" else "peft"

    def setup(self, server, clients):
        super().setup(server, clients)
        self.layers = inject_tri(server.backbone, self.targets)
        self.personal: dict[int, dict[str, torch.Tensor]] = {}  # client -> its C_i of the last round
        self.warmed: set[int] = set()                            # clients past their first participation

    def spec(self, r: int):
        return tri_adapter_spec(self.targets, r, self.hp.lora_alpha, self.hp.rslora, self.tri_init)

    def server_init(self, server):
        state = super().server_init(server)
        shared = {**self.factors_of(server, ("A", "B")), "C": self.cores_of(server)}
        self.c0 = {k: v.double() for k, v in shared["C"].items()}  # the common start of C
        for c in self.clients:  # one seed for all: every client builds the same A, B, C (nothing sent)
            self.install(c, shared)
        return state

    # --- what travels ----------------------------------------------------------------------------
    def cores_of(self, party) -> dict[str, torch.Tensor]:
        ad = party.module("lora")
        return {key: m.weight.detach().clone() for key, m in ad.lora_C.items()}

    def core_for(self, server, cid: int) -> dict[str, torch.Tensor]:
        """The C client ``cid`` downloads: its own of its last round, or (never seen, uniform) the server's."""
        return self.personal.get(cid) or self.cores_of(server)

    def download(self, server, client, state):
        payload = {"C": self.core_for(server, client.id)}
        if self.hp.head == "shared":
            payload["head"] = self.head_of(server)
        return payload

    def upload(self, client):
        payload = {"C": self.cores_of(client)}
        if self.hp.celora_weights == "similarity":
            counts = client.label_counts.to(torch.float32)
            payload["hist"] = counts / counts.sum()
        if self.hp.head == "shared":
            payload["head"] = self.head_of(client)
        return payload

    @torch.no_grad()
    def install(self, party, payload):
        payload = dict(payload)
        cores = payload.pop("C", None)
        if cores is not None:
            copy_strict(self.name, "C", {k: m.weight for k, m in party.module("lora").lora_C.items()}, cores)
        super().install(party, payload)

    # --- local training --------------------------------------------------------------------------
    def trains_factors(self, client) -> bool:
        """Does this participation train A and B too (train-ABC: always; train-AB-first: the client's
        first; random-B and the reference quirks: never)?"""
        if self.hp.reference_quirks:
            return False
        if self.hp.celora_init == "train-ABC":
            return True
        return self.hp.celora_init == "train-AB-first" and client.id not in self.warmed

    def trainable(self, client):
        ad = client.module("lora")
        params = list(ad.lora_C.parameters())
        if self.trains_factors(client):
            params += list(ad.lora_A.parameters()) + list(ad.lora_B.parameters())
        if self.hp.head != "frozen":
            params += list(client.module("head").parameters())
        return params

    def client_update(self, client, payload):
        self.install(client, payload)
        self.train(client)
        self.warmed.add(client.id)
        return self.upload(client)

    # --- server ----------------------------------------------------------------------------------
    @torch.no_grad()
    def aggregate(self, server, uploads):
        ps = [u.weight for u in uploads]
        keys = [t.key for t in self.targets]
        starts = [self.core_for(server, u.client) for u in uploads]  # what each participant downloaded
        mean = {k: algebra.weighted_sum(ps, [u.payload["C"][k] for u in uploads]) for k in keys}
        ad = server.module("lora")
        for k in keys:  # the FedAvg of C: every client's C (uniform), a newcomer's start (similarity)
            ad.lora_C[k].weight.copy_(mean[k])
        kept = self.cores_of(server)
        num = den = 0.0
        for k in keys:
            n, d = algebra.deviation_parts(ps, [u.payload["C"][k] for u in uploads], [st[k] for st in starts], kept[k])
            num, den = num + n, den + d
        report_deviation_parts(server, "agg_deviation_shared", num, den)
        if self.hp.celora_weights == "uniform":
            return
        w = self.weights(server, uploads)
        server.report("celora_self_weight", float(w.diagonal().mean()))
        for i, u in enumerate(uploads):
            self.personal[u.client] = {
                k: algebra.weighted_sum(w[i].tolist(), [v.payload["C"][k] for v in uploads]) for k in keys}

    def weights(self, server, uploads) -> torch.Tensor:
        """The similarity weights w (M x M, float64) of this round's participants, metered."""
        keys = [t.key for t in self.targets]
        hists = torch.stack([u.payload["hist"].double() for u in uploads])
        cores = torch.stack([torch.cat([(u.payload["C"][k].double() - self.c0[k]).flatten() for k in keys])
                             for u in uploads])
        m, d = cores.shape
        server.count_macs(product_macs(m, d, m) + product_macs(m, hists.shape[1], m)  # the two Gram matrices
                          + product_macs(m, m, d))                                    # the personal mixes
        return similarity_weights([u.weight for u in uploads], hists, cores, self.hp.celora_mix,
                                  self.hp.celora_temperature)
