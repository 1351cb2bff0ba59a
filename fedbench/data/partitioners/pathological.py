"""``pathological``: each client holds ``classes_per_client`` classes (the pFedHN-style split of the pFedLoRA
authors)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedbench.data.partition import SharePartitioner, register_partitioner
from fedbench.errors import ConfigError


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


@register_partitioner("pathological")
@dataclass(frozen=True)
class PathologicalPartitioner(SharePartitioner):
    """``classes_per_client`` classes a client, with U(``share_low``, ``share_high``) shares of each class."""

    classes_per_client: int = 2
    share_low: float = 0.4
    share_high: float = 0.6
    about = "classes-per-client classes a client, U(share-low, 0.6) shares of each (pFedLoRA authors)"

    def check(self, num_classes: int, dataset: str) -> None:
        if self.classes_per_client > num_classes:
            raise ConfigError(f"--classes-per-client {self.classes_per_client} exceeds the {num_classes} classes "
                              f"of {dataset}")

    def shares(self, train_labels, num_classes, num_clients, rng):
        return pathological_shares(num_classes, num_clients, self.classes_per_client, rng, self.share_low,
                                   self.share_high)
