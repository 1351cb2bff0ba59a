"""FedLEASE, adaptive LoRA expert allocation and selection (Wang, Bian, Zhang, Xu, NeurIPS 2025;
arXiv 2509.15087; spec §3.18; reference code lei-wang-link/FedLEASE).

    warm-up, rounds 1..W (``--fedlease-warmup``, 5 as the code):
      client k: train its own rank-r LoRA (and head) locally; nothing comes down       0 down
                in round W send (A_k, B_k) for the clustering                           P(r) up in round W, else 0
    clustering, end of round W (server, on the round-W participants):
      d(i, j) = mean over adapted matrices l of 1 - cos(vec B_i^l, vec B_j^l)
      agglomerative clustering of d, average linkage (scipy); M in 2..``--fedlease-max-clusters`` (4) with
      the best silhouette score (ties: the smaller M; the code min-max normalises the scores first, which
      picks the same M); expert k <- mean of cluster k's (A, B)
    rounds t > W:
      client k in cluster c(k): receive all M experts (and its cluster's router if aggregated)     M P(r) down
                train every expert, its router (and head) through the mixture
                y = W0 x + sum_m g_m(x) s B_m A_m x  at every adapted layer (fedbench/lora/experts.py)
                send its own expert c(k) (``--fedlease-upload own``) or all M (``all``, as the code)  P(r) / M P(r) up
      server:   expert m <- mean of expert m over this round's participants of cluster m only;
                routers stay on the clients, or (``--fedlease-router-agg``) are averaged within the cluster
Means within a cluster use the run's aggregation weights (``--agg-weight``) renormalised over the
cluster's participants; the reference code takes the unweighted mean, i.e. ``--agg-weight uniform``.

Routing (``--fedlease-routing``): ``adaptive`` is the reference code's top-M over 2M-1 router outputs in
which the M-1 extra slots all stand for the client's own expert, so a client uses 1..M experts per
token; ``dense`` is a softmax over the M experts. Exact definition in fedbench/lora/experts.py.

Short runs: the warm-up is W whole rounds of purely local training (no aggregation at all), so with
``--rounds`` R only R - W rounds federate; W >= R is refused. ``--fedlease-warmup 1`` clusters after one
local round.

Decisions of fedbench's own [reconstruction]:
* Partial participation: the clustering sees the round-W participants only. A client that was not
  one joins at its first selection after W: that round it trains its own LoRA locally (nothing down),
  sends (A, B) like a warm-up client, and the server puts it in the cluster whose warm-up B's are
  nearest on average (the average-linkage criterion); from its next selection on it trains the experts.
  Its LoRA is not averaged into any expert.
* Few clients in round W: one client gives M = 1 (one expert, the routing weight is 1: plain LoRA
  with its cluster mean); two give M = 2 (each its own expert; silhouette needs 2 <= M <= n - 1); the
  search otherwise runs over 2..min(max_clusters, n - 1), and gives M = 1 only if every distance ties
  (no split exists). No error either way.
* Personalised: each client is evaluated with its own state after its last local round (the code
  evaluates after loading the new aggregate). No global model. D_t is reported per cluster
  (spec §5.2): for expert m, ``agg_deviation_c{m}`` = ||s B̄_m Ā_m - sum_i w_i s B_{i,m} A_{i,m}||_F /
  ||sum_i w_i s B_{i,m} A_{i,m} - s B_m^t A_m^t||_F over the cluster's participants (their expert m at
  the end of the round, the server's at its start), which is FedIT's factor error within the cluster;
  ``agg_deviation`` / ``agg_deviation_abs`` pool every cluster's matrices. Also reported:
  ``fedlease_clusters`` (M) and ``fedlease_silhouette`` in round W, ``fedlease_joined`` when clients join.
* Head: local by default (the reference code keeps every non-LoRA parameter on the client); with
  ``--head shared`` it is sent in round W and after, and averaged over all participants.

``--reference-quirks`` (the released main.py): in a client's first round after the warm-up nothing is
loaded from the server; its own warm-up LoRA becomes its own expert and the other experts keep their
fresh initialisation (B = 0), so the cluster means first reach the clients one round later. The
released main.py also turns router aggregation on, which here is ``--fedlease-router-agg``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from fedbench.errors import ConfigError
from fedbench.hparams import hparam
from fedbench.lora import algebra
from fedbench.lora.experts import ROUTINGS, activate_experts, experts_spec, inject_experts
from fedbench.lora.layers import activate
from fedbench.methods.base import Client, Upload
from fedbench.methods.lora_family import FederatedLoRA, LoRAParams, copy_strict
from fedbench.registry import register_method

# --- clustering (pure functions of the clients' B matrices; tests/test_lora_part2d.py) -------------


def b_distances(Bs: list[dict[str, torch.Tensor]]) -> np.ndarray:
    """n x n float64: d(i, j) = mean over matrices l of 1 - cos(vec B_i^l, vec B_j^l) (cos = 0 for a zero B)."""
    keys = list(Bs[0])
    n = len(Bs)
    flat = {k: torch.stack([b[k].detach().double().reshape(-1) for b in Bs]) for k in keys}
    d = np.zeros((n, n))
    for k in keys:
        x = flat[k]
        norms = x.norm(dim=1)
        denom = norms[:, None] * norms[None, :]
        cos = torch.where(denom > 0, (x @ x.T) / denom.clamp_min(1e-300), torch.zeros_like(denom))
        d += (1.0 - cos).numpy()
    d /= len(keys)
    d = (d + d.T) / 2
    np.fill_diagonal(d, 0.0)
    return np.clip(d, 0.0, None)


def silhouette(d: np.ndarray, labels) -> float:
    """Mean silhouette of a clustering given a distance matrix: s(i) = (b_i - a_i) / max(a_i, b_i), a_i the
    mean distance to the other members of i's cluster, b_i the smallest mean distance to another cluster;
    s(i) = 0 in a cluster of one (as scikit-learn). Needs 2 <= #clusters <= n - 1."""
    labels = np.asarray(labels)
    ids = np.unique(labels)
    if not 2 <= len(ids) <= len(labels) - 1:
        raise ValueError(f"silhouette needs 2..n-1 clusters, got {len(ids)} for n = {len(labels)}")
    s = np.zeros(len(labels))
    for i in range(len(labels)):
        same = labels == labels[i]
        if same.sum() == 1:
            continue
        a = d[i, same].sum() / (same.sum() - 1)
        b = min(d[i, labels == c].mean() for c in ids if c != labels[i])
        s[i] = (b - a) / max(a, b) if max(a, b) > 0 else 0.0
    return float(s.mean())


