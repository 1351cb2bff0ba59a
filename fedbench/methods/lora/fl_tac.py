"""FL-TAC, task-specific adapters clustered on the server (Ping et al., arXiv 2404.15384; spec §3.17).

    client i: one LoRA adapter v_ij per local task j; load each; train each on its task's data;
              send every v_ij (A, B) with its sample count n_ij                    P(r) per local task up
    server:   flatten every received adapter; K-means, K = number of tasks (10 seeded initialisations,
              lowest inertia); in cluster k: v_k = sum n_ij v_ij / sum n_ij (factor by factor)
    download: each submission gets its cluster's v_k back (a task never submitted: the common start)
                                                                                   P(r) per local task down
The clustering never sees a task id; the true ids give only the reported ``fltac_cluster_acc``
(Hungarian-matched share of submissions whose cluster is their task's, scipy's linear_sum_assignment).
``fltac_factor_error`` is FedIT's factor error inside the clusters (the within-cluster average is FedIT),
``fltac_clusters`` the number of clusters formed (K, or fewer submissions than K: one cluster each).
D_t per cluster, ``agg_deviation_c{k}`` (k the K-means label of the round):
||s B̄_k Ā_k - sum_i w_i s B_i A_i||_F / ||sum_i w_i s (B_i A_i - B_i^0 A_i^0)||_F over the cluster's
submissions i (w_i their sample-count weights, B_i^0 A_i^0 the adapter the submission downloaded), all
adapted matrices together; ``agg_deviation`` / ``agg_deviation_abs`` pool every cluster's (the numerator
is FedIT's factor error inside the clusters: ``agg_deviation_abs`` = ``fltac_factor_error``).

The multi-task setting is fedbench's [reconstruction] of the paper's (GLUE tasks / datasets as tasks) on
one classification dataset: ``--tasks K`` splits the classes into K contiguous groups (np.array_split of
0..C-1: with 10 classes and K = 2, 0-4 and 5-9); a client's task-j data are its training samples whose
label is in group j; it holds task j, and trains an adapter for it, when it has at least
``--fltac-min-samples`` of them (and always its largest task). Every local step takes one batch of the
client's data and splits it by task: each held task's adapter (and head) takes a step on its part; the
samples of tasks it does not hold are not trained on (the engine's trained-sample count still has them).

Heads (``--head``): one per task, travelling with its adapter and averaged in its cluster (shared), kept
per task on the client (local), or the one seeded random head for everything (frozen; as the reference's
CIFAR run, whose classifier peft leaves frozen). Only the LoRA factors are clustered (as the reference).

Evaluation is task-agnostic: ``predict`` gets only x (no label, so no task id), so the adapter is chosen
per sample without it: ``--fltac-infer confidence`` takes the logits of the adapter whose softmax has the
highest maximum, ``ensemble`` the log of the mean softmax of all adapters. A client uses its held tasks'
adapters; the global model (union test split) is the K cluster adapters of the last round, combined the
same way (undefined with --head local).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedbench.errors import ConfigError
from fedbench.hparams import hparam
from fedbench.lora import algebra
from fedbench.lora.layers import activate
from fedbench.metering.algebra import product_macs
from fedbench.methods.lora_family import FederatedLoRA, LoRAParams, copy_strict, report_deviation_parts
from fedbench.registry import register_method
from fedbench.seeding import derive

INFER = ("confidence", "ensemble")


# --- K-means and its accuracy (pure functions, float64-testable) ---------------------------------------

def kmeans(x: torch.Tensor, k: int, n_init: int = 10, seed: int = 0, max_iter: int = 100,
           count=None) -> tuple[torch.Tensor, float]:
    """Lloyd's K-means of the rows of x (M x D) with k-means++ starts; the best (lowest inertia) of
    ``n_init`` seeded runs: (labels (M,), inertia). An emptied cluster is re-seeded with the point
    farthest from its centre. ``count`` receives the MACs of the distance products."""
    m = x.shape[0]
    if not 1 <= k <= m:
        raise ValueError(f"kmeans: k = {k} needs 1 <= k <= {m} points")
    g = torch.Generator().manual_seed(seed)
    sq = x.square().sum(1)
    best, best_inertia = None, float("inf")
    for _ in range(n_init):
        centres = [x[int(torch.randint(m, (1,), generator=g))]]
        for _ in range(1, k):  # k-means++: the next centre with probability proportional to D(x)^2
            d2 = torch.stack([(x - c).square().sum(1) for c in centres]).min(0).values
            if count is not None:
                count(m * x.shape[1] * len(centres))
            p = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / m)
            centres.append(x[int(torch.multinomial(p, 1, generator=g))])
        c = torch.stack(centres)
        labels = None
        for _ in range(max_iter):
            d2 = (sq[:, None] - 2 * x @ c.T + c.square().sum(1)[None, :]).clamp_min(0)
            if count is not None:
                count(product_macs(m, x.shape[1], k))
            new = d2.argmin(1)
            if labels is not None and torch.equal(new, labels):
                break
            labels = new
            for j in range(k):
                members = labels == j
                if members.any():
                    c[j] = x[members].mean(0)
                else:  # re-seed with the point farthest from its own centre
                    far = int(d2.gather(1, labels[:, None]).squeeze(1).argmax())
                    c[j] = x[far]
                    labels[far] = j
        inertia = float((x - c[labels]).square().sum())
        if inertia < best_inertia:
            best, best_inertia = labels.clone(), inertia
    return best, best_inertia


def clustering_accuracy(labels, truth) -> float:
    """Share of points whose cluster is matched to their true group, under the best one-to-one matching
    of clusters to groups (Hungarian, on the confusion counts)."""
    from scipy.optimize import linear_sum_assignment
    labels, truth = np.asarray(labels), np.asarray(truth)
    if labels.size == 0:
        return 0.0
    _, li = np.unique(labels, return_inverse=True)
    _, ti = np.unique(truth, return_inverse=True)
    size = max(li.max(), ti.max()) + 1
    counts = np.zeros((size, size), dtype=np.int64)
    np.add.at(counts, (li, ti), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum()) / labels.size


def task_groups(num_classes: int, tasks: int) -> torch.Tensor:
    """Task id of each class: K contiguous groups of 0..C-1 (np.array_split)."""
    out = torch.empty(num_classes, dtype=torch.int64)
    for j, group in enumerate(np.array_split(np.arange(num_classes), tasks)):
        out[torch.as_tensor(group)] = j
    return out


def effective(adapter: dict, key: str, s: float) -> torch.Tensor:
    """s B A of one adapter's target ``key`` ({"A": {key: ...}, "B": {key: ...}}), float64, matrix form."""
    return s * (algebra.as_matrix(adapter["B"][key]).double() @ algebra.as_matrix(adapter["A"][key]).double())


