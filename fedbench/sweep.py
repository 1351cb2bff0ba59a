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

import contextlib
import dataclasses
import functools
import itertools
import json
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


def _check_option(k: str, known: set[str], where: str) -> None:
    """ConfigError (one line, with the closest known name) unless ``k`` is an option of some method."""
    if _norm(k) not in known:
        import difflib
        close = difflib.get_close_matches(_norm(k), sorted(known), n=1)
        hint = f" (did you mean {close[0].replace('_', '-')}?)" if close else ""
        raise ConfigError(f"{where}{hint}")


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
        _check_option(k, known, f"{where}: unknown option {k!r} in [{section}]")

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


def select(sw: Sweep, only: dict[str, list], where: str = "--only") -> Sweep:
    """The runs of ``sw`` (product points and includes alike) whose option ``k`` is one of ``only[k]`` for
    every key: a slice of a grid, with the run ids the whole grid gives them (to fill a grid in sittings).
    A run whose method has no such option does not match."""
    known = _all_option_names()
    for k in only:
        _check_option(k, known, f"{where}: unknown option {k!r}")
    missing = object()

    def value(cfg: RunConfig, k: str):
        k = _norm(k)
        return getattr(cfg, k) if k in CORE_FIELDS else cfg.method_params.get(k, missing)

    kept = [c for c in sw.configs if all(value(c, k) in vs for k, vs in only.items())]
    if not kept:
        wanted = " ".join(f"{k}={','.join(map(str, vs))}" for k, vs in only.items())
        raise ConfigError(f"{where}: no run of sweep {sw.name!r} has {wanted}")
    return Sweep(sw.name, kept, sw.dropped)


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

@dataclass
class Job:
    cfg: RunConfig
    run_id: str
    # pending | waiting (claimed by another process) | skipped (complete at plan) | running | done |
    # elsewhere (completed or taken over by another process) | failed
    state: str = "pending"
    error: str = ""
    started: float = 0.0
    seconds: float = 0.0
    attempt: int = 0
    seen_other: bool = False  # was found claimed by another process
    # co-evaluation: pending runs that differ from this one only in their evaluation protocol, claimed
    # with it and evaluated on its training (one worker); they share its state
    followers: list[Job] = dataclasses.field(default_factory=list)

    @functools.cached_property
    def training_key(self) -> str:
        """What the run trains (``config.training_key``): jobs with one key can share a training."""
        from fedbench.config import training_key
        return training_key(self.cfg)

    def also_protocols(self) -> tuple[str, ...]:
        return tuple(f.cfg.protocol for f in self.followers)


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


