"""``quantity-skew``: every split shuffled and cut at Dirichlet(alpha) proportions (a plugin partitioner in
one file; its parameter is the run option --alpha)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedbench.data.partition import SPLITS, Partitioner


@dataclass(frozen=True)
class QuantitySkewPartitioner(Partitioner):
    alpha: float = 0.1
    about = "client sizes from Dirichlet(alpha), labels uniform"

    def split(self, labels, num_classes, num_clients, rng):
        q = rng.dirichlet(np.full(num_clients, self.alpha))
        out = {}
        for split in SPLITS:
            perm = rng.permutation(len(labels[split]))
            cuts = (np.cumsum(q)[:-1] * len(perm)).astype(np.int64)
            out[split] = [np.sort(p) for p in np.split(perm, cuts)]
        return out
