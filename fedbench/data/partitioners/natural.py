"""``natural``: the dataset's own clients (shakespeare's (play, role) pairs), made by the dataset's loader."""

from __future__ import annotations

from dataclasses import dataclass

from fedbench.data.partition import Partitioner, register_partitioner
from fedbench.errors import ConfigError


@register_partitioner("natural")
@dataclass(frozen=True)
class NaturalPartitioner(Partitioner):
    """No split to draw: a naturally partitioned dataset brings its clients (``fedbench/data/shakespeare.py``)."""

    about = "the dataset's own clients (shakespeare: (play, role))"

    def split(self, labels, num_classes, num_clients, rng):
        raise ConfigError("--partition natural is the own client split of a naturally partitioned dataset "
                          "(shakespeare); image datasets need pathological, dirichlet or iid")