def _first_seen(labels) -> list[int]:
    """Relabel 0..M-1 in order of first appearance (cluster of client 0 is 0)."""
    order: dict = {}
    return [order.setdefault(x, len(order)) for x in labels]


def choose_clusters(d: np.ndarray, max_clusters: int) -> tuple[list[int], int, float | None]:
    """(labels, M, silhouette) of the average-linkage clustering with the best silhouette over
    M in 2..min(max_clusters, n - 1); n = 1: one cluster; n = 2: two (no score)."""
    n = len(d)
    if n == 1:
        return [0], 1, None
    if n == 2:
        return [0, 1], 2, None
    z = linkage(squareform(d, checks=False), method="average")
    best = None
    for m in range(2, min(max_clusters, n - 1) + 1):
        labels = _first_seen(fcluster(z, m, criterion="maxclust"))
        k = len(set(labels))
        if k < 2:
            continue
        score = silhouette(d, labels)
        if best is None or score > best[2]:
            best = (labels, k, score)
    if best is None:  # every distance tied: no split is better than another
        return [0] * n, 1, None
    return best


# --- the method ----------------------------------------------------------------------------------------


@register_method("fedlease")
class FedLEASE(FederatedLoRA):
    code = "lei-wang-link/FedLEASE"
    paper = "Wang, Bian, Zhang, Xu, FedLEASE: Adaptive LoRA Experts Allocation and Selection for Federated " \
            "Fine-Tuning, NeurIPS 2025, arXiv 2509.15087"
    personalised = True
    evaluations = ("personalised",)

    @dataclass
    class Params(LoRAParams):
        head: str = hparam("local", "classifier head: local (never sent, as the reference code), shared "
                                    "(averaged over all participants from round W on) or frozen",
                           choices=("shared", "local", "frozen"))
        fedlease_warmup: int = hparam(5, "warm-up rounds W of purely local training before the clustering "
                                         "(the code's 5); only rounds after W federate", low=1)
        fedlease_max_clusters: int = hparam(4, "largest number of experts M tried by the silhouette search "
                                               "(2..this)", low=2)
        fedlease_routing: str = hparam("adaptive", "adaptive (top-M of 2M-1 router outputs, extra slots = own "
                                                   "expert, as the code) or dense (softmax over the M experts)",
                                       choices=ROUTINGS, marker="reconstruction")
        fedlease_router_agg: bool = hparam(False, "average the routers within each cluster (and send them) "
                                                  "instead of keeping them local", marker="reconstruction")
        fedlease_upload: str = hparam("own", "own (send only the client's own-cluster expert, all the server "
                                             "uses) or all (every expert, as the code sends)",
                                      choices=("own", "all"), marker="reconstruction")

    @classmethod
    def display_name(cls) -> str:
        return "FedLEASE"

    @classmethod
    def label(cls, p) -> str:
        extra = (f", warm-up={p.fedlease_warmup}, M<={p.fedlease_max_clusters}, routing={p.fedlease_routing}, "
                 f"router={'cluster-avg' if p.fedlease_router_agg else 'local'}, upload={p.fedlease_upload}")
        return super().label(p)[:-1] + extra + ")"

    @classmethod
    def warmup_rounds(cls, p) -> int:
        return p.fedlease_warmup  # W rounds of purely local training before the clustering

    @classmethod
    def check_config(cls, p, cfg) -> None:
        super().check_config(p, cfg)
        if p.fedlease_warmup >= cfg.rounds:
            raise ConfigError(f"--fedlease-warmup {p.fedlease_warmup} leaves no round for the experts in "
                              f"--rounds {cfg.rounds}; use a warm-up of 1..{cfg.rounds - 1}")

    @classmethod
    def check_backbone(cls, p, cfg, backbone):
        targets = super().check_backbone(p, cfg, backbone)
        conv = [t.name for t in targets if t.kind != "linear"]
        if conv:
            raise ConfigError(f"fedlease routes per token and adapts linear layers only; --targets {p.targets!r} "
                              f"names convolution {conv[0]}; use a linear preset (attn, attn-all, attn-mlp)")
        return targets

    def setup(self, server, clients):
        super().setup(server, clients)
        self.mix = inject_experts(server.backbone, self.layers)
        self.M: int | None = None            # number of experts, set by the clustering
        self.assign: dict[int, int] = {}     # client -> its cluster (own expert)
        self.warm_B: dict[int, dict] = {}    # client -> warm-up B's (for late joiners' nearest cluster)
        self.started: set[int] = set()       # clients that hold experts (trained through the mixture)
        self.routers: dict[int, dict] = {}   # cluster -> averaged router (--fedlease-router-agg)

    def experts_spec(self):
        hp = self.hp
        return experts_spec(self.targets, self.M, self.r_global, hp.lora_alpha, hp.rslora, hp.fedlease_routing)

    def phase(self, client: Client) -> str:
        """warmup (t <= W), join (after W, not yet in a cluster) or mixture."""
        if client.round <= self.hp.fedlease_warmup:
            return "warmup"
        return "mixture" if client.id in self.assign else "join"

    # --- what travels ----------------------------------------------------------------------------
    def download(self, server, client, state):
        if self.phase(client) != "mixture" or (self.hp.reference_quirks and client.id not in self.started):
            return {}
        ex = server.module("experts")
        payload = {"experts": {str(m): self._expert(ex, m) for m in range(self.M)}}
        own = self.assign[client.id]
        if self.hp.fedlease_router_agg and own in self.routers:
            payload["router"] = {k: v.clone() for k, v in self.routers[own].items()}
        if self.hp.head == "shared":
            payload["head"] = self.head_of(server)
        return payload

    @staticmethod
    def _expert(ex, m: int) -> dict:
        return {"A": {k: ex.lora_A[k][m].weight.detach().clone() for k in ex.lora_A},
                "B": {k: ex.lora_B[k][m].weight.detach().clone() for k in ex.lora_B}}

    def upload(self, client):
        phase = self.phase(client)
        if phase == "warmup" and client.round < self.hp.fedlease_warmup:
            return {}
        if phase != "mixture":  # the LoRA for the clustering (round W) or for joining a cluster
            payload = self.factors_of(client, ("A", "B"))
            if phase == "warmup" and self.hp.head == "shared":
                payload["head"] = self.head_of(client)
            return payload
        ex = client.module("experts")
        own = self.assign[client.id]
        sent = range(self.M) if self.hp.fedlease_upload == "all" else (own,)
        payload = {"experts": {str(m): self._expert(ex, m) for m in sent}}
        if self.hp.fedlease_router_agg:
            payload["router"] = {k: r.weight.detach().clone() for k, r in ex.router.items()}
        if self.hp.head == "shared":
            payload["head"] = self.head_of(client)
        return payload

    @torch.no_grad()
    def install(self, party, payload: dict) -> None:
        """Strict, as the family's: every tensor lands in a parameter of the same shape."""
        rest = {p: v for p, v in payload.items() if p not in ("experts", "router")}
        if "experts" in payload or "router" in payload:
            ex = party.module("experts")
            for m, parts in payload.get("experts", {}).items():
                if not m.isdigit() or int(m) >= ex.experts:
                    raise KeyError(f"{self.name}: downloaded expert {m!r}; the client has {ex.experts}")
                for part, tensors in parts.items():
                    mods = {"A": ex.lora_A, "B": ex.lora_B}[part]
                    copy_strict(self.name, f"expert {m} {part}", {k: mods[k][int(m)].weight for k in mods},
                                tensors)
            if "router" in payload:
                copy_strict(self.name, "router", {k: r.weight for k, r in ex.router.items()}, payload["router"])
        super().install(party, rest)

    # --- local training --------------------------------------------------------------------------
    def forward(self, party, x):
        if isinstance(party, Client) and party.id in self.started:
            activate(self.layers, None)
            activate_experts(self.mix, party.module("experts"), self.assign[party.id])
        else:
            activate_experts(self.mix, None)
            activate(self.layers, party.module("lora"))
        return self.head(party)(party.backbone.features(x))

    def trainable(self, client):
        if client.id not in self.started:
            return super().trainable(client)
        params = list(client.module("experts").parameters())  # every expert's A, B and the router
        if self.hp.head != "frozen":
            params += list(client.module("head").parameters())
        return params

    def client_update(self, client, payload):
        if self.phase(client) == "mixture" and client.id not in self.started:
            self.started.add(client.id)
            if self.hp.reference_quirks:  # own warm-up LoRA as own expert; the others stay fresh
                lora = self.factors_of(client, ("A", "B"))
                self.install(client, {"experts": {str(self.assign[client.id]): lora}})
        self.install(client, payload)
        self.train(client)
        return self.upload(client)

    def _record_end(self, client):
        return None

    # --- server ----------------------------------------------------------------------------------
    @torch.no_grad()
    def server_update(self, server, uploads):
        t, w = server.round, self.hp.fedlease_warmup
        if t < w:
            return {}
        if t == w:
            self.cluster(server, uploads)
        else:
            self.join(server, [u for u in uploads if "experts" not in u.payload])
            self.aggregate(server, [u for u in uploads if "experts" in u.payload])
        heads = [u for u in uploads if "head" in u.payload]  # joiners send none
        if self.hp.head == "shared" and heads:
            ws = _renormalised(heads)
            self.average_heads(server, [Upload(u.client, w, u.payload) for u, w in zip(heads, ws, strict=True)])
        return {}

    def _count_distances(self, server, n_pairs: int, n_vectors: int) -> None:
        """Cosine distances: one dot product per pair and one norm per vector, per B matrix."""
        numel = sum(t.d_out * self.r_global for t in self.targets)
        server.count_macs((n_pairs + n_vectors) * numel)

    def cluster(self, server, uploads) -> None:
        ids = [u.client for u in uploads]
        Bs = [u.payload["B"] for u in uploads]
        d = b_distances(Bs)
        self._count_distances(server, len(ids) * (len(ids) - 1) // 2, len(ids))
        labels, self.M, score = choose_clusters(d, self.hp.fedlease_max_clusters)
        self.assign = dict(zip(ids, labels, strict=True))
        self.warm_B = dict(zip(ids, Bs, strict=True))
        server.own("experts", self.experts_spec())
        for c in self.clients:
            c.own("experts", self.experts_spec())
        ex = server.module("experts")
        for m in range(self.M):
            members = [u for u, lab in zip(uploads, labels, strict=True) if lab == m]
            ws = _renormalised(members)
            for t in self.targets:
                a, b = ex.factors(t.key, m)
                a.copy_(algebra.weighted_sum(ws, [u.payload["A"][t.key] for u in members]))
                b.copy_(algebra.weighted_sum(ws, [u.payload["B"][t.key] for u in members]))
        server.report("fedlease_clusters", self.M)
        if score is not None:
            server.report("fedlease_silhouette", score)

    def join(self, server, uploads) -> None:
        """Late joiners: the cluster whose members' warm-up B's are nearest on average."""
        if not uploads:
            return
        members = list(self.warm_B)
        for u in uploads:
            d = b_distances([u.payload["B"]] + [self.warm_B[c] for c in members])[0, 1:]
            self._count_distances(server, len(members), 1)
            mean = [d[[i for i, c in enumerate(members) if self.assign[c] == m]].mean()
                    if any(self.assign[c] == m for c in members) else np.inf for m in range(self.M)]
            self.assign[u.client] = int(np.argmin(mean))
        for u in uploads:
            self.warm_B[u.client] = u.payload["B"]
        server.report("fedlease_joined", len(uploads))

    def aggregate(self, server, uploads) -> None:
        """Expert m <- mean of expert m over this round's participants of cluster m; D_t per cluster."""
        if not uploads:
            return
        ex = server.module("experts")
        s = ex.scaling
        num = den = 0.0
        for m in range(self.M):
            members = [u for u in uploads if self.assign[u.client] == m]
            if not members:
                continue
            ws = _renormalised(members)
            n_m = d_m = 0.0
            for t in self.targets:
                As = [u.payload["experts"][str(m)]["A"][t.key] for u in members]
                Bs = [u.payload["experts"][str(m)]["B"][t.key] for u in members]
                start = ex.delta(t.key, m).double()
                ideal = algebra.ideal_update(ws, [a.double() for a in As], [b.double() for b in Bs],
                                             [s] * len(ws), server.count_macs)
                a, b = ex.factors(t.key, m)
                a.copy_(algebra.weighted_sum(ws, As))
                b.copy_(algebra.weighted_sum(ws, Bs))
                n_m += algebra.frob2(ex.delta(t.key, m).double() - ideal)
                d_m += algebra.frob2(ideal - start)
            if self.hp.fedlease_router_agg:
                self.routers[m] = {k: algebra.weighted_sum(ws, [u.payload["router"][k] for u in members])
                                   for k in members[0].payload["router"]}
            server.report(f"agg_deviation_c{m}", (n_m / d_m) ** 0.5 if d_m > 0 else 0.0)
            num, den = num + n_m, den + d_m
        server.report("agg_deviation_abs", num ** 0.5)
        server.report("agg_deviation", (num / den) ** 0.5 if den > 0 else 0.0)


def _renormalised(uploads) -> list[float]:
    total = sum(u.weight for u in uploads)
    return [u.weight / total for u in uploads]
