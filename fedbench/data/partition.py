"""Partitions, and the registry of the partitioners that make them.

A partitioner is one small class owning its parameters (a dataclass, as flwr-datasets' partitioners),
registered by name with ``@register_partitioner("name")`` in one file (the core's live in
``fedbench/data/partitioners/``), or by a separate package through entry points in group
``fedbench.partitioners``. Its parameters are run options of the same names (``--alpha``,
``--classes-per-client``, ...): ``from_config`` reads them, so they are part of the run's identity.

The image partitioners look at the *training* labels to decide who gets what, then apply the same
class-to-client map to the validation and test splits, so that a client's test data follows its
training distribution (as the pFedLoRA authors' split does). Every partitioner is deterministic in the
numpy Generator it is given, and draws every random number from it.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
from dataclasses import dataclass

import numpy as np

from fedbench.errors import ConfigError
from fedbench.plugins import Names, Registry

SPLITS = ("train", "val", "test")
PARTITIONER_REGISTRY = Registry("partition", "fedbench.partitioners", core=("fedbench.data.partitioners",))
PARTITIONERS = Names(PARTITIONER_REGISTRY)  # the names, listed when asked (plugins included)


@dataclass
class Partition:
    """Per-client sample indices into each split's arrays."""

    indices: dict[str, list[np.ndarray]]  # split -> one int64 array per client
    num_classes: int

    @property
    def num_clients(self) -> int:
        """How many clients the partition has."""
        return len(self.indices["train"])

    def class_counts(self, labels: np.ndarray, split: str = "train") -> np.ndarray:
        """(clients, classes) matrix of sample counts in ``split``."""
        return np.stack([np.bincount(labels[ix], minlength=self.num_classes) for ix in self.indices[split]])

    def sizes(self, split: str) -> np.ndarray:
        """Samples per client in ``split``."""
        return np.array([len(ix) for ix in self.indices[split]], dtype=np.int64)

    def digest(self) -> str:
        """sha256 of every client's index array of every split, first 16 hex digits."""
        h = hashlib.sha256()
        for split in SPLITS:
            for ix in self.indices[split]:
                h.update(np.int64(len(ix)).tobytes())
                h.update(np.ascontiguousarray(ix, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


def by_class(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Indices of each class, shuffled (labels and indices stay together: we only permute indices)."""
    out = []
    for c in range(num_classes):
        ix = np.flatnonzero(labels == c)
        rng.shuffle(ix)
        out.append(ix)
    return out


def cut_by_shares(labels: np.ndarray, num_classes: int, shares: np.ndarray, rng) -> list[np.ndarray]:
    """Give client j floor(shares[j, c] * n_c) samples of class c, disjoint slices of a shuffled class."""
    n_clients = shares.shape[0]
    parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
    for c, ix in enumerate(by_class(labels, num_classes, rng)):
        sizes = np.floor(shares[:, c] * len(ix) + 1e-9).astype(np.int64)
        start = 0
        for j in np.flatnonzero(sizes):
            parts[j].append(ix[start:start + sizes[j]])
            start += sizes[j]
    return [np.sort(np.concatenate(p)) if p else np.empty(0, np.int64) for p in parts]


class Partitioner(abc.ABC):
    """Splits labelled samples among clients. Subclasses are dataclasses whose fields are the partitioner's
    parameters, each the run option of the same name (with the option's default)."""

    about = ""  # one line for `fedbench list partitions`

    @classmethod
    def parameters(cls) -> tuple[str, ...]:
        """The names of its parameters (the run options it reads)."""
        return tuple(f.name for f in dataclasses.fields(cls)) if dataclasses.is_dataclass(cls) else ()

    @classmethod
    def from_config(cls, cfg) -> Partitioner:
        """The partitioner with the run's values of its parameters (a parameter the run lacks keeps its default)."""
        return cls(**{k: getattr(cfg, k) for k in cls.parameters() if hasattr(cfg, k)})

    def check(self, num_classes: int, dataset: str) -> None:
        """Raise ``ConfigError`` on parameters that cannot split a ``num_classes``-class dataset (before any work);
        by default every value is fine."""
        return None

    @abc.abstractmethod
    def split(self, labels: dict[str, np.ndarray], num_classes: int, num_clients: int,
              rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
        """Per split ("train", "val", "test"), one sorted int64 index array per client."""

    def partition(self, labels: dict[str, np.ndarray], num_classes: int, num_clients: int,
                  rng: np.random.Generator) -> Partition:
        """The ``Partition`` of ``labels`` ({"train": y, "val": y, "test": y}); no client without training data."""
        n_train = len(labels["train"])
        if num_clients > n_train:
            raise ConfigError(f"--clients {num_clients} exceeds the {n_train} training samples")
        part = Partition(self.split(labels, num_classes, num_clients, rng), num_classes)
        small = np.flatnonzero(part.sizes("train") == 0)
        if small.size:
            raise ConfigError(f"partition left client {small[0]} without training samples "
                              f"({num_clients} clients is too many for this dataset and partition)")
        return part


class SharePartitioner(Partitioner):
    """A partitioner that draws one (clients, classes) share matrix from the training labels and cuts every
    split by it (client j gets floor(share[j, c] * n_c) samples of class c of each split)."""

    @abc.abstractmethod
    def shares(self, train_labels: np.ndarray, num_classes: int, num_clients: int,
               rng: np.random.Generator) -> np.ndarray:
        """The (clients, classes) share matrix: client j gets share[j, c] of class c of every split."""

    def split(self, labels, num_classes, num_clients, rng):
        """Every split cut by the one share matrix drawn from the training labels."""
        shares = self.shares(labels["train"], num_classes, num_clients, rng)
        return {s: cut_by_shares(labels[s], num_classes, shares, rng) for s in SPLITS}


def register_partitioner(name: str):
    """Class decorator: register a ``Partitioner`` subclass under ``name``."""
    return PARTITIONER_REGISTRY.register(name)


def partitioner_class(name: str) -> type[Partitioner]:
    """The partitioner class registered as ``name``; ``ConfigError`` naming the choices otherwise."""
    return PARTITIONER_REGISTRY.get(name)


def partitioner_for(cfg) -> Partitioner:
    """The partitioner of a run config, with the run's parameters."""
    return partitioner_class(cfg.partition).from_config(cfg)


def make_partition(kind: str, labels: dict[str, np.ndarray], num_classes: int, num_clients: int,
                   rng: np.random.Generator, **params) -> Partition:
    """Partition every split of ``labels`` among clients with partitioner ``kind``; ``params`` not among its
    parameters are ignored (so one set of run options serves every partitioner)."""
    cls = partitioner_class(kind)
    return cls(**{k: v for k, v in params.items() if k in cls.parameters()}).partition(
        labels, num_classes, num_clients, rng)