def execute_sweep(jobs: list[Job], results: Path, executor, sweep_name: str, retries: int = 2,
                  on_change=None, poll: float = 0.2, recheck: float = 1.0, co_evaluate: bool = True) -> list[Job]:
    """Run the pending jobs through ``executor`` (fedbench/executors.py); this process alone writes the
    store, round by round as the workers' records come back.

    A job is claimed in the store just before it is handed out, so sweeps (and ``fedbench run``) sharing
    one store share the work: a run claimed by another live process waits and ends as ``elsewhere`` when
    that process completes it; one whose owner died is taken over. A worker that dies without a last word
    (crash, killed, node lost) is retried up to ``retries`` times, then the run is recorded as failed with
    the reason; a run that fails by itself is recorded at once. The claims are heartbeaten from a thread
    while the sweep runs and released if it stops early (the runs stay incomplete: restart resumes).

    ``co_evaluate``: a claimed job takes with it the pending jobs that differ from it only in the evaluation
    protocol (``config.training_key``) and whose claims it gets; one worker trains once and evaluates
    under each protocol, and every run is stored as its own (the rows a run of that protocol alone stores:
    tests/test_coevaluation.py). It changes no result, only the cost (one training instead of several)."""
    from collections import deque

    from fedbench.config import config_to_cli
    from fedbench.runner import persist_start
    from fedbench.store import ClaimLost, Store

    store = Store(results)
    todo = deque(j for j in jobs if j.state == "pending")
    waiting: list[Job] = []
    running: dict[str, Job] = {}
    checked = time.time()

    def changed() -> None:
        if on_change is not None:
            on_change(jobs)

    def end(job: Job, state: str, error: str = "") -> None:
        running.pop(job.run_id, None)
        for j in (job, *job.followers):
            j.state, j.error = state, error
            j.seconds = time.time() - j.started if j.started else 0.0

    def launch(job: Job) -> None:
        job.attempt += 1
        job.state, job.started = "running", job.started or time.time()
        for f in job.followers:
            f.state, f.started, f.attempt = "running", job.started, job.attempt
        running[job.run_id] = job
        executor.submit(job)

    def take(job: Job) -> bool:
        """Claim ``job``'s run; True if it is ours to run now (else it ended or waits)."""
        got = store.claim(job.run_id)
        if got == "complete":
            end(job, "elsewhere")
        elif got == "busy":
            job.state, job.seen_other = "waiting", True
            waiting.append(job)
        elif job.seen_other and store.status(job.run_id) == "failed":  # its holder ran it and it failed
            store.release(job.run_id, "failed in another process")
            error = store.runs().set_index("run_id").loc[job.run_id, "error"]
            end(job, "failed", f"failed in another process: {error}")
        else:
            return True
        return False

    def claim(job: Job) -> None:
        if not take(job):
            return
        if co_evaluate:
            mates = [j for j in todo if j.cfg.protocol != job.cfg.protocol and j.training_key == job.training_key]
            for mate in mates:
                todo.remove(mate)
                if take(mate):
                    job.followers.append(mate)
        launch(job)

    def members(job: Job) -> list[Job]:
        return [job, *job.followers]

    def drop(job: Job, follower: Job, state: str, error: str = "") -> None:
        job.followers.remove(follower)
        end(follower, state, error)

    def write_followers(job: Job, write) -> None:
        for f in list(job.followers):
            try:
                write(f)
            except ClaimLost as e:  # this one was taken over: the others stay ours
                drop(job, f, "elsewhere", str(e))

    def handle(job: Job, kind: str, payload) -> None:
        if kind == "start":
            sibs = {s.cfg.protocol: s for s in payload.also}
            computed = [payload.run_id] + [getattr(sibs.get(f.cfg.protocol), "run_id", None) for f in job.followers]
            bad = [got for j, got in zip(members(job), computed, strict=True) if got != j.run_id]
            if bad:
                executor.cancel(job)
                error = f"the worker computed run id {bad[0]}: its dataset differs from the driver's"
                for j in members(job):
                    store.mark_failed(j.run_id, j.cfg, error)
                end(job, "failed", error)
                return
            persist_start(store, payload, config_to_cli(job.cfg), sweep_name)
            where = f"attempt {job.attempt} on {payload.worker} ({executor.name})"
            store.log_event(job.run_id, "started", where)

            def start(f: Job) -> None:
                persist_start(store, sibs[f.cfg.protocol], config_to_cli(f.cfg), sweep_name)
                store.log_event(f.run_id, "started", f"{where}, co-evaluated with {job.run_id}")
            write_followers(job, start)
        elif kind == "round":
            store.write_round(job.run_id, payload)
            write_followers(job, lambda f: store.write_round(f.run_id, payload.also[f.cfg.protocol]))
        elif kind == "done":
            store.finish_run(job.run_id, "complete")
            write_followers(job, lambda f: store.finish_run(f.run_id, "complete"))
            end(job, "done")
        elif kind == "error":
            for j in members(job):
                store.mark_failed(j.run_id, j.cfg, payload)
            end(job, "failed", payload)
        elif kind == "crash" and job.attempt <= retries:
            for j in members(job):
                store.log_event(j.run_id, "retry", payload)
            launch(job)
        else:  # a crash, the last attempt
            error = f"{payload} (attempt {job.attempt} of {retries + 1})"
            for j in members(job):
                store.mark_failed(j.run_id, j.cfg, error)
            end(job, "failed", error)

    def lost(job: Job, e: ClaimLost) -> None:
        """The job's own run was taken over: stop the worker, hand its followers back to the queue."""
        executor.cancel(job)
        followers, job.followers = job.followers, []
        end(job, "elsewhere", str(e))
        for f in followers:
            with contextlib.suppress(Exception):
                store.release(f.run_id, "its co-evaluated run was taken over")
            f.state, f.started, f.attempt = "pending", 0.0, 0
            todo.append(f)

    try:
        with store.keep_alive():
            changed()
            while todo or waiting or running:
                if waiting and time.time() - checked >= recheck:  # try the others' runs again first
                    todo.extendleft(reversed(waiting))
                    waiting.clear()
                    checked = time.time()
                while todo and len(running) < executor.capacity():
                    claim(todo.popleft())
                    changed()
                for job, attempt, kind, payload in executor.poll(poll):
                    if running.get(job.run_id) is not job or attempt != job.attempt:
                        continue  # a late word from a cancelled or superseded attempt
                    try:
                        handle(job, kind, payload)
                    except ClaimLost as e:  # our lease went stale and another process took the run over
                        lost(job, e)
                    if kind != "round":
                        changed()
    finally:
        for job in list(running.values()):
            executor.cancel(job)
            for j in members(job):
                with contextlib.suppress(Exception):
                    store.release(j.run_id, "sweep stopped")
        executor.close()
        store.close()
    return jobs
