"""Sweeps: a base config plus axes, expanded to runs, executed resumably.

Sweep file (TOML)::

    [sweep]
    name = "nightly"                  # recorded with every run; `fedbench report --sweep` filters on it

    [base]                            # any `fedbench run` option (underscores or dashes)
    dataset = "cifar10"
    rounds = 20

    [axes]                            # the cartesian product of these
    method = ["fedlora", "standalone"]
    rank = [2, 8]
    seed = [0, 1, 2]
    "clients,fraction" = [[10, 1.0], [50, 0.2]]   # a paired axis: values move together

    [[exclude]]                       # drop product points matching every key given (value or list)
    method = "standalone"
    seed = 2

    [[include]]                       # extra points, each merged over [base]
    method = "fedavg"
    models = "cnn1"

An axis that does not apply to a method (``rank`` for ``standalone``) is dropped for that method and
the duplicates this makes are merged. Every point is checked before any run starts; runs already
complete in the store are skipped by config hash, incomplete ones are restarted.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from fedbench.config import CORE_FIELDS, RunConfig, make_config
from fedbench.errors import ConfigError

SECTIONS = ("sweep", "base", "axes", "exclude", "include")


@dataclass
class Sweep:
    name: str
    configs: list[RunConfig]
    dropped: int  # points merged because an axis did not apply to a method


def _all_option_names() -> set[str]:
    from fedbench.registry import methods
    names = set(CORE_FIELDS)
    for cls in methods().values():
        names |= {f.name for f in dataclasses.fields(cls.Params)}
    return names


def _norm(key: str) -> str:
    return key.replace("-", "_")


def _method_options(method: str) -> set[str]:
    from fedbench.registry import get_method
    return {f.name for f in dataclasses.fields(get_method(method).Params)}


def parse_sweep(doc: dict, where: str = "sweep", device_type: str | None = None) -> Sweep:
    """Expand a parsed sweep document; raise ConfigError (one line) on anything wrong."""
    unknown = sorted(set(doc) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{where}: unknown section [{unknown[0]}]; allowed: {', '.join(SECTIONS)}")
    meta = doc.get("sweep", {})
    if not isinstance(meta, dict) or set(meta) - {"name"}:
        raise ConfigError(f"{where}: [sweep] takes only `name`")
    name = str(meta.get("name", Path(where).stem))
    base = doc.get("base", {})
    axes = doc.get("axes", {})
    if not isinstance(base, dict) or not isinstance(axes, dict):
        raise ConfigError(f"{where}: [base] and [axes] must be tables")
    known = _all_option_names()

    def check_key(k: str, section: str) -> None:
        if _norm(k) not in known:
            import difflib
            close = difflib.get_close_matches(_norm(k), sorted(known), n=1)
            hint = f" (did you mean {close[0].replace('_', '-')}?)" if close else ""
            raise ConfigError(f"{where}: unknown option {k!r} in [{section}]{hint}")

    for k in base:
        check_key(k, "base")
    axis_items = []
    for k, values in axes.items():
        keys = [s.strip() for s in k.split(",")]
        for kk in keys:
            check_key(kk, "axes")
        if not isinstance(values, list):
            raise ConfigError(f"{where}: axis {k!r} must be a list of values, got {type(values).__name__}")
        if not values:
            raise ConfigError(f"{where}: axis {k!r} is empty")
        if len(keys) > 1:
            for v in values:
                if not isinstance(v, list) or len(v) != len(keys):
                    raise ConfigError(f"{where}: paired axis {k!r} needs lists of {len(keys)} values, got {v!r}")
            axis_items.append([dict(zip(map(_norm, keys), v, strict=True)) for v in values])
        else:
            axis_items.append([{_norm(keys[0]): v} for v in values])
    rules = {}
    for section in ("exclude", "include"):
        items = doc.get(section, [])
        if not isinstance(items, list) or not all(isinstance(r, dict) for r in items):
            raise ConfigError(f"{where}: [[{section}]] entries must be tables")
        for r in items:
            for k in r:
                check_key(k, section)
        rules[section] = [{_norm(k): v for k, v in r.items()} for r in items]

    def excluded(point: dict) -> bool:
        for rule in rules["exclude"]:
            if all((point.get(k) in v) if isinstance(v, list) else point.get(k) == v for k, v in rule.items()):
                return True
        return False

    base_n = {_norm(k): v for k, v in base.items()}
    points = []
    for combo in itertools.product(*axis_items) if axis_items else [()]:
        point = dict(base_n)
        for part in combo:
            point.update(part)
        if not excluded(point):
            points.append(point)
    points += [{**base_n, **r} for r in rules["include"]]

    configs, seen, dropped = [], set(), 0
    for point in points:
        method = point.get("method", CORE_FIELDS["method"].default)
        if not isinstance(method, str):
            raise ConfigError(f"{where}: method must be a name, got {method!r}")
        mine = _method_options(method)
        values = {k: v for k, v in point.items() if k in CORE_FIELDS or k in mine}
        try:
            cfg = make_config(values, device_type)
        except ConfigError as e:
            raise ConfigError(f"{where}: point {json.dumps(values, sort_keys=True)}: {e}") from None
        key = cfg.canonical_json()
        if key in seen:
            dropped += 1
            continue
        seen.add(key)
        configs.append(cfg)
    if not configs:
        raise ConfigError(f"{where}: the sweep has no runs (every point excluded?)")
    return Sweep(name, configs, dropped)


def load_sweep(path: Path | str, device_type: str | None = None) -> Sweep:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"sweep file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"sweep file {path} is not valid TOML: {e}") from None
    return parse_sweep(doc, str(path), device_type)


# --- execution -----------------------------------------------------------------------------------

def _die_with_parent() -> None:
    """Child processes die when the sweep dies (even by SIGKILL), so no orphan writes on."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: children may outlive a killed sweep; restart still dedups by hash
        pass


