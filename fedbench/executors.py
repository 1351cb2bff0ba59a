"""Executors: where a sweep's runs are simulated. The sweep's driver alone writes the store.

A worker (a fresh process per run) simulates one run and sends its record as messages::

    ("start", RunRecord header)   the run's identity, versions, device and client table (and, for a
                                  co-evaluated job, those of its other protocols' runs in ``also``)
    ("round", RoundResult)        each round as it ends (the other protocols' in ``also``)
    ("done", None)                or ("error", reason): the run itself failed (not retried)

An executor hands runs to workers and the messages back to the driver (``poll``), adding
``("crash", reason)`` when a worker died without a last word (killed, node lost): the driver retries
those a bounded number of times. Per-run settings (device, threads, prefetch, data dir, partition files) travel as
arguments (``RunSettings``), never as environment variables of the worker.

``LocalExecutor`` runs ``python -m fedbench.worker`` processes on this machine, messages over a pipe;
``fedbench.ray_executor.RayExecutor`` runs Ray tasks, messages as a streaming generator.
"""

from __future__ import annotations

import json
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path

PREFETCH_CHOICES = ("auto", "on", "off")


@dataclass(frozen=True)
class RunSettings:
    """How a worker runs (not what: that is the RunConfig). Changes no result except ``threads``."""

    device: str = "auto"
    threads: int = 0          # torch intra-op threads (0: torch's default)
    prefetch: str = "auto"    # batch prefetch thread: auto (the engine's rule), on, off
    data_dir: str | None = None
    partition_files: tuple[str, ...] = ()  # imported partitions the runs may name (by their digest)

    def prefetch_flag(self) -> bool | None:
        return {"auto": None, "on": True, "off": False}[self.prefetch]


def one_line(e: BaseException) -> str:
    from fedbench.errors import ConfigError
    text = " ".join(str(e).split())
    return text if isinstance(e, ConfigError) else f"{type(e).__name__}: {text}"


def perform(cfg_json: str, settings: RunSettings, emit, arrays=None, also: tuple[str, ...] = ()) -> bool:
    """Simulate one run in this process, emitting its messages; True if it completed. ``arrays``: the
    dataset (else loaded from ``settings.data_dir``); ``also``: protocols the same training is evaluated
    under too (co-evaluation: the header's ``also`` and each round's ``also`` carry their runs)."""
    try:
        import torch

        from fedbench.config import config_from_dict
        from fedbench.runner import prepare, simulate
        if settings.threads > 0:
            torch.set_num_threads(settings.threads)
        if settings.partition_files:
            from fedbench.data.partition_file import read_partition_file, register
            for path in settings.partition_files:
                register(read_partition_file(path))
        p = prepare(config_from_dict(json.loads(cfg_json)), settings.data_dir, settings.device, arrays=arrays)
        simulate(p, lambda rec: emit(("start", rec)), lambda r: emit(("round", r)),
                 prefetch=settings.prefetch_flag(), also_protocols=tuple(also))
    except Exception as e:
        traceback.print_exc()
        emit(("error", one_line(e)))
        return False
    emit(("done", None))
    return True


class Executor:
    """Runs attempts of jobs; messages come back through ``poll`` as (job, attempt, kind, payload)."""

    name = "?"

    def __init__(self) -> None:
        self._q: queue.Queue = queue.Queue()

    def capacity(self) -> int:
        """How many runs to have in flight now."""
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.capacity()} at a time"

    def submit(self, job) -> None:
        """Start attempt ``job.attempt`` of ``job``."""
        raise NotImplementedError

    def cancel(self, job) -> None:
        """Stop the attempt in flight (its later messages are ignored by attempt number)."""

    def close(self) -> None:
        pass

    def poll(self, timeout: float) -> list[tuple]:
        out = []
        try:
            out.append(self._q.get(timeout=timeout))
            while True:
                out.append(self._q.get_nowait())
        except queue.Empty:
            pass
        return out

    def _post(self, job, attempt: int, kind: str, payload=None) -> None:
        self._q.put((job, attempt, kind, payload))


