"""Exact communication: bytes of the tensors in a payload, as they cross the simulated network.

A payload is a tensor, or a (nested) mapping or sequence of tensors, or None/empty. Anything else
is refused, so that no method can smuggle state past the meter. Class ids and other index data
count too: send them as integer tensors (class ids in :func:`class_id_dtype`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

_ID_DTYPES = ((torch.uint8, 255), (torch.int16, 2**15 - 1), (torch.int32, 2**31 - 1), (torch.int64, 2**63 - 1))


def class_id_dtype(num_classes: int) -> torch.dtype:
    """The smallest integer dtype that holds the class ids 0..num_classes-1 on the wire: uint8 up to 256
    classes, then int16, int32, int64. Receivers convert back to int64 (``.long()``) before indexing:
    a uint8 index tensor would be read as a boolean mask."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return next(dt for dt, top in _ID_DTYPES if num_classes - 1 <= top)


def payload_bytes(payload) -> int:
    """Sum of numel x element size over every tensor in ``payload``."""
    if payload is None:
        return 0
    if isinstance(payload, torch.Tensor):
        return payload.numel() * payload.element_size()
    if isinstance(payload, Mapping):
        return sum(payload_bytes(v) for v in payload.values())
    if isinstance(payload, Sequence) and not isinstance(payload, (str, bytes)):
        return sum(payload_bytes(v) for v in payload)
    raise TypeError(f"payloads hold tensors only (in mappings/sequences), got {type(payload).__name__}")


def payload_numel(payload) -> int:
    """Number of scalars in ``payload`` (the 'parameters' column of the spec's tables)."""
    if payload is None:
        return 0
    if isinstance(payload, torch.Tensor):
        return payload.numel()
    if isinstance(payload, Mapping):
        return sum(payload_numel(v) for v in payload.values())
    return sum(payload_numel(v) for v in payload)