@dataclass
class Job:
    cfg: RunConfig
    run_id: str
    state: str = "pending"  # pending | skipped | running | done | failed
    proc: subprocess.Popen | None = None
    error: str = ""
    started: float = 0.0
    seconds: float = 0.0


def plan(sweep: Sweep, store, data_dir) -> list[Job]:
    """Run ids (config hash + dataset digest) and what the store already holds."""
    from fedbench.data.sources import load_dataset
    from fedbench.runner import identity_digest
    digests, backbones = {}, {}
    jobs = []
    for cfg in sweep.configs:
        if cfg.dataset not in digests:
            digests[cfg.dataset] = load_dataset(cfg.dataset, data_dir).digest
        run_id = cfg.run_hash(identity_digest(cfg, digests[cfg.dataset], data_dir, backbones))
        job = Job(cfg, run_id)
        if store.status(run_id) == "complete":
            job.state = "skipped"
        jobs.append(job)
    return jobs


def _spawn(job: Job, results: Path, data_dir, device: str, sweep_name: str, threads: int, log_dir: Path,
           prefetch: str = "auto") -> None:
    from fedbench.engine.simulation import PREFETCH_ENV
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault(PREFETCH_ENV, prefetch)
    env["PYTHONWARNINGS"] = "ignore"
    cmd = [sys.executable, "-m", "fedbench.worker", "--config", job.cfg.canonical_json(), "--results", str(results),
           "--device", device, "--sweep", sweep_name, "--threads", str(threads)]
    if data_dir:
        cmd += ["--data-dir", str(data_dir)]
    log = open(log_dir / f"{job.run_id}.log", "w")
    job.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
    job.state, job.started = "running", time.time()


def execute_sweep(jobs: list[Job], results: Path, data_dir, device: str, sweep_name: str, n_jobs: int,
                  on_change=None, poll: float = 0.2, threads: int = 0) -> list[Job]:
    """Run pending jobs, at most ``n_jobs`` at a time, each in its own process with ``threads`` threads
    (default: cores / jobs; one thread per process avoids the OpenMP contention two-thread runs suffer)."""
    threads = threads or max(1, (os.cpu_count() or 1) // n_jobs)
    # each worker's batch-prefetch thread needs a core of its own; none is left when the jobs' threads
    # fill the machine
    from fedbench.engine.simulation import available_cores
    prefetch = "off" if n_jobs * threads >= available_cores() else "auto"
    log_dir = results.parent / f".{results.name}.logs"
    log_dir.mkdir(exist_ok=True)
    queue = [j for j in jobs if j.state == "pending"]
    running: list[Job] = []
    while queue or running:
        while queue and len(running) < n_jobs:
            job = queue.pop(0)
            _spawn(job, results, data_dir, device, sweep_name, threads, log_dir, prefetch)
            running.append(job)
            on_change and on_change(jobs)
        time.sleep(poll)
        for job in list(running):
            code = job.proc.poll()
            if code is None:
                continue
            running.remove(job)
            job.seconds = time.time() - job.started
            if code == 0:
                job.state = "done"
            else:
                job.state = "failed"
                tail = (log_dir / f"{job.run_id}.log").read_text(errors="replace").strip().splitlines()
                job.error = tail[-1] if tail else f"exit code {code}"
                _record_failure(results, job)
            on_change and on_change(jobs)
    return jobs


def _record_failure(results: Path, job: Job) -> None:
    """A run that failed before the engine stored it (bad partition, crash) is recorded as failed."""
    from fedbench.store import Store
    store = Store(results)
    try:
        if store.status(job.run_id) in (None, "running"):
            store.mark_failed(job.run_id, job.cfg, job.error)
    finally:
        store.close()
