"""The Ray executor: each run a Ray task on a laptop, a multi-node cluster or a SLURM allocation.

* a task reserves ``--cpus-per-run`` CPUs and ``--gpus-per-run`` GPUs (fractional: 0.25 puts four runs
  on one GPU; Ray only counts, it does not partition the GPU's memory or compute);
* each dataset is put in Ray's object store once by the driver; workers read it from there (no data
  directory on the workers);
* a task runs in a fresh worker process (``max_calls=1``): thread counts, allocator settings and the
  plugin registry (entry points, loaded on the worker) never leak from one run into the next;
* the task is a streaming generator: the driver writes each round to the store as it arrives;
* Ray's own retries are off (``max_retries=0``): the sweep's driver retries a run whose worker or
  node died (``--retries``), each attempt restarting the run in the store under the driver's claim.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import threading
import time

from fedbench.errors import ConfigError
from fedbench.executors import Executor, RunSettings, one_line

INSTALL_HINT = "pip install 'fedbench[ray]' (in a checkout: pip install -e '.[ray]')"


def check_ray_options(device: str, cpus_per_run: float | None, gpus_per_run: float | None) -> str:
    """Check ``--executor ray``'s options before any work; returns the workers' device type."""
    if importlib.util.find_spec("ray") is None:
        raise ConfigError(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}")
    cpus = 1.0 if cpus_per_run is None else cpus_per_run
    gpus = 0.0 if gpus_per_run is None else gpus_per_run
    if not cpus > 0:
        raise ConfigError(f"--cpus-per-run must be > 0, got {cpus_per_run}")
    if not gpus >= 0:
        raise ConfigError(f"--gpus-per-run must be >= 0, got {gpus_per_run}")
    if gpus > 1 and gpus != int(gpus):
        raise ConfigError(f"--gpus-per-run above 1 must be a whole number (Ray shares only fractions of one "
                          f"GPU), got {gpus_per_run}")
    if device == "cuda" and gpus == 0:
        raise ConfigError("--device cuda with --executor ray needs --gpus-per-run > 0 (Ray hides GPUs from "
                          "tasks that reserve none)")
    if device == "cpu" and gpus > 0:
        raise ConfigError(f"--gpus-per-run {gpus_per_run} reserves GPUs that --device cpu would not use")
    return "cuda" if gpus > 0 else "cpu"


def _probe(address: str, timeout: float = 10.0) -> None:
    """Fail fast on an address nothing listens at (ray.init would retry for minutes)."""
    import socket
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():  # "auto" and the like: Ray resolves those itself
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(f"--address {address}: no Ray cluster answers there ({e.strerror or e})") from None


def _ray_run(cfg_json: str, arrays, settings: RunSettings, also: tuple[str, ...] = ()):
    """The Ray task: simulate one run, yielding its messages (fedbench/executors.py) as they come."""
    import queue

    from fedbench.executors import perform

    q: queue.Queue = queue.Queue()

    def work() -> None:
        try:
            perform(cfg_json, settings, q.put, arrays, also)
        except BaseException as e:  # perform reports Exceptions itself; anything else still ends the stream
            q.put(("error", one_line(e)))

    threading.Thread(target=work, name="fedbench-run", daemon=True).start()
    while True:
        kind, payload = q.get()
        yield kind, payload
        if kind in ("done", "error"):
            return


class RayExecutor(Executor):
    name = "ray"

    def __init__(self, address: str | None, cpus_per_run: float = 1.0, gpus_per_run: float = 0.0,
                 jobs: int | None = None, threads: int = 0, device: str = "cpu", data_dir=None) -> None:
        super().__init__()
        import ray
        self.ray = ray
        self.cpus, self.gpus, self.jobs = cpus_per_run, gpus_per_run, jobs
        self.data_dir = data_dir
        self._own = not ray.is_initialized()
        self._gens: dict[str, object] = {}  # run id -> the generator of its attempt in flight
        if self._own:
            address = address or os.environ.get("RAY_ADDRESS") or None
            try:
                if address:
                    _probe(address)
                    ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
                else:  # a Ray of our own on this machine, on the loopback interface, gone when we end
                    ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                             _node_ip_address="127.0.0.1")
            except Exception as e:
                raise ConfigError(f"cannot start or reach Ray{f' at {address}' if address else ''}: "
                                  f"{one_line(e)}") from None
        try:
            self._check_fits()
        except ConfigError:
            self.close()
            raise
        threads = threads or max(1, math.floor(cpus_per_run))
        # the prefetch thread only where the task reserved a core beyond its compute threads
        prefetch = "auto" if device == "cuda" else ("on" if cpus_per_run >= threads + 1 else "off")
        self.settings = RunSettings(device, threads, prefetch, None)
        self._task = ray.remote(max_calls=1, max_retries=0)(_ray_run).options(
            num_cpus=cpus_per_run, num_gpus=gpus_per_run)
        self._data: dict[str, object] = {}
        self._cap, self._cap_at = 1, 0.0

    def _check_fits(self) -> None:
        res = self.ray.cluster_resources()
        if res.get("CPU", 0) < self.cpus:
            raise ConfigError(f"--cpus-per-run {self.cpus:g}: the Ray cluster has {res.get('CPU', 0):g} CPUs")
        if self.gpus > res.get("GPU", 0):
            raise ConfigError(f"--gpus-per-run {self.gpus:g}: the Ray cluster has {res.get('GPU', 0):g} GPUs")

    def capacity(self) -> int:
        """Runs the cluster's live nodes hold at once (re-read every 2 s: nodes come and go)."""
        if time.time() - self._cap_at > 2.0:
            res = self.ray.cluster_resources()
            n = math.floor(res.get("CPU", 0) / self.cpus + 1e-9)
            if self.gpus:
                n = min(n, math.floor(res.get("GPU", 0) / self.gpus + 1e-9))
            self._cap = max(1, min(n, self.jobs) if self.jobs else n)
            self._cap_at = time.time()
        return self._cap

    def describe(self) -> str:
        gpus = f", {self.gpus:g} GPU" if self.gpus else ""
        return (f"up to {self.capacity()} at a time, {self.cpus:g} CPU{gpus} and {self.settings.threads} torch "
                f"thread(s) per run")

    def _dataset(self, name: str):
        if name not in self._data:
            from fedbench.data.sources import load_dataset
            self._data[name] = self.ray.put(load_dataset(name, self.data_dir))
        return self._data[name]

    def submit(self, job) -> None:
        gen = self._task.remote(job.cfg.canonical_json(), self._dataset(job.cfg.dataset), self.settings,
                                tuple(job.also_protocols()))
        self._gens[job.run_id] = gen
        threading.Thread(target=self._pump, args=(job, job.attempt, gen), daemon=True,
                         name=f"fedbench-ray-{job.run_id}").start()

    def _pump(self, job, attempt: int, gen) -> None:
        from ray import exceptions as rx
        try:
            for ref in gen:
                kind, payload = self.ray.get(ref)
                if kind in ("done", "error") and self._gens.get(job.run_id) is gen:
                    self._gens.pop(job.run_id, None)
                self._post(job, attempt, kind, payload)
                if kind in ("done", "error"):
                    return
            self._post(job, attempt, "crash", "the Ray task ended without a result")
        except rx.TaskCancelledError:
            pass
        except rx.RayTaskError as e:  # raised by our code outside perform (e.g. unpickling its arguments)
            self._post(job, attempt, "error", f"Ray task failed: {one_line(getattr(e, 'cause', None) or e)}")
        except Exception as e:  # the worker or its node died, an object was lost, ...
            first = (str(e).strip().splitlines() or [""])[0]
            self._post(job, attempt, "crash", f"{type(e).__name__}: {first[:300]}")

    def cancel(self, job) -> None:
        self._cancel(job.run_id)

    def _cancel(self, run_id: str) -> None:
        gen = self._gens.pop(run_id, None)
        if gen is not None:
            try:
                self.ray.cancel(gen, force=True)
            except Exception:  # already finished, or its worker already gone
                pass

    def close(self) -> None:
        for run_id in list(self._gens):
            self._cancel(run_id)
        if self._own and self.ray.is_initialized():
            self.ray.shutdown()
