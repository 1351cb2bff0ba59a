"""Host memory allocator settings for CPU simulation (glibc only).

With glibc's defaults, a training process returns freed activation buffers to the OS and takes them
back one page fault at a time: the batch-prefetch thread allocates in its own malloc arena, whose
heap glibc shrinks eagerly, and the dynamic mmap threshold moves with the sizes in flight. On the
2-core development CPU that cost FedLoRA (batch 64, channels-last) ~430k minor page faults and
~12% of its training time per quarter round; a fixed mmap threshold and a high trim threshold take
the faults to ~10^3. Whether a process falls into that state depends on its allocation history (3 of
3 processes of one commit did, 0 of 5 fresh ones in ``benchmarks/allocator.py``, which measures both
settings); the tuned setting was fault-free in every process measured.

The setting is process-wide and changes no result (only where freed memory goes); the process keeps
its peak heap instead of returning it. ``FEDBENCH_MALLOC=default`` leaves glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MALLOC_ENV = "FEDBENCH_MALLOC"  # tuned (the default) | default

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic threshold; larger blocks are mmapped
TRIM_THRESHOLD = 1 << 30   # free memory at the top of a heap kept up to this much

_applied: dict[str, int] | None = None


def tune_host_allocator() -> dict[str, int] | None:
    """Apply the settings once per process; returns them, or None where they were not applied
    (not glibc, or ``FEDBENCH_MALLOC=default``)."""
    global _applied
    if _applied is not None:
        return _applied
    if os.environ.get(MALLOC_ENV, "tuned").strip().lower() == "default":
        return None
    libc = _glibc()
    if libc is None:
        return None
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    if not ok:
        return None
    _applied = {"mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD}
    return _applied


def _glibc():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl and others have no mallopt tuning here)
        return libc if hasattr(libc, "mallopt") else None
    except (OSError, AttributeError):
        return None
