"""fedbench from Python: run a config, run a sweep, read a results store, build a report.

The command line is a thin layer over these functions (``fedbench run``, ``sweep``, ``report`` and
``export`` call them), so a notebook gets the same runs, the same run ids and the same store::

    import fedbench.api as fb

    res = fb.run(method="fedavg", dataset="synthetic", clients=5, rounds=2, models="cnn1",
                 results="results.sqlite")
    res.accuracy, res.rounds                                 # a float, a pandas DataFrame
    store = fb.open_results("results.sqlite")
    store.rounds(method="fedavg", seed=[0, 1])               # every round of the matching runs
    store.report("report/", protocol="yi")                   # tables and plots of a selection
    fb.export("results.sqlite", "tensorboard", "runs")       # every complete run to TensorBoard

Bad input raises :class:`ConfigError` (a ``ValueError``) with the one-line message the command line
prints after ``fedbench: error:``, before any work starts and before the store is touched.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from fedbench.callbacks import RunCallback, RunInfo
from fedbench.errors import ConfigError, choice_error
from fedbench.trackers.export import Exported

if TYPE_CHECKING:
    from fedbench.config import RunConfig
    from fedbench.report.tables import Table
    from fedbench.store import Store
    from fedbench.sweep import Job

__all__ = ["ConfigError", "DEFAULT_RESULTS", "Exported", "Report", "Results", "RunCallback", "RunInfo", "RunResult",
           "SweepResult", "export", "open_results", "report", "run", "sweep"]

DEFAULT_RESULTS = Path("fedbench-results.sqlite")
DEVICES = ("auto", "cpu", "cuda")
# filters of Results' tables besides the config's options (method, dataset, seed, clients, rank, ...)
RUN_FILTERS = ("run_id", "sweep", "label", "protocol")
# columns that name a run in the per-round tables (what a plot groups by)
RUN_COLUMNS = ("run_id", "label", "method", "dataset", "eval_protocol", "seed", "sweep")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def _device_type(device: str) -> str:
    """"cpu" or "cuda": the device a run will use, for the device-dependent defaults of its config."""
    from fedbench.engine.simulation import resolve_device
    return resolve_device(device).type


def _flat_options(config: RunConfig | Mapping[str, Any] | None, options: Mapping[str, Any]) -> dict[str, Any]:
    """Run options as one flat mapping (a RunConfig's method parameters beside its core options)."""
    from fedbench.config import RunConfig
    if isinstance(config, RunConfig):
        d = config.to_dict()
        base = {**{k: v for k, v in d.items() if k != "method_params"}, **d["method_params"]}
    elif config is None:
        base = {}
    elif isinstance(config, Mapping):
        base = dict(config)
    else:
        raise ConfigError(f"config must be a RunConfig or a mapping of options, got {type(config).__name__}")
    return {**base, **options}


# --- results of one run ----------------------------------------------------------------------------

@dataclass
class RunResult:
    """One stored run: its summary, its tables (pandas DataFrames, the store's rows) and provenance.

    Attributes:
        run_id: the run's id in the store.
        label: the method's label with its non-default variant options.
        config: the resolved config (every option, method parameters under ``method_params``).
        command: the command recorded with the run (``fedbench run ...`` that reproduces it).
        results: the store it lives in.
        summary: what ``fedbench run`` prints: accuracy under every statistic and weighting
            (``acc_last_unweighted``, ...), the protocol's own reported number (``reported``), costs and
            per-round metric statistics; ``fedbench run --json`` prints the same keys.
        rounds: one row per round (``rounds`` table: wall_s, train_s, eval_s, server_macs, evaluated,
            acc_mean, acc_weighted).
        client_rounds: one row per client and round (``client_rounds``: selected, bytes_up, bytes_down,
            train_macs, eval_macs, train_samples, correct, total).
        round_metrics: named per-round metrics, long format (round, name, value).
        client_metrics: named per-client metrics, long format (round, client, name, value).
        clients: one row per client (arch, n_train, n_val, n_test, class_counts_json).
        provenance: status, versions, device, data and partition digests, sweep, times.
        reused: True when the run was already complete in the store and nothing was trained.
    """

    run_id: str
    label: str
    config: dict[str, Any]
    command: str
    results: Path
    summary: dict[str, Any]
    rounds: pd.DataFrame
    client_rounds: pd.DataFrame
    round_metrics: pd.DataFrame
    client_metrics: pd.DataFrame
    clients: pd.DataFrame
    provenance: dict[str, Any]
    reused: bool = False

    @property
    def accuracy(self) -> float | None:
        """The accuracy the run's evaluation protocol reports (``summary["reported"]["accuracy"]``)."""
        return (self.summary.get("reported") or {}).get("accuracy")

    @property
    def costs(self) -> dict[str, float]:
        """Bytes up and down (total and per round), TFLOP (2 per multiply-add) and seconds."""
        keys = ("bytes_up", "bytes_down", "bytes_up_per_round", "bytes_down_per_round", "client_train_tflops",
                "client_eval_tflops", "server_tflops", "global_eval_tflops", "wall_s", "train_s", "eval_s")
        return {k: self.summary[k] for k in keys if k in self.summary}

    @property
    def run_config(self) -> RunConfig:
        """``config`` as a :class:`fedbench.config.RunConfig` (checked again; ``ConfigError`` if the method
        is no longer registered)."""
        from fedbench.config import config_from_dict
        return config_from_dict(self.config)


def _load_run(store: Store, run_id: str, summary: dict | None = None, reused: bool = False) -> RunResult:
    from fedbench.config import stored_config_dict
    from fedbench.runner import stored_summary
    row = store.db.execute("SELECT label, config_json, command, status, versions_json, device, data_digest, "
                           "partition_digest, sweep, created_at, finished_at, error FROM runs WHERE run_id = ?",
                           (run_id,)).fetchone()
    if row is None:
        raise ConfigError(f"run {run_id} is not in {store.path}")
    label, config_json, command, status, versions, *rest = row
    provenance = dict(zip(("device", "data_digest", "partition_digest", "sweep", "created_at", "finished_at",
                           "error"), rest, strict=True))
    provenance.update(status=status, versions=json.loads(versions) if versions else {})
    return RunResult(run_id, label, stored_config_dict(config_json), command or "", store.path,
                     summary if summary is not None else stored_summary(store, run_id),
                     store.rounds(run_id), store.client_rounds(run_id), store.round_metrics(run_id),
                     store.client_metrics(run_id), store.clients(run_id), provenance, reused)


class _Callbacks:
    """Runs every callback's hook in order; a callback is told of the end only once told of the start."""

    def __init__(self, callbacks: Sequence[RunCallback], info: RunInfo) -> None:
        self.callbacks, self.info, self.started = list(callbacks), info, []

    def start(self, _record) -> None:
        for cb in self.callbacks:
            cb.on_run_start(self.info)
            self.started.append(cb)

    def round(self, result) -> None:
        for cb in self.callbacks:
            cb.on_round_end(self.info, result)

    def end(self, status: str, error: str | None) -> None:
        for cb in self.started:
            cb.on_run_end(self.info, status, error)


def run(config: RunConfig | Mapping[str, Any] | None = None, /, *, results: str | Path = DEFAULT_RESULTS,
        data_dir: str | Path | None = None, device: str = "auto", force: bool = False,
        client_batching: str = "auto", partition_file: str | Path | None = None, track: Iterable[str] = (),
        callbacks: Sequence[RunCallback] = (), command: str | None = None,
        say: Callable[[str], None] | None = None, **options: Any) -> RunResult:
    """Train one federated run, stored round by round in ``results``; a run already complete there is
    shown from the store instead (``force=True`` trains it again).

    Args:
        config: the run's options: a mapping (``{"method": "fedavg", "rounds": 5}``, the names of
            ``fedbench run``'s options with underscores), a :class:`fedbench.config.RunConfig`, or None.
        results: the SQLite results store (created if missing).
        data_dir: folder holding ``<dataset>.npz`` (default: ``$FEDBENCH_DATA_DIR``, else
            ``~/.cache/fedbench``).
        device: ``auto``, ``cpu`` or ``cuda``.
        force: train again even if this exact config is complete in the store.
        client_batching: ``auto``, ``on`` or ``off``: train a round's participants in one batched pass
            (methods that offer it; same results).
        partition_file: run on the exact split in this file (``fedbench data partition --export``).
        track: experiment trackers to stream the run to while it trains, as ``fedbench run --track``
            takes them: ``tensorboard[:DIR]``, ``mlflow[:URI]``, ``wandb[:DIR]``.
        callbacks: :class:`fedbench.callbacks.RunCallback` objects told of the run's start, each round
            and its end (only when the run is trained).
        command: the command recorded with the run (default: the ``fedbench run`` command that
            reproduces the config).
        say: where messages go (the run was complete already, another process holds it); default stderr.
        **options: more run options, over ``config``'s (``method="fedkd", rounds=2``).

    Returns:
        The stored run (:class:`RunResult`).

    Raises:
        ConfigError: a bad option, data file, results path or tracker, before any work starts.
        fedbench.store.ClaimLost: another process took the run over while it trained (this process's
            lease went stale); the run is theirs now.
    """
    from fedbench.config import config_to_cli, make_config
    from fedbench.data.partition_file import with_partition_file
    from fedbench.engine.simulation import CLIENT_BATCHING
    from fedbench.runner import claim_or_wait, execute, prepare, stored_summary
    from fedbench.store import Store, check_results_path
    from fedbench.trackers.export import tracking_callbacks

    say = say or _stderr
    if device not in DEVICES:
        raise choice_error("--device", device, DEVICES)
    if client_batching not in CLIENT_BATCHING:
        raise choice_error("--client-batching", client_batching, CLIENT_BATCHING)
    values, _ = with_partition_file(_flat_options(config, options), partition_file)
    cfg = make_config(values, _device_type(device))
    results = Path(results)
    check_results_path(results)
    streams = tracking_callbacks(track)
    p = prepare(cfg, data_dir, device)
    command = command or config_to_cli(cfg)
    store = Store(results)
    try:
        if store.status(p.run_id) == "complete" and not force:
            say(f"run {p.run_id} is already complete in {results}; showing the stored result "
                f"(--force runs it again)")
            return _load_run(store, p.run_id, reused=True)
        if not claim_or_wait(store, p.run_id, force, say):
            say(f"run {p.run_id} was completed by another process; showing the stored result")
            return _load_run(store, p.run_id, reused=True)
        hooks = _Callbacks([*callbacks, *streams], RunInfo(p.run_id, p.label, cfg, command, results))
        try:
            execute(p, store, hooks.round, command=command, client_batching=client_batching, on_start=hooks.start)
        except BaseException as e:
            hooks.end("failed", f"{type(e).__name__}: {e}")
            raise
        hooks.end("complete", None)
        return _load_run(store, p.run_id, stored_summary(store, p.run_id))
    finally:
        store.close()


# --- sweeps ----------------------------------------------------------------------------------------

@dataclass
class SweepResult:
    """What a sweep ran (or, with ``dry_run``, would run).

    Attributes:
        name: the sweep's name, recorded with its runs (``Results.runs(sweep=name)``).
        results: the results store.
        configs: every run's resolved config, in the grid's order.
        dropped: grid points merged because an axis did not apply to a method.
        jobs: one per config: ``run_id`` and ``state`` (done, skipped: complete before, elsewhere: run by
            another process, failed with ``error``; with ``dry_run``: pending or skipped). None for a dry
            run on a store that does not exist yet (no run ids computed).
        executor: how the runs were executed (e.g. ``1 process``), empty for a dry run.
    """

    name: str
    results: Path
    configs: list[RunConfig]
    dropped: int
    jobs: list[Job] | None
    executor: str = ""

    def _state(self, state: str) -> list[Job]:
        return [j for j in self.jobs or [] if j.state == state]

    @property
    def done(self) -> list[Job]:
        """The runs this sweep trained."""
        return self._state("done")

    @property
    def skipped(self) -> list[Job]:
        """The runs already complete in the store."""
        return self._state("skipped")

    @property
    def elsewhere(self) -> list[Job]:
        """The runs another process sharing the store completed."""
        return self._state("elsewhere")

    @property
    def failed(self) -> list[Job]:
        """The runs that failed (``job.error`` says why; stored as failed)."""
        return self._state("failed")

    @property
    def run_ids(self) -> list[str]:
        """Every run's id (empty for a dry run on a store that does not exist yet)."""
        return [j.run_id for j in self.jobs or []]


def _sweep_document(spec: str | Path | Mapping[str, Any] | None, base: Mapping[str, Any] | None,
                    axes: Mapping[str, Sequence[Any]] | None) -> tuple[dict, str]:
    """The sweep document (a TOML file's or a mapping's, with ``base`` and ``axes`` over its own) and the
    name errors give it."""
    import tomllib
    if spec is None and not axes and not base:
        raise ConfigError("give a sweep FILE or --axis/--base options")
    if spec is None:
        doc, where = {}, "command line"
    elif isinstance(spec, Mapping):
        doc, where = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in spec.items()}, "sweep"
    else:
        try:
            doc = tomllib.loads(Path(spec).read_text())
        except FileNotFoundError:
            raise ConfigError(f"sweep file {spec} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"sweep file {spec} is not valid TOML: {e}") from None
        where = str(spec)
    if base or spec is None:
        doc.setdefault("base", {}).update(base or {})
    if axes or spec is None:
        doc.setdefault("axes", {}).update({k: list(v) for k, v in (axes or {}).items()})
    return doc, where


def sweep(spec: str | Path | Mapping[str, Any] | None = None, /, *, base: Mapping[str, Any] | None = None,
          axes: Mapping[str, Sequence[Any]] | None = None, only: Mapping[str, Sequence[Any]] | None = None,
          name: str | None = None, results: str | Path = DEFAULT_RESULTS, jobs: int | None = None,
          threads: int = 0, data_dir: str | Path | None = None, device: str = "auto", dry_run: bool = False,
          executor: str = "local", address: str | None = None, cpus_per_run: float | None = None,
          gpus_per_run: float | None = None, retries: int = 2, co_evaluate: bool = True,
          say: Callable[[str], None] | None = None, progress: Callable[..., Any] | None = None) -> SweepResult:
    """Run a grid of configs resumably: runs complete in the store are skipped by run id.

    Args:
        spec: a sweep TOML file, or its document as a mapping (``{"base": {...}, "axes": {...}}``, see
            ``fedbench/sweep.py`` for the format), or None (``base`` and ``axes`` only).
        base: options for every run, over the document's ``[base]``.
        axes: axes over the document's ``[axes]``: ``{"method": ["fedavg", "fedkd"], "seed": [0, 1]}``;
            a paired axis: ``{"clients,fraction": [[10, 1.0], [50, 0.2]]}``.
        only: keep only the runs whose option has one of these values (a slice of the grid, same run ids).
        name: the sweep name recorded with its runs (default: the document's, else the file's stem).
        results: the SQLite results store.
        jobs: runs at a time, each in its own process (local: default 1; ray: as the cluster holds).
        threads: torch threads per run (0: cores / jobs; ray: cpus per run).
        data_dir: folder holding ``<dataset>.npz``.
        device: ``auto``, ``cpu`` or ``cuda``.
        dry_run: plan only: nothing runs and nothing is stored.
        executor: ``local`` (processes on this machine) or ``ray`` (tasks on a Ray cluster).
        address: ray: the cluster's address (default ``$RAY_ADDRESS``, else a local Ray).
        cpus_per_run: ray: CPUs a run reserves (default 1).
        gpus_per_run: GPUs a run reserves, fractional to share one (0.25: four runs per GPU; ray: default 0;
            local: packs runs per GPU with --device cuda, ``jobs`` defaulting to what the GPUs hold).
        retries: times a run whose worker or node died is tried again.
        co_evaluate: runs that differ only in their evaluation protocol share one training.
        say: where the plan's one-line account goes; default stderr.
        progress: called as ``progress(jobs, name, executor, co_evaluate)`` before the runs start; returns
            a context manager that yields a callable, called with the jobs whenever one changes state
            (the command line's live line is one).

    Returns:
        :class:`SweepResult`; failed runs are in ``.failed`` (nothing is raised for them).

    Raises:
        ConfigError: a bad file, option, grid point or executor setting, before any run starts.
    """
    from fedbench.data.partition_file import check_sweep_partitions, sweep_partition_files
    from fedbench.store import Store, check_results_path
    from fedbench.sweep import execute_sweep, parse_sweep, plan, select

    say = say or _stderr
    if jobs is not None and jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    if threads < 0:
        raise ConfigError(f"--threads must be >= 0, got {threads}")
    if retries < 0:
        raise ConfigError(f"--retries must be >= 0, got {retries}")
    if device not in DEVICES:
        raise choice_error("--device", device, DEVICES)
    if executor not in ("local", "ray"):
        raise choice_error("--executor", executor, ("local", "ray"))
    if executor == "ray":  # the runs' device is the workers' (the driver may have no GPU)
        from fedbench.ray_executor import check_ray_options
        device = check_ray_options(device, cpus_per_run, gpus_per_run)
        device_type = device
    else:
        device_type = None
        for opt, v in (("--address", address), ("--cpus-per-run", cpus_per_run)):
            if v is not None:
                raise ConfigError(f"{opt} is an option of --executor ray")
        if gpus_per_run is not None:  # the local executor packs runs per GPU
            if device == "cpu":
                raise ConfigError(f"--gpus-per-run {gpus_per_run} packs runs on GPUs that --device cpu would not use")
            import torch

            from fedbench.executors import gpu_slots
            gpu_slots(gpus_per_run, torch.cuda.device_count())  # checked before any work
            device = "cuda"
    doc, where = _sweep_document(spec, base, axes)
    doc, files = sweep_partition_files(doc, where)
    sw = parse_sweep(doc, where, device_type or _device_type(device))
    if only:
        sw = select(sw, {k: list(v) for k, v in only.items()})
    check_sweep_partitions(sw, files, where, data_dir)
    if files and executor == "ray":
        raise ConfigError(f"{where}: partition_file runs with --executor local; --executor ray does not carry "
                          f"partition files to its workers yet")
    if name:
        sw.name = name
    results = Path(results)
    check_results_path(results)
    if dry_run:
        jobs_list = None
        if results.exists():
            store = Store(results)
            try:
                jobs_list = plan(sw, store, data_dir)
            finally:
                store.close()
        return SweepResult(sw.name, results, sw.configs, sw.dropped, jobs_list)
    if executor == "ray":  # connect (and check the cluster can hold a run) before the store is touched
        from fedbench.ray_executor import RayExecutor
        runner = RayExecutor(address, cpus_per_run or 1.0, gpus_per_run or 0.0, jobs, threads, device, data_dir)
    else:
        from fedbench.executors import LocalExecutor
        runner = LocalExecutor(jobs, results.parent / f".{results.name}.logs", threads, device, data_dir,
                               partition_files=tuple(pf.source for pf in files.values()), gpus_per_run=gpus_per_run)
    try:
        store = Store(results)
        try:
            jobs_list = plan(sw, store, data_dir)
        finally:
            store.close()
    except BaseException:
        runner.close()
        raise
    todo = [j for j in jobs_list if j.state == "pending"]
    trainings = len({j.training_key for j in todo}) if co_evaluate else len(todo)
    shared = f", {trainings} trainings (co-evaluated protocols share one)" if trainings < len(todo) else ""
    described = f"{runner.describe()} ({runner.name})"
    say(f"sweep {sw.name}: {len(jobs_list)} runs, {len(jobs_list) - len(todo)} already complete, "
        f"{len(todo)} to run{shared} with {described}")
    live = progress(jobs_list, sw.name, runner, co_evaluate) if progress else contextlib.nullcontext(None)
    with live as on_change:
        final = execute_sweep(jobs_list, results, runner, sw.name, retries, on_change=on_change,
                              co_evaluate=co_evaluate)
    return SweepResult(sw.name, results, sw.configs, sw.dropped, final, described)


# --- reading a store -------------------------------------------------------------------------------

@dataclass
class Report:
    """A report written by :meth:`Results.report`.

    Attributes:
        out: the folder it was written to (``report.md``, ``report.html``, tables, plots, ``runs.csv``).
        runs: how many runs it covers.
        tables: its tables by name (``accuracy``, ``fairness``, ``costs``, ...), each with
            ``.to_markdown()``, ``.to_html()``, ``.to_latex()`` and ``.to_csv()``.
        files: every file written.
    """

    out: Path
    runs: int
    tables: dict[str, Table]
    files: list[Path] = field(default_factory=list)

    @property
    def figures(self) -> list[Path]:
        """The report's plots (PNG files)."""
        return [f for f in self.files if f.suffix == ".png"]


def _check_summary_options(statistic: str, population: str, weighting: str, protocol: str | None,
                           target: float | None) -> None:
    from fedbench.summary import check_options
    check_options(statistic, population, weighting, protocol)
    if target is not None and not 0 < target <= 1:
        raise ConfigError(f"--target must be a fraction in (0, 1], got {target}")


class Results:
    """A results store opened for reading (see :func:`open_results`).

    Every table method takes the same filters, as keyword arguments: ``method``, ``dataset``,
    ``protocol`` (the evaluation protocol: yi, pfllib, round-end), ``seed``, ``sweep``, ``run_id``,
    ``label``, or any other run option (``clients=50``, ``fraction=0.2``, ``rank=8``: a setting), each
    a value or a list of values (None: no filter); a run matches when every filter matches. ``status`` (default
    ``"complete"``; None: every run) picks runs by their state. The per-round tables carry the columns
    that name a run (run_id, label, method, dataset, eval_protocol, seed, sweep) first.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"--results {self.path} does not exist")
        with self._store():  # a usable fedbench store, checked now
            pass

    def __repr__(self) -> str:
        return f"Results({str(self.path)!r})"

    @contextlib.contextmanager
    def _store(self):
        from fedbench.store import Store
        store = Store(self.path)
        try:
            yield store
        finally:
            store.close()

    # -- selection ------------------------------------------------------------------------------------
    def runs(self, *, status: str | None = "complete", **filters: Any) -> pd.DataFrame:
        """One row per run: the store's ``runs`` columns (run_id, label, status, command, sweep, ...),
        every config option as a column (method parameters as ``hp_<name>``), and ``eval_protocol``
        resolved."""
        from fedbench.config import CORE_FIELDS, LATE_FIELDS
        from fedbench.summary import run_protocol
        from fedbench.sweep import _all_option_names, _check_option

        known = _all_option_names() | set(RUN_FILTERS)
        for k in filters:
            _check_option(k, known, f"unknown filter {k!r}; filters are run options (method, seed, clients, "
                                    f"...) and {', '.join(RUN_FILTERS)}")
        with self._store() as store:
            runs = store.runs(status)
        rows = []
        for _, r in runs.iterrows():
            cfg = json.loads(r["config_json"])
            row = {k: CORE_FIELDS[k].default for k in LATE_FIELDS}
            row.update({k: v for k, v in cfg.items() if k != "method_params"})
            row.update({f"hp_{k}": v for k, v in cfg.get("method_params", {}).items()})
            row["eval_protocol"] = run_protocol(cfg)
            rows.append({**r.to_dict(), **row})
        df = pd.DataFrame(rows, columns=list(runs.columns) if not rows else None)
        for k, want in filters.items():
            if want is None:  # not given
                continue
            col = self._column(k)
            values = list(want) if isinstance(want, (list, tuple, set, frozenset)) else [want]
            keep = [v in values for v in df[col]] if col in df.columns else [False] * len(df)
            df = df.loc[pd.Series(keep, index=df.index, dtype=bool)]
        return df.reset_index(drop=True)

    @staticmethod
    def _column(key: str) -> str:
        from fedbench.config import CORE_FIELDS
        key = key.replace("-", "_")
        if key == "protocol":
            return "eval_protocol"
        if key in CORE_FIELDS or key in RUN_FILTERS:
            return key
        return f"hp_{key}"

    def _table(self, table: str, status: str | None, filters: dict) -> pd.DataFrame:
        runs = self.runs(status=status, **filters)
        ids = runs["run_id"].tolist() if len(runs) else []
        order = {"rounds": "round", "client_rounds": "round, client", "round_metrics": "round, name",
                 "client_metrics": "round, client, name", "clients": "client"}[table]
        parts = []
        with self._store() as store:
            for i in range(0, max(len(ids), 1), 500):  # SQLite caps the parameters of one query
                chunk = ids[i:i + 500]
                marks = ",".join("?" * len(chunk)) or "NULL"
                parts.append(pd.read_sql_query(f"SELECT * FROM {table} WHERE run_id IN ({marks}) "
                                               f"ORDER BY run_id, {order}", store.db, params=chunk))
        rows = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
        names = [c for c in RUN_COLUMNS if c != "run_id"]
        named = runs[list(RUN_COLUMNS)] if len(runs) else pd.DataFrame(columns=list(RUN_COLUMNS))
        out = named.merge(rows, on="run_id", how="inner")
        return out[["run_id", *names, *[c for c in rows.columns if c != "run_id"]]]

    def rounds(self, *, status: str | None = "complete", **filters: Any) -> pd.DataFrame:
        """The ``rounds`` rows of the matching runs: round, wall_s, train_s, eval_s, server_macs,
        evaluated, acc_mean (unweighted mean over evaluated clients), acc_weighted."""
        return self._table("rounds", status, filters)

    def client_rounds(self, *, status: str | None = "complete", **filters: Any) -> pd.DataFrame:
        """The ``client_rounds`` rows: round, client, selected, bytes_up, bytes_down, train_macs,
        eval_macs, train_samples, correct, total (None where not evaluated)."""
        return self._table("client_rounds", status, filters)

    def round_metrics(self, *, status: str | None = "complete", **filters: Any) -> pd.DataFrame:
        """The methods' and the global model's named per-round metrics (``round_metrics``): round, name,
        value (e.g. agg_deviation, global_correct, global_total)."""
        return self._table("round_metrics", status, filters)

    def client_metrics(self, *, status: str | None = "complete", **filters: Any) -> pd.DataFrame:
        """The methods' named per-client metrics (``client_metrics``): round, client, name, value (e.g.
        acc_batch_mean, val_correct)."""
        return self._table("client_metrics", status, filters)

    def clients(self, *, status: str | None = "complete", **filters: Any) -> pd.DataFrame:
        """The ``clients`` rows: client, arch, n_train, n_val, n_test, class_counts_json."""
        return self._table("clients", status, filters)

    def run(self, run_id: str) -> RunResult:
        """One stored run (any status) with its summary and tables."""
        with self._store() as store:
            return _load_run(store, run_id)

    def _ids(self, filters: dict) -> list[str]:
        """The complete runs matching ``filters``; ConfigError naming the filters when none does."""
        from fedbench.report.build import no_runs_error
        ids = self.runs(**filters)["run_id"].tolist()
        if not ids:
            raise no_runs_error(self.path, filters)
        return ids

    def summary(self, *, statistic: str = "protocol", population: str = "protocol", weighting: str = "protocol",
                target: float | None = None, **filters: Any) -> pd.DataFrame:
        """One row per complete run as the report reads it: config columns, ``accuracy`` under the
        summary asked (each run's protocol's own by default), fairness across clients, costs per round,
        rounds to ``target``, ``variant`` and ``setting`` names."""
        from fedbench.report.frame import add_names, run_frame
        _check_summary_options(statistic, population, weighting, filters.get("protocol"), target)
        ids = self._ids(filters)
        with self._store() as store:
            df, _ = run_frame(store, statistic, weighting, target, population=population, run_ids=ids)
        return add_names(df)

    def report(self, out: str | Path, *, statistic: str = "protocol", population: str = "protocol",
               weighting: str = "protocol", target: float | None = None, focus: str | None = "fedlora",
               command: str | None = None, test: str = "paired", **filters: Any) -> Report:
        """Write the report of the matching complete runs to ``out``, as ``fedbench report`` does:
        tables (Markdown, HTML, LaTeX, CSV), plots, ``report.md``, ``report.html`` and ``runs.csv``.

        Args:
            out: folder to write (created).
            statistic: ``protocol`` (each run's protocol's own), ``last``, ``best``, ``last10`` or ``val``.
            population: ``protocol``, ``all`` or ``selected``.
            weighting: ``protocol``, ``unweighted``, ``weighted`` or ``batch-mean``.
            target: target accuracy for rounds-to-target costs, a fraction in (0, 1].
            focus: method whose cost ratios against the best-accuracy baseline are stated.
            command: the command the report says made it (default: this process's command line).
            test: significance test against the best method: ``paired`` (t-test on per-seed differences;
                runs of a seed must share the partition) or ``welch`` (unpaired); Holm-corrected per column.
            **filters: which runs (see :class:`Results`).
        """
        from fedbench.report.build import build_report
        from fedbench.report.stats import check_test
        _check_summary_options(statistic, population, weighting, filters.get("protocol"), target)
        check_test(test)
        ids = self._ids(filters)
        out = Path(out)
        with self._store() as store:
            info = build_report(store, out, statistic, weighting, target, filters.get("sweep"), None, focus,
                                command=command, population=population, run_ids=ids, test=test)
        return Report(out, info["runs"], info["tables"], [Path(f) for f in info["files"]])


def export(results: str | Path, to: str, where: str | None = None, *, figures: bool = True,
           experiment: str = "fedbench", project: str = "fedbench", run_ids: Iterable[str] | None = None,
           **filters: Any) -> list[Exported]:
    """Send runs of a results store to a tracker.

    Args:
        results: the results store.
        to: ``tensorboard``, ``mlflow`` or ``wandb`` (its extra installed).
        where: tensorboard: the log folder (default ``runs``); mlflow: a tracking URI or a local folder
            (default ``$MLFLOW_TRACKING_URI``, else ``mlruns``); wandb: the folder of its ``wandb/`` run
            folders (default ``.``; offline unless ``$WANDB_MODE`` is ``online``).
        figures: attach the figures of each run's own report (complete runs).
        experiment: the MLflow experiment.
        project: the W&B project.
        run_ids: these runs (any status); default every complete run matching ``filters``.
        **filters: which runs, as :class:`Results` takes them (``method``, ``seed``, ...).

    Returns:
        One :class:`Exported` per run, in the store's order.

    Raises:
        ConfigError: an unknown tracker or one whose extra is missing, a missing store, no matching run.
    """
    from fedbench.report.build import no_runs_error
    from fedbench.trackers import make_tracker, require
    from fedbench.trackers.export import send_run

    require(to, "--to")
    res = Results(results)
    if run_ids is not None:
        wanted = list(dict.fromkeys(run_ids))
        ids = res.runs(status=None, run_id=wanted, **filters)["run_id"].tolist()
        missing = [r for r in wanted if r not in ids]
        if missing:
            from fedbench.errors import ConfigError
            raise ConfigError(f"--run {missing[0]} is not in {res.path}" + (" (or not matched by the filters)"
                                                                           if filters else ""))
    else:
        ids = res.runs(**filters)["run_id"].tolist()
        if not ids:
            raise no_runs_error(res.path, filters)
    out = []
    with res._store() as store:
        for run_id in ids:
            out.append(send_run(store, run_id, make_tracker(to, where, experiment=experiment, project=project),
                                figures))
    return out


def open_results(path: str | Path = DEFAULT_RESULTS) -> Results:
    """Open a results store for reading (``ConfigError`` if it does not exist or is no fedbench store)."""
    return Results(path)


def report(results: str | Path = DEFAULT_RESULTS, out: str | Path = "fedbench-report", **kwargs: Any) -> Report:
    """``open_results(results).report(out, **kwargs)``, with the summary options checked before the store
    is opened (the order ``fedbench report`` checks them in)."""
    _check_summary_options(kwargs.get("statistic", "protocol"), kwargs.get("population", "protocol"),
                           kwargs.get("weighting", "protocol"), kwargs.get("protocol"), kwargs.get("target"))
    return open_results(results).report(out, **kwargs)

