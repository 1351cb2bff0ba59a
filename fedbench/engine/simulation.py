"""The simulation engine. It never names a method: it calls the plugin contract of methods/base.py.

Per round t:
  1. sample int(C*N) distinct clients (seeded by the master seed and t);
  2. each participant receives the broadcast (bytes down), runs ``client_update`` (metered FLOPs)
     and returns its upload (bytes up);
  3. the server turns uploads into the next broadcast (``server_update``, server FLOPs); a method
     with ``push = "all"`` has it delivered to every client right away (bytes down for all);
  4. every ``eval_every`` rounds (and at the last) all clients are evaluated on their test split.
Client state is tensors; one workspace module per (role, name, spec) is bound to a client's tensors
when the method asks for it, so nothing is rebuilt per round.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fedbench.config import RunConfig, method_params_obj
from fedbench.engine.allocator import tune_host_allocator
from fedbench.engine.data import FederatedData
from fedbench.metering.comm import payload_bytes
from fedbench.metering.flops import FlopMeter
from fedbench.methods.base import Client, Method, Party, Server, Upload
from fedbench.models.cnn import ModuleSpec, cnn_spec, model_assignment
from fedbench.seeding import derive, numpy_rng, torch_generator


@dataclass
class ClientRow:
    client: int
    selected: bool
    bytes_up: int = 0
    bytes_down: int = 0
    train_macs: int = 0
    eval_macs: int = 0
    train_samples: int = 0
    correct: int | None = None  # None: not evaluated this round, or prediction undefined
    total: int | None = None


@dataclass
class RoundResult:
    round: int
    wall_s: float
    train_s: float
    eval_s: float
    server_macs: int
    evaluated: bool
    rows: list[ClientRow] = field(default_factory=list)

    def accuracy(self) -> tuple[float | None, float | None]:
        """(unweighted mean of client accuracies, sample-weighted accuracy) over evaluated clients."""
        ev = [r for r in self.rows if r.correct is not None and r.total]
        if not ev:
            return None, None
        return (float(np.mean([r.correct / r.total for r in ev])),
                sum(r.correct for r in ev) / sum(r.total for r in ev))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from fedbench.errors import ConfigError
        raise ConfigError("--device cuda asked for, but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


PREFETCH_ENV = "FEDBENCH_PREFETCH"  # on | off | auto (the default): see default_prefetch


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


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class Simulation:
    def __init__(self, cfg: RunConfig, data: FederatedData, device: torch.device,
                 prefetch: bool | None = None) -> None:
        self.cfg = cfg
        self.data = data
        self.device = device
        if device.type == "cpu":
            tune_host_allocator()  # process-wide, changes no result (see engine/allocator.py)
        # prepare the next training batch in a helper thread (None: where it pays, see default_prefetch)
        self.prefetch = default_prefetch(device) if prefetch is None else prefetch
        self._pool: ThreadPoolExecutor | None = None
        self.num_classes = data.num_classes
        self.meter = FlopMeter()
        method_cls = cfg.method_class()
        self.method: Method = method_cls(method_params_obj(cfg), cfg)
        self._workspace: dict[tuple, nn.Module] = {}
        self._state: dict[tuple, list[torch.Tensor]] = {}
        self._bound: dict[int, tuple] = {}
        self._samples = np.zeros(cfg.clients, dtype=np.int64)
        archs = model_assignment(cfg.models, cfg.clients)
        train_labels = data.split_labels["train"]
        self.clients: list[Client] = []
        for k, arch in enumerate(archs):
            sizes = {s: int(data.sizes(s)[k]) for s in ("train", "val", "test")}
            classes = np.unique(train_labels[data.partition.indices["train"][k]])
            c = Client(self, k, arch, cnn_spec(arch, self.num_classes), sizes,
                       torch.as_tensor(classes, dtype=torch.int64, device=device))
            self.clients.append(c)
            self.method.client_init(c)
        self.server = Server(self)
        self.broadcast = self.method.server_init(self.server)
        n = {"all-splits": lambda c: sum(c.sizes.values()), "train": lambda c: c.n_train,
             "uniform": lambda c: 1}[cfg.agg_weight]
        self.agg_n = np.array([n(c) for c in self.clients], dtype=np.float64)

    # --- services used through Client/Server handles -------------------------------------------
    @staticmethod
    def _key(party: Party) -> tuple:
        return ("client", party.id) if isinstance(party, Client) else ("server",)

    def create_module(self, party: Party, name: str, spec: ModuleSpec) -> nn.Module:
        key = self._key(party)
        party.specs[name] = spec
        role = key[0]
        ws_key = (role, name, spec)
        if ws_key not in self._workspace:
            ws = spec.build().to(self.device)
            self.meter.attach(ws)
            self._workspace[ws_key] = ws
        ident = (role, name, str(spec)) if self.cfg.same_init else (*key, name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive(self.cfg.seed, "init", *map(str, ident)))
            fresh = spec.build()
        tensors = [self._layout(t.detach().to(self.device).clone()) for t in (*fresh.parameters(), *fresh.buffers())]
        self._state[(*key, name)] = tensors
        return self.bound_module(party, name)

    def _layout(self, t: torch.Tensor) -> torch.Tensor:
        if self.cfg.channels_last and t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t

    def compute(self):
        """The precision context of client computation (bf16 autocast, or nothing)."""
        if self.cfg.precision == "bf16":
            # no weight-cast cache: the region spans many optimiser steps, and a cached bf16 copy of
            # a weight would go stale after the first step (the cache is only cleared on exit)
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()

    def bound_module(self, party: Party, name: str) -> nn.Module:
        key = self._key(party)
        spec = party.specs[name]
        ws = self._workspace[(key[0], name, spec)]
        owner = (*key, name)
        if self._bound.get(id(ws)) != owner:
            tensors = self._state[owner]
            for slot, t in zip((*ws.parameters(), *ws.buffers()), tensors, strict=True):
                slot.data = t
                slot.grad = None
            self._bound[id(ws)] = owner
        return ws

    def train_batches(self, client: Client, epochs: int, augment: bool, shuffle: bool, count: bool = True):
        cfg, data = self.cfg, self.data
        idx = data.index["train"][client.id]
        # the n-th call of a client in a round gets stream (client, round, n): the same for any method
        client.streams += 1
        g = torch_generator(self.device, cfg.seed, "data", client.id, client.round, client.streams)
        mode = cfg.augment if augment else "none"
        n, bs = len(idx), cfg.batch_size

        def produce():
            for _ in range(epochs):
                order = idx[torch.randperm(n, generator=g, device=self.device)] if shuffle else idx
                for s in range(0, n, bs):
                    b = order[s:s + bs]
                    yield data.transform.train_gather(data.images, b, mode, g), data.labels[b]

        for x, y in (self._prefetched(produce()) if self.prefetch else produce()):
            if count:  # counted when handed to the method, not when prepared
                self._samples[client.id] += len(y)
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
        """Stop the data helper thread (if any)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def make_optimizer(self, params, lr: float | None = None) -> torch.optim.Optimizer:
        cfg = self.cfg
        return torch.optim.SGD(list(params), lr=cfg.lr if lr is None else lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, fused=cfg.fused_sgd or None)

    def optimizer_step(self, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.clip > 0:
            self.clip_gradients([p for g in opt.param_groups for p in g["params"] if p.grad is not None])
        opt.step()

    def clip_gradients(self, params: list[torch.Tensor]) -> None:
        """``clip_grad_norm_(params, clip)``, bit for bit. On the CPU the multiply is skipped when the
        clamped coefficient is exactly 1 (the usual case: a multiply by 1.0 changes no bit, and reading
        the coefficient costs no device sync there); elsewhere it always runs, sync-free."""
        max_norm = self.cfg.clip
        if self.device.type != "cpu":
            torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
            return
        grads = [p.grad for p in params]
        if not grads:
            return
        # one dtype (so one group): what torch's get_total_norm computes, without its grouping bookkeeping
        if all(g.dtype == grads[0].dtype for g in grads):
            total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
        else:
            total = torch.nn.utils.get_total_norm(grads, 2.0, False, True)
        if not float(max_norm / (total + 1e-6)) >= 1.0:  # torch's coefficient is below its clamp, or NaN
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)

    # --- the round loop -------------------------------------------------------------------------
    def sample(self, t: int) -> list[int]:
        rng = numpy_rng(self.cfg.seed, "sample", t)
        return sorted(rng.choice(self.cfg.clients, self.cfg.per_round, replace=False).tolist())

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def evaluate(self, client: Client) -> tuple[int | None, int]:
        data, bs = self.data, self.cfg.eval_batch_size
        idx = data.index["test"][client.id]
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        for s in range(0, len(idx), bs):
            b = idx[s:s + bs]
            logits = self.method.predict(client, data.transform.eval(data.images[b]))
            if logits is None:
                return None, len(idx)
            correct += (logits.argmax(1) == data.labels[b]).sum()
        return int(correct.item()), len(idx)

    def run_round(self, t: int) -> RoundResult:
        cfg, method = self.cfg, self.method
        for c in self.clients:
            c.round, c.streams = t, 0
        self.server.round = t
        rows = {c.id: ClientRow(c.id, False) for c in self.clients}
        self._samples[:] = 0
        self._sync()
        t0 = time.perf_counter()
        if t == 1 and method.push == "all" and self.broadcast is not None:
            for c in self.clients:
                rows[c.id].bytes_down += payload_bytes(self.broadcast)
                method.receive(c, self.broadcast)
        selected = self.sample(t)
        uploads = []
        w = self.agg_n[selected] / self.agg_n[selected].sum()
        for k, wk in zip(selected, w, strict=True):
            c, row = self.clients[k], rows[k]
            row.selected = True
            if method.push == "selected":
                row.bytes_down += payload_bytes(self.broadcast)
            with self.meter.scope(k, "train"), self.compute():
                up = method.client_update(c, self.broadcast)
            row.bytes_up += payload_bytes(up)
            uploads.append(Upload(k, float(wk), up))
        with self.meter.scope("server", "train"):
            self.broadcast = method.server_update(self.server, uploads)
        if method.push == "all" and self.broadcast is not None:
            for c in self.clients:
                rows[c.id].bytes_down += payload_bytes(self.broadcast)
                with self.meter.scope(c.id, "train"):
                    method.receive(c, self.broadcast)
        self._sync()
        t1 = time.perf_counter()
        evaluated = t % cfg.eval_every == 0 or t == cfg.rounds
        if evaluated:
            for c in self.clients:
                with self.meter.scope(c.id, "eval"), self.compute():
                    rows[c.id].correct, rows[c.id].total = self.evaluate(c)
        self._sync()
        t2 = time.perf_counter()
        macs = self.meter.take()
        for (who, kind), v in macs.items():
            if who == "server":
                continue
            if kind == "train":
                rows[who].train_macs += v
            else:
                rows[who].eval_macs += v
        for k in rows:
            rows[k].train_samples = int(self._samples[k])
        server_macs = sum(v for (who, _), v in macs.items() if who == "server")
        return RoundResult(t, t2 - t0, t1 - t0, t2 - t1, server_macs, evaluated, list(rows.values()))

    def run(self, on_round: Callable[[RoundResult], None] | None = None) -> list[RoundResult]:
        results = []
        try:
            for t in range(1, self.cfg.rounds + 1):
                r = self.run_round(t)
                results.append(r)
                if on_round is not None:
                    on_round(r)
        finally:
            self.close()
        return results
