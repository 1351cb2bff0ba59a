"""Weights & Biases: offline run folders (``wandb/offline-run-*``, ``wandb sync`` uploads them) unless
``$WANDB_MODE`` says ``online`` (after ``wandb login``)."""

from __future__ import annotations

import os
from pathlib import Path

from fedbench.trackers.base import RunMeta, Tracker


class WandbTracker(Tracker):
    """One W&B run per fedbench run in project ``project``: named by the label, the config as its config
    (the provenance tags under its ``fedbench`` key), W&B tags method, dataset, protocol and run id, the
    command as its notes, scalars by round (step), the figures as an artifact ``report-<run id>`` of type
    ``fedbench-report``. W&B gives each export a run id of its own."""

    def __init__(self, where: str | None, project: str = "fedbench") -> None:
        self.dir, self.project = Path(where or "."), project
        self.run = None
        self.meta: RunMeta | None = None
        self.where = str(self.dir)

    def start(self, meta: RunMeta) -> None:
        """Open the run (see :meth:`fedbench.trackers.Tracker.start`)."""
        import wandb

        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta = meta
        tags = [meta.tags["fedbench.method"], meta.tags["fedbench.dataset"], meta.tags["fedbench.eval_protocol"],
                f"run_id={meta.run_id}"]
        self.run = wandb.init(mode=os.environ.get("WANDB_MODE", "offline"), dir=str(self.dir), project=self.project,
                              name=meta.label, notes=meta.tags["fedbench.command"], tags=tags,
                              config={**meta.params, "fedbench": meta.tags}, reinit="create_new",
                              settings=wandb.Settings(silent=True, console="off", x_disable_stats=True,
                                                      disable_git=True, save_code=False))
        self.where = str(Path(self.run.dir).parent)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Record one round's scalars at step ``step``."""
        self.run.log(scalars, step=step)

    def artifacts(self, files: list[Path]) -> None:
        """Attach the report's files."""
        import wandb

        art = wandb.Artifact(f"report-{self.meta.run_id}", type="fedbench-report")
        for f in files:
            art.add_file(str(f))
        self.run.log_artifact(art)

    def finish(self, status: str) -> None:
        """Close the run with its status."""
        self.run.finish(exit_code=0 if status == "complete" else 1)

    def location(self) -> str:
        """Where the run was written."""
        return self.where
