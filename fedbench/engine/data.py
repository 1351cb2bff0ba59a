"""Federated data on the training device: one uint8 tensor, clients hold index tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedbench.data.partition import SPLITS, Partition, partitioner_for
from fedbench.data.sources import Arrays
from fedbench.data.transforms import BatchTransform
from fedbench.errors import ConfigError
from fedbench.seeding import numpy_rng


@dataclass
class FederatedData:
    images: torch.Tensor                 # uint8 (n_train + n_test, 32, 32, 3) on device
    labels: torch.Tensor                 # int64 on device
    index: dict[str, list[torch.Tensor]]  # split -> per-client indices into images (device tensors)
    partition: Partition
    split_labels: dict[str, np.ndarray]  # host labels per split (for tables)
    transform: BatchTransform
    num_classes: int

    def sizes(self, split: str) -> np.ndarray:
        return self.partition.sizes(split)


def split_rows(arrays: Arrays, cfg) -> tuple[dict[str, np.ndarray], Partition]:
    """The host side of the data: the rows of each split and the partition, positions into those rows.

    Rows are indices into the dataset's own arrays: train and val into x_train (the seeded validation
    hold-out and the training pool, both ascending), test into x_test. A config naming an imported
    partition (``partition_digest``) takes both from that partition file (fedbench/data/partition_file.py).
    """
    if getattr(cfg, "partition_digest", ""):
        from fedbench.data.partition_file import lookup
        pf = lookup(cfg.partition_digest)
        if pf.num_clients != cfg.clients:
            raise ConfigError(f"partition file {pf.source} has {pf.num_clients} clients, the run --clients {cfg.clients}")
        return pf.rows_and_partition(arrays, arrays.info.num_classes)
    n = len(arrays.y_train)
    perm = numpy_rng(cfg.seed, "val-split").permutation(n)
    n_val = int(round(cfg.val_fraction * n))
    rows = {"train": np.sort(perm[n_val:]), "val": np.sort(perm[:n_val]), "test": np.arange(len(arrays.y_test))}
    y = {"train": arrays.y_train, "val": arrays.y_train, "test": arrays.y_test}
    split_labels = {s: y[s][rows[s]] for s in SPLITS}
    part = partitioner_for(cfg).partition(split_labels, arrays.info.num_classes, cfg.clients,
                                          numpy_rng(cfg.seed, "partition"))
    return rows, part


def build_federated_data(arrays: Arrays, cfg, device: torch.device) -> FederatedData:
    """Hold out validation (seeded), partition train/val/test with one map, move to the device."""
    rows, part = split_rows(arrays, cfg)
    n = len(arrays.y_train)
    # positions in the one device tensor: [x_train (all 50k) | x_test]
    offsets = {"train": rows["train"], "val": rows["val"], "test": rows["test"] + n}
    y_all = np.concatenate([arrays.y_train, arrays.y_test])
    split_labels = {s: y_all[offsets[s]] for s in SPLITS}
    images = torch.from_numpy(np.concatenate([arrays.x_train, arrays.x_test])).to(device)
    labels = torch.from_numpy(y_all).to(device)
    index = {s: [torch.from_numpy(offsets[s][ix]).to(device) for ix in part.indices[s]] for s in SPLITS}
    return FederatedData(images, labels, index, part, split_labels,
                         BatchTransform(arrays.info.mean, arrays.info.std, device, channels_last=cfg.channels_last),
                         arrays.info.num_classes)
