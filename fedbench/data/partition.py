"""Seeded partitioners: one class-to-client map applied to every split.

Each partitioner looks at the *training* labels to decide who gets what, then applies the same
map to the validation and test splits, so that a client's test data follows its training
distribution (spec A.3). Every partitioner is deterministic in its numpy Generator.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from fedbench.errors import ConfigError, choice_error

SPLITS = ("train", "val", "test")
PARTITIONERS = ("pathological", "dirichlet", "iid", "natural")  # natural: the dataset's own clients


@dataclass
class Partition:
    """Per-client sample indices into each split's arrays."""

    indices: dict[str, list[np.ndarray]]  # split -> one int64 array per client
    num_classes: int

    @property
    def num_clients(self) -> int:
        return len(self.indices["train"])

    def class_counts(self, labels: np.ndarray, split: str = "train") -> np.ndarray:
        """(clients, classes) matrix of sample counts in ``split``."""
        return np.stack([np.bincount(labels[ix], minlength=self.num_classes) for ix in self.indices[split]])

    def sizes(self, split: str) -> np.ndarray:
        return np.array([len(ix) for ix in self.indices[split]], dtype=np.int64)

    def digest(self) -> str:
        h = hashlib.sha256()
        for split in SPLITS:
            for ix in self.indices[split]:
                h.update(np.int64(len(ix)).tobytes())
                h.update(np.ascontiguousarray(ix, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


def _by_class(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Indices of each class, shuffled (labels and indices stay together: we only permute indices)."""
    out = []
    for c in range(num_classes):
        ix = np.flatnonzero(labels == c)
        rng.shuffle(ix)
        out.append(ix)
    return out


def _cut_by_shares(labels: np.ndarray, num_classes: int, shares: np.ndarray, rng) -> list[np.ndarray]:
    """Give client j floor(shares[j, c] * n_c) samples of class c, disjoint slices of a shuffled class."""
    n_clients = shares.shape[0]
    parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for c, ix in enumerate(_by_class(labels, num_classes, rng)):
        sizes = np.floor(shares[:, c] * len(ix) + 1e-9).astype(np.int64)
        start = 0
        for j in np.flatnonzero(sizes):
            parts[j].append(ix[start:start + sizes[j]])
            start += sizes[j]
    return [np.sort(np.concatenate(p)) if p else np.empty(0, np.int64) for p in parts]


def pathological_shares(num_classes: int, num_clients: int, classes_per_client: int,
                        rng: np.random.Generator, low: float = 0.4, high: float = 0.6,
                        max_tries: int = 100) -> np.ndarray:
    """(clients, classes) share matrix of the pFedHN-style split used by the pFedLoRA authors.

    Every class goes to m*N/K clients with U(low, high) weights normalised per class; clients pick,
    m times each, a class with the most remaining slots (random tie-break) that they do not hold yet.
    """
    K, N, m = num_classes, num_clients, classes_per_client
    if m < 1 or m > K:
        raise ConfigError(f"--classes-per-client must be in [1, {K}] for {K} classes, got {m}")
    if (m * N) % K:
        raise ConfigError(f"pathological partition needs classes-per-client x clients divisible by the class "
                          f"count: {m} x {N} = {m * N} is not a multiple of {K}")
    count = m * N // K
    for _ in range(max_tries):
        weights = rng.uniform(low, high, size=(K, count))
        weights /= weights.sum(axis=1, keepdims=True)
        slots = np.full(K, count)
        shares = np.zeros((N, K))
        ok = True
        for j in range(N):
            for _ in range(m):
                free = np.flatnonzero((slots > 0) & (shares[j] == 0))
                if free.size == 0:
                    ok = False
                    break
                best = free[slots[free] == slots[free].max()]
                c = rng.choice(best)
                shares[j, c] = weights[c, count - slots[c]]
                slots[c] -= 1
            if not ok:
                break
        if ok:
            return shares
    raise ConfigError(f"pathological partition found no assignment without repeated classes for "
                      f"{N} clients x {m} classes in {max_tries} tries")


def dirichlet_shares(train_labels: np.ndarray, num_classes: int, num_clients: int, alpha: float,
                     min_size: int, rng: np.random.Generator, max_tries: int = 200) -> np.ndarray:
    """Label-first Dirichlet split (PFLlib/NIID-Bench style), with a bounded redraw loop.

    Returns the realised (clients, classes) share matrix: count[j, c] / n_c on the training split.
    """
    K, N = num_classes, num_clients
    n_total = len(train_labels)
    by_class = [np.flatnonzero(train_labels == c) for c in range(K)]
    for _ in range(max_tries):
        counts = np.zeros((N, K), dtype=np.int64)
        for c in range(K):
            n_c = len(by_class[c])
            q = rng.dirichlet(np.full(N, alpha))
            q = q * (counts.sum(axis=1) < n_total / N)  # clients already over the mean take no more
            if q.sum() <= 0:
                q = np.full(N, 1.0 / N)
            q = q / q.sum()
            cuts = (np.cumsum(q) * n_c).astype(np.int64)[:-1]
            counts[:, c] = np.diff(np.concatenate([[0], cuts, [n_c]]))
        if counts.sum(axis=1).min() >= min_size:
            sizes = np.array([max(len(b), 1) for b in by_class])
            return counts / sizes
    raise ConfigError(f"dirichlet partition: no split with every client holding >= {min_size} samples after "
                      f"{max_tries} draws (alpha={alpha}, clients={N}, min-size={min_size}); raise --alpha, "
                      f"lower --min-size or use fewer clients")


def make_partition(kind: str, labels: dict[str, np.ndarray], num_classes: int, num_clients: int,
                   rng: np.random.Generator, *, classes_per_client: int = 2, alpha: float = 0.1,
                   min_size: int = 10, share_low: float = 0.4, share_high: float = 0.6) -> Partition:
    """Partition every split of ``labels`` ({"train": y, "val": y, "test": y}) among clients."""
    if kind not in PARTITIONERS:
        raise choice_error("partition", kind, PARTITIONERS)
    if kind == "natural":
        raise ConfigError("--partition natural is the own client split of a naturally partitioned dataset "
                          "(shakespeare); image datasets need pathological, dirichlet or iid")
    n_train = len(labels["train"])
    if num_clients > n_train:
        raise ConfigError(f"--clients {num_clients} exceeds the {n_train} training samples")
    if kind == "iid":
        out = {}
        for split in SPLITS:
            perm = rng.permutation(len(labels[split]))
            out[split] = [np.sort(p) for p in np.array_split(perm, num_clients)]
        part = Partition(out, num_classes)
    else:
        if kind == "pathological":
            shares = pathological_shares(num_classes, num_clients, classes_per_client, rng, share_low, share_high)
        else:
            shares = dirichlet_shares(labels["train"], num_classes, num_clients, alpha, min_size, rng)
        part = Partition({s: _cut_by_shares(labels[s], num_classes, shares, rng) for s in SPLITS}, num_classes)
    small = np.flatnonzero(part.sizes("train") == 0)
    if small.size:
        raise ConfigError(f"partition left client {small[0]} without training samples "
                          f"({num_clients} clients is too many for this dataset and partition)")
    return part
