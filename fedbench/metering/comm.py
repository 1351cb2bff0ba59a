"""Exact communication: bytes of the tensors in a payload, as they cross the simulated network.

A payload is a tensor, or a (nested) mapping or sequence of tensors, or None/empty. Anything else
is refused, so that no method can smuggle state past the meter. Class ids and other index data
count too: send them as integer tensors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


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