def combine(logits: list[torch.Tensor], rule: str) -> torch.Tensor:
    """One logit row per sample from several adapters' logits, without the label: the most confident
    adapter's (max softmax) or the log of the mean softmax."""
    if len(logits) == 1:
        return logits[0]
    stacked = torch.stack(logits)                         # adapters x batch x classes
    probs = stacked.float().softmax(-1)
    if rule == "ensemble":
        return probs.mean(0).clamp_min(1e-30).log()
    pick = probs.max(-1).values.argmax(0)                 # batch: the most confident adapter
    return stacked.gather(0, pick[None, :, None].expand(1, *stacked.shape[1:])).squeeze(0)


@register_method("fl-tac")
class FLTAC(FederatedLoRA):
    code = "siqi2000/FL-TAC"
    paper = "Ping et al., FL-TAC: Enhanced Fine-Tuning in Federated Learning via Low-Rank, Task-Specific " \
            "Adapter Clustering, arXiv 2404.15384"

    @dataclass
    class Params(LoRAParams):
        tasks: int = hparam(2, "number of tasks K (= K-means clusters): the classes split into K contiguous "
                               "groups, a client's task-j data its samples with a label in group j", low=1,
                            marker="reconstruction")
        fltac_min_samples: int = hparam(16, "a client trains an adapter for each task it has at least this many "
                                            "training samples of (and always its largest task)", low=1,
                                        marker="reconstruction")
        fltac_infer: str = hparam("confidence", "task-agnostic inference (no label at test time): confidence "
                                                "(the adapter with the highest max-softmax) or ensemble (mean "
                                                "softmax of the adapters)", choices=INFER, marker="reconstruction")
        fltac_kmeans_init: int = hparam(10, "K-means initialisations (seeded k-means++; the lowest inertia wins)",
                                        low=1)

    @classmethod
    def display_name(cls) -> str:
        return "FL-TAC"

    @classmethod
    def label(cls, p) -> str:
        return super().label(p)[:-1] + f", tasks={p.tasks}, infer={p.fltac_infer})"

    @classmethod
    def check_config(cls, p, cfg) -> None:
        super().check_config(p, cfg)
        if p.tasks > cfg.num_classes:
            raise ConfigError(f"--tasks {p.tasks}: the dataset {cfg.dataset} has {cfg.num_classes} classes; "
                              f"choose 1..{cfg.num_classes} tasks (groups of classes)")

    # --- set-up: the multi-task split ------------------------------------------------------------
    def setup(self, server, clients):
        super().setup(server, clients)
        self.task_of_class = task_groups(self.run.num_classes, self.hp.tasks)
        self.counts: list[torch.Tensor] = []   # client -> samples per task
        self.held: list[list[int]] = []        # client -> its tasks, in slot order
        for c in clients:
            n = torch.zeros(self.hp.tasks, dtype=torch.int64).index_add_(0, self.task_of_class, c.label_counts)
            held = [j for j in range(self.hp.tasks) if n[j] >= self.hp.fltac_min_samples] or [int(n.argmax())]
            self.counts.append(n)
            self.held.append(held)
        self.assigned: dict[tuple[int, int], dict] = {}  # (client, slot) -> its cluster's adapter
        self.clusters: list[dict] = []                    # the last round's cluster adapters

    def client_init(self, client):
        for j in self.held[client.id]:
            client.own(f"lora_t{j}", self.spec(self.ranks[client.id]))
            if self.hp.head != "frozen":
                client.own(f"head_t{j}", self.head_spec())

    def server_init(self, server):
        state = super().server_init(server)  # "lora", "head": the common start of every task's adapter
        self.start = self.factors_of(server, ("A", "B"))
        if self.hp.head == "shared":
            self.start["head"] = self.head_of(server)
        return state

    # --- what travels ----------------------------------------------------------------------------
    def download(self, server, client, state):
        return {str(s): self.assigned.get((client.id, s), self.start) for s in range(len(self.held[client.id]))}

    def upload(self, client):
        payload = {}
        for s, j in enumerate(self.held[client.id]):
            ad = client.module(f"lora_t{j}")
            part = {"A": {k: m.weight.detach().clone() for k, m in ad.lora_A.items()},
                    "B": {k: m.weight.detach().clone() for k, m in ad.lora_B.items()},
                    "n": torch.tensor([float(self.counts[client.id][j])])}
            if self.hp.head == "shared":
                part["head"] = self.head_of_task(client, j)
            payload[str(s)] = part
        return payload

    def head_of_task(self, client, j: int) -> dict:
        return {k: v.detach().clone() for k, v in client.module(f"head_t{j}").named_parameters()}

    @torch.no_grad()
    def install(self, party, payload):
        """Strict: every slot is one of the client's tasks and every tensor lands in a parameter of its shape."""
        held = self.held[party.id]
        for slot, parts in payload.items():
            if not slot.isdigit() or int(slot) >= len(held):
                raise KeyError(f"{self.name}: download slot {slot!r}; client {party.id} has {len(held)} tasks")
            j = held[int(slot)]
            for part, tensors in parts.items():
                if part in ("A", "B"):
                    ad = party.module(f"lora_t{j}")
                    targets = {k: m.weight for k, m in (ad.lora_A if part == "A" else ad.lora_B).items()}
                elif part == "head" and self.hp.head == "shared":
                    targets = dict(party.module(f"head_t{j}").named_parameters())
                else:
                    raise KeyError(f"{self.name}: download part {part!r} has no place on the client")
                copy_strict(self.name, part, targets, tensors)

    # --- local training --------------------------------------------------------------------------
    def task_head(self, party, j: int):
        return party.module(f"head_t{j}") if self.hp.head != "frozen" else self.server.module("head")

    def forward_task(self, party, j: int, x: torch.Tensor) -> torch.Tensor:
        activate(self.layers, party.module(f"lora_t{j}"))
        return self.task_head(party, j)(party.backbone.features(x))

    def train(self, client):
        opts = {}
        for j in self.held[client.id]:
            params = list(client.module(f"lora_t{j}").parameters())
            if self.hp.head != "frozen":
                params += list(client.module(f"head_t{j}").parameters())
            opts[j] = client.optimizer(params)
        for x, y in client.batches(self.run.epochs):
            task = self.task_of_class.to(y.device)[y]
            for j, opt in opts.items():
                mask = task == j
                if bool(mask.any()):
                    client.step(opt, F.cross_entropy(self.forward_task(client, j, x[mask]), y[mask]))

    def client_update(self, client, payload):
        self.install(client, payload)
        self.train(client)
        return self.upload(client)

    # --- server ----------------------------------------------------------------------------------
    @torch.no_grad()
    def server_update(self, server, uploads):
        subs = [(u.client, int(s), part) for u in uploads for s, part in u.payload.items()]
        if not subs:
            return {}
        keys = [t.key for t in self.targets]
        x = torch.stack([torch.cat([part[f][k].double().flatten() for f in ("A", "B") for k in keys])
                         for _, _, part in subs])
        k = min(self.hp.tasks, len(subs))
        labels, _ = kmeans(x, k, self.hp.fltac_kmeans_init, derive(self.run.seed, "fltac-kmeans", server.round),
                           count=server.count_macs)
        s = server.module("lora").scaling
        starts = [self.assigned.get((cid, slot), self.start) for cid, slot, _ in subs]  # what each downloaded
        self.clusters, err, num, den = [], 0.0, 0.0, 0.0
        for c in range(k):
            members = [i for i in range(len(subs)) if int(labels[i]) == c]
            ns = [float(subs[i][2]["n"]) for i in members]
            ws = [n / sum(ns) for n in ns]
            agg = {f: {key: algebra.weighted_sum(ws, [subs[i][2][f][key] for i in members]) for key in keys}
                   for f in ("A", "B")}
            n_c = d_c = 0.0
            for key in keys:
                err += algebra.frob2(algebra.fedit_error(ws, [subs[i][2]["A"][key].double() for i in members],
                                                         [subs[i][2]["B"][key].double() for i in members], s))
                n, d = algebra.deviation_parts(ws, [effective(subs[i][2], key, s) for i in members],
                                               [effective(starts[i], key, s) for i in members],
                                               effective(agg, key, s))
                n_c, d_c = n_c + n, d_c + d
            report_deviation_parts(server, f"agg_deviation_c{c}", n_c, d_c)
            num, den = num + n_c, den + d_c
            if self.hp.head == "shared":
                agg["head"] = {p: algebra.weighted_sum(ws, [subs[i][2]["head"][p] for i in members])
                               for p in subs[members[0]][2]["head"]}
            self.clusters.append(agg)
            for i in members:
                self.assigned[(subs[i][0], subs[i][1])] = agg
        truth = [self.held[cid][slot] for cid, slot, _ in subs]  # for the metric only
        server.report("fltac_cluster_acc", clustering_accuracy(labels.tolist(), truth))
        server.report("fltac_clusters", float(k))
        server.report("fltac_factor_error", err ** 0.5)
        report_deviation_parts(server, "agg_deviation", num, den)
        return {}

    # --- evaluation (task-agnostic) --------------------------------------------------------------
    def predict(self, client, x):
        return combine([self.forward_task(client, j, x) for j in self.held[client.id]], self.hp.fltac_infer)

    @torch.no_grad()
    def global_predict(self, server, x):
        if self.hp.head == "local" or not self.clusters:
            return None
        logits = []
        for agg in self.clusters:  # the server's "lora" (and shared "head") as the workspace of cluster k
            super().install(server, agg)
            activate(self.layers, server.module("lora"))
            logits.append(server.module("head")(server.backbone.features(x)))
        return combine(logits, self.hp.fltac_infer)
