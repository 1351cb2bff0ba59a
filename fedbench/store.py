"""SQLite results store: one row per run, per round and per client-round, written round by round.

A run is identified by the hash of its resolved config plus the dataset's content digest. It is
marked ``complete`` only after its last round is written; an incomplete run is restarted from
scratch (its partial rows are replaced in one transaction).

Many processes may share one store (two sweeps, a ``fedbench run`` beside a sweep): a run is written
only under a **claim**, a row of ``claims`` naming its owner (``host:pid:nonce``, one per ``Store``)
and the owner's last heartbeat. ``claim`` takes a run that is unclaimed, already ours, or whose owner
is dead: its heartbeat is older than the lease, or it is a process of this host that no longer exists
(so a SIGKILLed sweep's runs are taken over at once on restart). ``start_run`` (which resets an
incomplete run) holds the claim, taking it if free and raising ``ClaimBusy`` if a live owner has it;
``write_round``, ``finish_run`` and ``mark_failed`` check it in the same transaction as their writes
(``ClaimLost`` if another process took the run over), so a process never overwrites, duplicates or
fails another's run. ``finish_run`` and ``mark_failed`` release the claim. ``keep_alive`` heartbeats
a store's claims from a thread; every claim, takeover, start and end is kept in ``claim_log``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import pandas as pd

from fedbench.errors import ConfigError

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    config_json TEXT NOT NULL,
    method TEXT NOT NULL, dataset TEXT NOT NULL, label TEXT NOT NULL,
    data_digest TEXT NOT NULL, partition_digest TEXT,
    status TEXT NOT NULL,            -- running | complete | failed
    error TEXT,
    versions_json TEXT, device TEXT, command TEXT, sweep TEXT,
    created_at REAL, finished_at REAL
);
CREATE TABLE IF NOT EXISTS clients (
    run_id TEXT NOT NULL, client INTEGER NOT NULL, arch TEXT NOT NULL,
    n_train INTEGER, n_val INTEGER, n_test INTEGER, class_counts_json TEXT,
    PRIMARY KEY (run_id, client)
);
CREATE TABLE IF NOT EXISTS rounds (
    run_id TEXT NOT NULL, round INTEGER NOT NULL,
    wall_s REAL, train_s REAL, eval_s REAL, server_macs INTEGER, evaluated INTEGER,
    acc_mean REAL, acc_weighted REAL,
    PRIMARY KEY (run_id, round)
);
CREATE TABLE IF NOT EXISTS client_rounds (
    run_id TEXT NOT NULL, round INTEGER NOT NULL, client INTEGER NOT NULL, selected INTEGER,
    bytes_up INTEGER, bytes_down INTEGER, train_macs INTEGER, eval_macs INTEGER, train_samples INTEGER,
    correct INTEGER, total INTEGER,
    bytes_down_once INTEGER,        -- the part of bytes_down sent once per run (NULL: stored before it was recorded)
    PRIMARY KEY (run_id, round, client)
);
CREATE TABLE IF NOT EXISTS round_metrics (      -- named metrics of a round (server, global model)
    run_id TEXT NOT NULL, round INTEGER NOT NULL, name TEXT NOT NULL, value REAL,
    PRIMARY KEY (run_id, round, name)
);
CREATE TABLE IF NOT EXISTS client_metrics (     -- named metrics a method reported for a client
    run_id TEXT NOT NULL, round INTEGER NOT NULL, client INTEGER NOT NULL, name TEXT NOT NULL, value REAL,
    PRIMARY KEY (run_id, round, client, name)
);
CREATE TABLE IF NOT EXISTS claims (
    run_id TEXT PRIMARY KEY, owner TEXT NOT NULL, heartbeat REAL NOT NULL, claimed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS claim_log (
    run_id TEXT NOT NULL, owner TEXT NOT NULL, event TEXT NOT NULL, detail TEXT, at REAL NOT NULL
);
"""
# columns added after stores were first written: (table, column, SQL type); opening an older store adds them,
# NULL in its existing rows (not recorded then), so old stores keep opening and their run ids never change
LATE_COLUMNS = (("client_rounds", "bytes_down_once", "INTEGER"),)
CLIENT_ROUND_COLUMNS = ("run_id", "round", "client", "selected", "bytes_up", "bytes_down", "train_macs", "eval_macs",
                        "train_samples", "correct", "total", "bytes_down_once")
RUN_TABLES = ("runs", "clients", "rounds", "client_rounds", "round_metrics", "client_metrics")

