"""An MLflow tracking store: a local ``mlruns`` folder by default, any tracking URI the user sets."""

from __future__ import annotations

import os
import time
from pathlib import Path

from fedbench.trackers.base import RunMeta, Tracker

BATCH = 1000  # MLflow's limit of metrics per log_batch; params: 100


def tracking_uri(where: str | None) -> str:
    """A URI as it is (``sqlite:///mlflow.db``, ``http://host:5000``, ``databricks``); a folder as a file URI.
    MLflow 3 keeps its folder store in maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE``: fedbench opts
    in for a folder (a database URI needs MLflow's SQLAlchemy dependencies)."""
    where = where or os.environ.get("MLFLOW_TRACKING_URI") or "mlruns"
    if "://" in where or where.startswith("databricks"):
        return where
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return Path(where).expanduser().resolve().as_uri()


class MlflowTracker(Tracker):
    """One MLflow run per fedbench run in experiment ``experiment``: named by the label, the config as
    params, tags ``fedbench.*``, metrics by round (step), figures under the ``figures`` artifact folder.
    An earlier run with the same ``fedbench.run_id`` tag in the experiment is deleted."""

    def __init__(self, where: str | None, experiment: str = "fedbench") -> None:
        self.uri, self.experiment = tracking_uri(where), experiment
        self.client = None
        self.run_id: str | None = None

    def start(self, meta: RunMeta) -> None:
        """Open the run (see :meth:`fedbench.trackers.Tracker.start`)."""
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        exp = self.client.get_experiment_by_name(self.experiment)
        eid = exp.experiment_id if exp else self.client.create_experiment(self.experiment)
        for old in self.client.search_runs([eid], f"tags.`fedbench.run_id` = '{meta.run_id}'"):
            self.client.delete_run(old.info.run_id)
        run = self.client.create_run(eid, run_name=meta.label, tags=meta.tags)
        self.run_id = run.info.run_id
        params = [Param(k, str(v)) for k, v in sorted(meta.params.items())]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Record one round's scalars at step ``step``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in scalars.items()]
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + BATCH])

    def artifacts(self, files: list[Path]) -> None:
        """Attach the report's files."""
        for f in files:
            self.client.log_artifact(self.run_id, str(f), "figures")

    def finish(self, status: str) -> None:
        """Close the run with its status."""
        self.client.set_terminated(self.run_id, "FINISHED" if status == "complete" else "FAILED")

    def location(self) -> str:
        """Where the run was written."""
        return f"{self.uri} run {self.run_id}"
