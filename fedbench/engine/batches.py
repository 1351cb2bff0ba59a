"""Training batches of a client: seeded order and augmentation, gathered from the one device tensor.

The n-th request of a client in a round draws stream (client, round, n): the same for every method,
so methods see the same data order. ``local_steps`` > 0 makes every request exactly that many
batches (epochs are then ignored; the data is reshuffled at each pass), as the federated-LoRA
literature counts local work.

``data_order``: ``reshuffle`` (the default) permutes the client's samples anew at every epoch (pass) from
the stream; ``fixed`` feeds them in the partition's order (ascending dataset index) at every epoch of
every round, as HtFLlib's client loaders do (``shuffle=False``), so that a cross-library check can feed
both libraries the same batches. A request made with ``shuffle=False`` (a pass that collects, not trains)
is in the partition's order under either.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from fedbench.seeding import torch_generator

PREFETCH_ENV = "FEDBENCH_PREFETCH"  # on | off | auto (the default): see default_prefetch


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_prefetch(device: torch.device, threads: int | None = None, cores: int | None = None) -> bool:
    """Prefetch batches in a helper thread on the CPU when a core is left over by torch's intra-op
    threads (benchmarks/speed.py, 2-core CPU, 1 thread: FedLoRA trains 1.16x faster with it; with both
    cores computing it changes nothing); never on CUDA, where batch preparation is asynchronous
    already. ``FEDBENCH_PREFETCH=on|off`` overrides (sweeps set off when their jobs fill the cores)."""
    if device.type != "cpu":
        return False
    forced = os.environ.get(PREFETCH_ENV, "auto").strip().lower()
    if forced in ("on", "off"):
        return forced == "on"
    threads = torch.get_num_threads() if threads is None else threads
    cores = available_cores() if cores is None else cores
    return threads < cores


class BatchSource:
    def __init__(self, cfg, data, device: torch.device, prefetch: bool | None = None) -> None:
        self.cfg, self.data, self.device = cfg, data, device
        self.prefetch = default_prefetch(device) if prefetch is None else prefetch
        self.samples = np.zeros(cfg.clients, dtype=np.int64)  # samples handed to methods this round
        self._pool: ThreadPoolExecutor | None = None

    def train_batches(self, client, epochs: int, augment: bool, shuffle: bool, count: bool = True):
        cfg, data = self.cfg, self.data
        idx = data.index["train"][client.id]
        client.streams += 1
        g = torch_generator(self.device, cfg.seed, "data", client.id, client.round, client.streams)
        mode = cfg.augment if augment else "none"
        n, bs = len(idx), cfg.batch_size
        steps = getattr(cfg, "local_steps", 0)
        shuffle = shuffle and cfg.data_order == "reshuffle"

        def produce():
            done = 0
            for _ in range(epochs) if steps <= 0 else iter(int, 1):
                order = idx[torch.randperm(n, generator=g, device=self.device)] if shuffle else idx
                for s in range(0, n, bs):
                    if 0 < steps <= done:
                        return
                    b = order[s:s + bs]
                    done += 1
                    yield data.transform.train_gather(data.images, b, mode, g), data.labels[b]

        for x, y in (self._prefetched(produce()) if self.prefetch else produce()):
            if count:  # counted when handed to the method, not when prepared
                self.samples[client.id] += len(y)
            yield x, y

    def _prefetched(self, it):
        """Yield from ``it`` while a helper thread prepares the next item (gather and augmentation run on
        a spare core while the method trains on the current batch; torch ops release the GIL). The
        items and their order are those of ``it``: ``it`` runs in one thread at a time."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="fedbench-data")
        end = object()
        nxt = self._pool.submit(next, it, end)
        try:
            while True:
                item = nxt.result()
                if item is end:
                    return
                nxt = self._pool.submit(next, it, end)
                yield item
        finally:  # the consumer stopped early: let the pending step finish before `it` is dropped
            with contextlib.suppress(BaseException):
                nxt.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