LEASE_S = 60.0      # a claim whose owner has not heartbeaten for this long may be taken over
HEARTBEAT_S = 5.0   # how often keep_alive refreshes a store's claims
HOST = socket.gethostname()


class ClaimBusy(RuntimeError):
    """The run is claimed by another live process."""

    def __init__(self, run_id: str, owner: str) -> None:
        super().__init__(f"run {run_id} is claimed by {owner}")
        self.run_id, self.owner = run_id, owner


class ClaimLost(RuntimeError):
    """Our claim on the run was taken over (our heartbeat went stale) or released: stop writing it."""

    def __init__(self, run_id: str, owner: str | None) -> None:
        super().__init__(f"run {run_id} is no longer ours: claimed by {owner or 'nobody'}")
        self.run_id, self.owner = run_id, owner


def new_owner() -> str:
    """A new claim owner id, ``host:pid:nonce`` (one per ``Store``)."""
    return f"{HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_alive(owner: str, heartbeat: float, lease_s: float, now: float | None = None) -> bool:
    """Is the claim's owner alive? Its heartbeat is fresh and, on this host, its process exists."""
    if (time.time() if now is None else now) - heartbeat > lease_s:
        return False
    host, pid, _ = (owner.split(":") + ["", ""])[:3]
    if host == HOST and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # someone else's live process
            pass
    return True


