"""Clients' batch streams stepped together: what a joint (batched or stacked) local training iterates."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def lockstep(streams: Iterable[Iterable], what: str) -> Iterator[list]:
    """Yield, step after step, the next batch of every stream still running. The streams are ordered by
    their step counts, longest first, so a stream that runs out takes every later one with it: the list
    shrinks from its end. A later stream still running then means the counts were wrong (RuntimeError
    naming ``what``)."""
    iters = [iter(s) for s in streams]
    active = len(iters)
    while active:
        batch = []
        for c in range(active):
            item = next(iters[c], None)
            if item is None:
                break
            batch.append(item)
        if len(batch) < active:  # the exhausted clients must be the rest of the stack
            for c in range(len(batch) + 1, active):
                if next(iters[c], None) is not None:
                    raise RuntimeError(f"{what}: a client ran out of batches before one expected to take fewer "
                                       f"steps (the step counts were wrong)")
            active = len(batch)
            if not active:
                break
        yield batch
