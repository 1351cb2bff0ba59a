"""Federated data on the training device: one uint8 tensor, clients hold index tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedbench.data.partition import SPLITS, Partition, make_partition
from fedbench.data.sources import Arrays
from fedbench.data.transforms import BatchTransform
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


def build_federated_data(arrays: Arrays, cfg, device: torch.device) -> FederatedData:
    """Hold out validation (seeded), partition train/val/test with one map, move to the device."""
    n = len(arrays.y_train)
    perm = numpy_rng(cfg.seed, "val-split").permutation(n)
    n_val = int(round(cfg.val_fraction * n))
    val_pos, train_pos = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    # positions in the one device tensor: [x_train (all 50k) | x_test]
    offsets = {"train": train_pos, "val": val_pos,
               "test": np.arange(len(arrays.y_test)) + n}
    y_all = np.concatenate([arrays.y_train, arrays.y_test])
    split_labels = {s: y_all[offsets[s]] for s in SPLITS}
    part = make_partition(cfg.partition, split_labels, arrays.info.num_classes, cfg.clients,
                          numpy_rng(cfg.seed, "partition"), classes_per_client=cfg.classes_per_client,
                          alpha=cfg.alpha, min_size=cfg.min_size, share_low=cfg.share_low)
    images = torch.from_numpy(np.concatenate([arrays.x_train, arrays.x_test])).to(device)
    labels = torch.from_numpy(y_all).to(device)
    index = {s: [torch.from_numpy(offsets[s][ix]).to(device) for ix in part.indices[s]] for s in SPLITS}
    return FederatedData(images, labels, index, part, split_labels,
                         BatchTransform(arrays.info.mean, arrays.info.std, device, channels_last=cfg.channels_last),
                         arrays.info.num_classes)