def check_results_path(path: Path) -> None:
    """Refuse, before any work, a results path we could not write."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ConfigError(f"--results {path} is a directory; give a file path such as {path / 'results.sqlite'}")
    if not parent.is_dir():
        raise ConfigError(f"--results {path}: directory {parent} does not exist")
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            raise ConfigError(f"--results {path} is not readable and writable")
        with open(path, "rb") as f:
            head = f.read(16)
        if head and head != b"SQLite format 3\x00":
            raise ConfigError(f"--results {path} exists but is not an SQLite file; give another path")
    elif not os.access(parent, os.W_OK):
        raise ConfigError(f"--results {path}: directory {parent} is not writable")


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=60, isolation_level=None)
    db.execute("PRAGMA busy_timeout = 60000")
    return db


class Store:
    """A results store: one SQLite file (the schema is ``SCHEMA``; docs: the results store page).

    Opening creates the tables where missing; ``ConfigError`` if the file is not a usable store. Writes
    happen under claims (see the module docstring); the read methods return pandas DataFrames.
    """

    def __init__(self, path: Path | str, owner: str | None = None, lease_s: float = LEASE_S) -> None:
        self.path = Path(path)
        check_results_path(self.path)
        self.owner = owner or new_owner()
        self.lease_s = lease_s
        self.db = _connect(self.path)
        try:
            self.db.executescript(SCHEMA)
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise ConfigError(f"--results {self.path} is not a usable fedbench store: {e}") from None

    def _migrate(self) -> None:
        """Add the :data:`LATE_COLUMNS` an older store lacks (NULL in its rows)."""
        for table, column, kind in LATE_COLUMNS:
            have = {row[1] for row in self.db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                with contextlib.suppress(sqlite3.OperationalError):  # a concurrent opener added it first
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def close(self) -> None:
        """Close the database connection."""
        self.db.close()

    def _tx(self, run_id: str | None = None, hold: bool = False):
        """A write transaction; with ``run_id``, under our claim on it (``hold``: taken if free)."""
        return _Tx(self.db, (lambda: self._hold(run_id) if hold else self._check(run_id)) if run_id else None)

    # --- claims -----------------------------------------------------------------------------------
    def _log(self, run_id: str, event: str, detail: str | None = None) -> None:
        self.db.execute("INSERT INTO claim_log VALUES (?,?,?,?,?)", (run_id, self.owner, event, detail, time.time()))

    def _hold(self, run_id: str) -> None:
        """Inside a transaction: make the claim ours (new, refreshed or taken over) or raise ClaimBusy."""
        now = time.time()
        row = self.db.execute("SELECT owner, heartbeat FROM claims WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            self.db.execute("INSERT INTO claims VALUES (?,?,?,?)", (run_id, self.owner, now, now))
            self._log(run_id, "claimed")
        elif row[0] == self.owner:
            self.db.execute("UPDATE claims SET heartbeat = ? WHERE run_id = ?", (now, run_id))
        elif not owner_alive(row[0], row[1], self.lease_s, now):
            self.db.execute("UPDATE claims SET owner = ?, heartbeat = ?, claimed_at = ? WHERE run_id = ?",
                            (self.owner, now, now, run_id))
            self._log(run_id, "took-over", f"from {row[0]} (heartbeat {now - row[1]:.1f} s ago)")
        else:
            raise ClaimBusy(run_id, row[0])

    def _check(self, run_id: str) -> None:
        """Inside a transaction: the claim must be ours (else ClaimLost); refresh its heartbeat."""
        cur = self.db.execute("UPDATE claims SET heartbeat = ? WHERE run_id = ? AND owner = ?",
                              (time.time(), run_id, self.owner))
        if cur.rowcount != 1:
            raise ClaimLost(run_id, self.claim_holder(run_id))

    def _release(self, run_id: str, event: str, detail: str | None = None) -> None:
        self.db.execute("DELETE FROM claims WHERE run_id = ? AND owner = ?", (run_id, self.owner))
        self._log(run_id, event, detail)

    def claim(self, run_id: str, rerun_complete: bool = False) -> str:
        """Try to claim a run: "claimed" (ours now), "complete" (nothing to do; not claimed unless
        ``rerun_complete``) or "busy" (a live process holds it; see ``claim_holder``)."""
        try:
            with self._tx():
                if self.status(run_id) == "complete" and not rerun_complete:
                    return "complete"
                self._hold(run_id)
        except ClaimBusy:
            return "busy"
        return "claimed"

    def claim_holder(self, run_id: str) -> str | None:
        """The owner holding the run's claim, or None."""
        row = self.db.execute("SELECT owner FROM claims WHERE run_id = ?", (run_id,)).fetchone()
        return row[0] if row else None

    def release(self, run_id: str, detail: str | None = None) -> None:
        """Give a claim back without finishing the run (it stays incomplete: the next claimer restarts it)."""
        with self._tx():
            if self.claim_holder(run_id) == self.owner:
                self._release(run_id, "released", detail)

    def log_event(self, run_id: str, event: str, detail: str | None = None) -> None:
        """Append an event (``started``, ``retry``...) to ``claim_log`` under this store's owner."""
        with self._tx():
            self._log(run_id, event, detail)

    def heartbeat(self) -> int:
        """Refresh every claim of this store's owner; returns how many it holds."""
        with self._tx():
            return self.db.execute("UPDATE claims SET heartbeat = ? WHERE owner = ?",
                                   (time.time(), self.owner)).rowcount

    @contextlib.contextmanager
    def keep_alive(self, every: float = HEARTBEAT_S):
        """Heartbeat this store's claims from a thread (its own connection) while the block runs."""
        stop = threading.Event()

        def beat() -> None:
            db = _connect(self.path)
            try:
                while not stop.wait(every):
                    with contextlib.suppress(sqlite3.OperationalError):  # busy past the timeout: next beat
                        db.execute("UPDATE claims SET heartbeat = ? WHERE owner = ?", (time.time(), self.owner))
            finally:
                db.close()

        t = threading.Thread(target=beat, name="fedbench-heartbeat", daemon=True)
        t.start()
        try:
            yield self
        finally:
            stop.set()
            t.join()

    def claim_events(self, run_id: str | None = None) -> pd.DataFrame:
        """The rows of ``claim_log`` (of one run, or all), in the order they were written."""
        q = "SELECT * FROM claim_log" + (" WHERE run_id = ?" if run_id else "") + " ORDER BY rowid"
        return pd.read_sql_query(q, self.db, params=(run_id,) if run_id else ())

    # --- runs -------------------------------------------------------------------------------------
    def status(self, run_id: str) -> str | None:
        """The run's status (``running``, ``complete``, ``failed``), or None if the store does not hold it."""
        row = self.db.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return row[0] if row else None

    def start_run(self, run_id: str, cfg, label: str, data_digest: str, partition_digest: str,
                  versions: dict, device: str, command: str, clients: list[dict], sweep: str | None = None) -> None:
        """Create (or reset an incomplete) run with its client table, in one transaction, under our
        claim (taken here if free; ``ClaimBusy`` if a live process holds it)."""
        with self._tx(run_id, hold=True):
            for table in RUN_TABLES:
                self.db.execute(f"DELETE FROM {table} WHERE run_id = ?", (run_id,))
            self.db.execute(
                "INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (run_id, cfg.canonical_json(), cfg.method, cfg.dataset, label, data_digest, partition_digest,
                 "running", None, json.dumps(versions), device, command, sweep, time.time(), None))
            self.db.executemany(
                "INSERT INTO clients VALUES (?,?,?,?,?,?,?)",
                [(run_id, c["client"], c["arch"], c["n_train"], c["n_val"], c["n_test"],
                  json.dumps(c["class_counts"])) for c in clients])

    def write_round(self, run_id: str, r) -> None:
        """Write one round (a ``RoundResult``: its ``rounds`` row, client rows and named metrics) in one
        transaction, under our claim (``ClaimLost`` if another process took the run over)."""
        acc_mean, acc_w = r.accuracy()
        with self._tx(run_id):
            self.db.execute("INSERT INTO rounds VALUES (?,?,?,?,?,?,?,?,?)",
                            (run_id, r.round, r.wall_s, r.train_s, r.eval_s, r.server_macs, int(r.evaluated),
                             acc_mean, acc_w))
            self.db.executemany(
                f"INSERT INTO client_rounds ({', '.join(CLIENT_ROUND_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(CLIENT_ROUND_COLUMNS))})",
                [(run_id, r.round, x.client, int(x.selected), x.bytes_up, x.bytes_down, x.train_macs,
                  x.eval_macs, x.train_samples, x.correct, x.total, getattr(x, "bytes_down_once", 0))
                 for x in r.rows])
            self.db.executemany("INSERT INTO round_metrics VALUES (?,?,?,?)",
                                [(run_id, r.round, k, v) for k, v in sorted(getattr(r, "metrics", {}).items())])
            self.db.executemany("INSERT INTO client_metrics VALUES (?,?,?,?,?)",
                                [(run_id, r.round, x.client, k, v) for x in r.rows
                                 for k, v in sorted(getattr(x, "metrics", {}).items())])

    def mark_failed(self, run_id: str, cfg, error: str) -> None:
        """Record a run that failed before (or while) the engine ran it, under our claim (taken here if
        free), and release the claim. A run complete in the store is left as it is."""
        with self._tx(run_id, hold=True):
            status = self.status(run_id)
            if status == "complete":
                self._release(run_id, "released", "complete already")
                return
            self._release(run_id, "failed", error)
            if status is None:
                self.db.execute(
                    "INSERT INTO runs (run_id, config_json, method, dataset, label, data_digest, status, error, "
                    "created_at, finished_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (run_id, cfg.canonical_json(), cfg.method, cfg.dataset, cfg.method, "", "failed", error,
                     time.time(), time.time()))
            else:
                self.db.execute("UPDATE runs SET status='failed', error=?, finished_at=? WHERE run_id=?",
                                (error, time.time(), run_id))

    def finish_run(self, run_id: str, status: str = "complete", error: str | None = None) -> None:
        """Mark the run complete (or failed) and release our claim (``ClaimLost`` if it is not ours)."""
        with self._tx(run_id):
            self.db.execute("UPDATE runs SET status = ?, error = ?, finished_at = ? WHERE run_id = ?",
                            (status, error, time.time(), run_id))
            self._release(run_id, status, error)

    # --- reading ----------------------------------------------------------------------------------
    def runs(self, status: str | None = None) -> pd.DataFrame:
        """The ``runs`` table (only the runs of ``status``, e.g. ``complete``, if given)."""
        q = "SELECT * FROM runs" + (" WHERE status = ?" if status else "")
        return pd.read_sql_query(q, self.db, params=(status,) if status else ())

    def rounds(self, run_id: str) -> pd.DataFrame:
        """The run's ``rounds`` rows, by round."""
        return pd.read_sql_query("SELECT * FROM rounds WHERE run_id = ? ORDER BY round", self.db, params=(run_id,))

    def client_rounds(self, run_id: str) -> pd.DataFrame:
        """The run's ``client_rounds`` rows, by round and client."""
        return pd.read_sql_query("SELECT * FROM client_rounds WHERE run_id = ? ORDER BY round, client",
                                 self.db, params=(run_id,))

    def round_metrics(self, run_id: str) -> pd.DataFrame:
        """Long format: round, name, value."""
        return pd.read_sql_query("SELECT round, name, value FROM round_metrics WHERE run_id = ? ORDER BY round, name",
                                 self.db, params=(run_id,))

    def client_metrics(self, run_id: str) -> pd.DataFrame:
        """Long format: round, client, name, value (the run's ``client_metrics``)."""
        return pd.read_sql_query("SELECT round, client, name, value FROM client_metrics WHERE run_id = ? "
                                 "ORDER BY round, client, name", self.db, params=(run_id,))

    def clients(self, run_id: str) -> pd.DataFrame:
        """The run's ``clients`` rows (architecture, split sizes, class counts), by client."""
        return pd.read_sql_query("SELECT * FROM clients WHERE run_id = ? ORDER BY client", self.db,
                                 params=(run_id,))


class _Tx:
    def __init__(self, db, check=None):
        self.db = db
        self.check = check

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        if self.check is not None:
            try:
                self.check()
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def __exit__(self, exc_type, *_):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        return False
