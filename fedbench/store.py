"""SQLite results store: one row per run, per round and per client-round, written round by round.

A run is identified by the hash of its resolved config plus the dataset's content digest. It is
marked ``complete`` only after its last round is written; an incomplete run is restarted from
scratch (its partial rows are replaced in one transaction).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
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
"""
RUN_TABLES = ("runs", "clients", "rounds", "client_rounds", "round_metrics", "client_metrics")


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


class Store:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        check_results_path(self.path)
        self.db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.db.execute("PRAGMA busy_timeout = 60000")
        try:
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise ConfigError(f"--results {self.path} is not a usable fedbench store: {e}") from None

    def close(self) -> None:
        self.db.close()

    def _tx(self):
        return _Tx(self.db)

    # --- runs -------------------------------------------------------------------------------------
    def status(self, run_id: str) -> str | None:
        row = self.db.execute("SELECT status FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return row[0] if row else None

    def start_run(self, run_id: str, cfg, label: str, data_digest: str, partition_digest: str,
                  versions: dict, device: str, command: str, clients: list[dict], sweep: str | None = None) -> None:
        """Create (or reset an incomplete) run with its client table, in one transaction."""
        with self._tx():
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
        acc_mean, acc_w = r.accuracy()
        with self._tx():
            self.db.execute("INSERT INTO rounds VALUES (?,?,?,?,?,?,?,?,?)",
                            (run_id, r.round, r.wall_s, r.train_s, r.eval_s, r.server_macs, int(r.evaluated),
                             acc_mean, acc_w))
            self.db.executemany(
                "INSERT INTO client_rounds VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                [(run_id, r.round, x.client, int(x.selected), x.bytes_up, x.bytes_down, x.train_macs,
                  x.eval_macs, x.train_samples, x.correct, x.total) for x in r.rows])
            self.db.executemany("INSERT INTO round_metrics VALUES (?,?,?,?)",
                                [(run_id, r.round, k, v) for k, v in sorted(getattr(r, "metrics", {}).items())])
            self.db.executemany("INSERT INTO client_metrics VALUES (?,?,?,?,?)",
                                [(run_id, r.round, x.client, k, v) for x in r.rows
                                 for k, v in sorted(getattr(x, "metrics", {}).items())])

    def mark_failed(self, run_id: str, cfg, error: str) -> None:
        """Record a run that failed before (or while) the engine ran it."""
        with self._tx():
            if self.status(run_id) is None:
                self.db.execute(
                    "INSERT INTO runs (run_id, config_json, method, dataset, label, data_digest, status, error, "
                    "created_at, finished_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (run_id, cfg.canonical_json(), cfg.method, cfg.dataset, cfg.method, "", "failed", error,
                     time.time(), time.time()))
            else:
                self.db.execute("UPDATE runs SET status='failed', error=?, finished_at=? WHERE run_id=?",
                                (error, time.time(), run_id))

    def finish_run(self, run_id: str, status: str = "complete", error: str | None = None) -> None:
        with self._tx():
            self.db.execute("UPDATE runs SET status = ?, error = ?, finished_at = ? WHERE run_id = ?",
                            (status, error, time.time(), run_id))

    # --- reading ----------------------------------------------------------------------------------
    def runs(self, status: str | None = None) -> pd.DataFrame:
        q = "SELECT * FROM runs" + (" WHERE status = ?" if status else "")
        return pd.read_sql_query(q, self.db, params=(status,) if status else ())

    def rounds(self, run_id: str) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM rounds WHERE run_id = ? ORDER BY round", self.db, params=(run_id,))

    def client_rounds(self, run_id: str) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM client_rounds WHERE run_id = ? ORDER BY round, client",
                                 self.db, params=(run_id,))

    def round_metrics(self, run_id: str) -> pd.DataFrame:
        """Long format: round, name, value."""
        return pd.read_sql_query("SELECT round, name, value FROM round_metrics WHERE run_id = ? ORDER BY round, name",
                                 self.db, params=(run_id,))

    def client_metrics(self, run_id: str) -> pd.DataFrame:
        return pd.read_sql_query("SELECT round, client, name, value FROM client_metrics WHERE run_id = ? "
                                 "ORDER BY round, client, name", self.db, params=(run_id,))

    def clients(self, run_id: str) -> pd.DataFrame:
        return pd.read_sql_query("SELECT * FROM clients WHERE run_id = ? ORDER BY client", self.db,
                                 params=(run_id,))


class _Tx:
    def __init__(self, db):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, *_):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        return False
