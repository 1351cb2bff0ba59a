"""One master seed, many independent streams.

Every random stream of a run (train/validation split, partition, per-client initialisation, client
sampling, data order, augmentation) is derived from the master seed and a tuple of names/numbers
that says what the stream is for, so adding a stream never shifts another one.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def _key(part) -> int:
    if isinstance(part, str):
        return zlib.crc32(part.encode())
    return int(part)


def derive(seed: int, *parts) -> int:
    """A 63-bit seed for the stream named by ``parts`` under master ``seed``."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *(_key(p) for p in parts)])
    lo, hi = (int(v) for v in ss.generate_state(2, dtype=np.uint32))
    return (lo | (hi << 32)) & ((1 << 63) - 1)


def numpy_rng(seed: int, *parts) -> np.random.Generator:
    return np.random.default_rng(derive(seed, *parts))


def torch_generator(device: torch.device | str, seed: int, *parts) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive(seed, *parts))
    return g
