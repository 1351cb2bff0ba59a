"""``dirichlet``: label-first Dirichlet(``alpha``) class proportions over clients (PFLlib/NIID-Bench style)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedbench.data.partition import SharePartitioner, register_partitioner
from fedbench.errors import ConfigError


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


@register_partitioner("dirichlet")
@dataclass(frozen=True)
class DirichletPartitioner(SharePartitioner):
    """Dirichlet(``alpha``) proportions per class, redrawn until every client holds ``min_size`` samples."""

    alpha: float = 0.1
    min_size: int = 10
    about = "Dirichlet(alpha) class proportions, every client >= min-size samples (PFLlib/NIID-Bench)"

    def shares(self, train_labels, num_classes, num_clients, rng):
        return dirichlet_shares(train_labels, num_classes, num_clients, self.alpha, self.min_size, rng)