def _die_with_parent() -> None:
    """Child processes die when the sweep dies (even by SIGKILL), so no orphan runs on."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: an orphan may run on; its messages go nowhere and the store is safe
        pass


def gpu_slots(gpus_per_run: float, gpu_count: int) -> int:
    """Runs at a time that ``gpus_per_run`` (a fraction of one GPU: 0.25 packs four runs on each) lets
    ``gpu_count`` GPUs hold."""
    from fedbench.errors import ConfigError
    if not 0 < gpus_per_run <= 1:
        raise ConfigError(f"--gpus-per-run {gpus_per_run}: the local executor packs runs on a GPU with a fraction "
                          f"in (0, 1] (a run uses one GPU)")
    if gpu_count < 1:
        raise ConfigError(f"--gpus-per-run {gpus_per_run}: torch sees no CUDA device on this machine")
    return gpu_count * int(1 / gpus_per_run + 1e-9)


class LocalExecutor(Executor):
    """``jobs`` worker processes at a time on this machine, a fresh one per run, each with ``threads``
    torch threads (0: cores / jobs); a worker's output goes to ``log_dir/<run_id>.log``.

    ``gpus_per_run`` (a fraction of one GPU) packs runs per device: each run goes to the GPU (``cuda:K``)
    with the fewest runs, at most ``1 / gpus_per_run`` on each; ``jobs`` defaults to what the GPUs hold.
    Like Ray's fractional GPUs this only counts: the runs share the GPU's memory and time (benchmarks/
    batched_clients.py --pack measures what packing gains on a device)."""

    name = "local"

    def __init__(self, jobs: int | None, log_dir: Path, threads: int = 0, device: str = "auto",
                 data_dir: str | os.PathLike | None = None, partition_files: tuple[str, ...] = (),
                 gpus_per_run: float | None = None, gpu_count: int | None = None) -> None:
        super().__init__()
        from fedbench.engine.simulation import available_cores
        self.per_gpu = 0
        self._on_gpu: dict[int, set[str]] = {}
        if gpus_per_run is not None:
            if gpu_count is None:
                import torch
                gpu_count = torch.cuda.device_count()
            slots = gpu_slots(gpus_per_run, gpu_count)
            self.per_gpu = slots // gpu_count
            self._on_gpu = {k: set() for k in range(gpu_count)}
            jobs = min(jobs, slots) if jobs else slots
        jobs = jobs or 1
        self.jobs = jobs
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(exist_ok=True)
        threads = threads or max(1, (os.cpu_count() or 1) // jobs)
        # each worker's batch-prefetch thread needs a core of its own; none is left when the jobs' threads
        # fill the machine
        prefetch = "off" if jobs * threads >= available_cores() else "auto"
        self.settings = RunSettings(device, threads, prefetch, str(data_dir) if data_dir else None,
                                    tuple(partition_files))
        self._procs: dict[str, subprocess.Popen] = {}

    def capacity(self) -> int:
        return self.jobs

    def describe(self) -> str:
        packed = f", up to {self.per_gpu} per GPU" if self.per_gpu else ""
        return f"{self.jobs} at a time{packed}, {self.settings.threads} torch thread(s) each"

    def device_for(self, run_id: str) -> str:
        """The run's device: with ``gpus_per_run``, the GPU holding the fewest runs (booked until it ends)."""
        if not self._on_gpu:
            return self.settings.device
        k = min(self._on_gpu, key=lambda g: len(self._on_gpu[g]))
        self._on_gpu[k].add(run_id)
        return f"cuda:{k}"

    def _release(self, run_id: str) -> None:
        for runs in self._on_gpu.values():
            runs.discard(run_id)

    def submit(self, job) -> None:
        s = self.settings
        r, w = os.pipe()
        cmd = [sys.executable, "-m", "fedbench.worker", "--config", job.cfg.canonical_json(),
               "--device", self.device_for(job.run_id),
               "--threads", str(s.threads), "--prefetch", s.prefetch, "--fd", str(w)]
        if s.data_dir:
            cmd += ["--data-dir", s.data_dir]
        for path in s.partition_files:
            cmd += ["--partition-file", path]
        if job.also_protocols():
            cmd += ["--also-eval", ",".join(job.also_protocols())]
        log_path = self.log_dir / f"{job.run_id}.log"
        with open(log_path, "w" if job.attempt == 1 else "a") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    pass_fds=(w,), preexec_fn=_die_with_parent)
        os.close(w)
        self._procs[job.run_id] = proc
        threading.Thread(target=self._pump, args=(job, job.attempt, proc, r, log_path), daemon=True,
                         name=f"fedbench-pipe-{job.run_id}").start()

    def _pump(self, job, attempt: int, proc: subprocess.Popen, fd: int, log_path: Path) -> None:
        last = None
        with os.fdopen(fd, "rb") as f:
            while True:
                try:
                    kind, payload = pickle.load(f)
                except (EOFError, pickle.UnpicklingError, ValueError):
                    break
                last = kind
                self._post(job, attempt, kind, payload)
        code = proc.wait()
        self._release(job.run_id)
        if last not in ("done", "error"):
            how = (f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}")
            tail = log_path.read_text(errors="replace").strip().splitlines() if log_path.exists() else []
            self._post(job, attempt, "crash", f"worker process {how} before the run ended"
                       + (f" (log: {tail[-1][:300]})" if tail else ""))

    def cancel(self, job) -> None:
        proc = self._procs.pop(job.run_id, None)
        if proc is not None and proc.poll() is None:
            proc.kill()

    def close(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self._procs.values():
            proc.wait()
        self._procs.clear()
