"""``iid``: every split shuffled and cut into near-equal consecutive pieces, one a client."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedbench.data.partition import SPLITS, Partitioner, register_partitioner


@register_partitioner("iid")
@dataclass(frozen=True)
class IidPartitioner(Partitioner):
    """Uniform random split: a permutation of each split (train, val, test in turn) cut by ``np.array_split``."""

    about = "uniform random split, near-equal sizes"

    def split(self, labels, num_classes, num_clients, rng):
        out = {}
        for split in SPLITS:
            perm = rng.permutation(len(labels[split]))
            out[split] = [np.sort(p) for p in np.array_split(perm, num_clients)]
        return out
