"""What every tracker writer is: a run's identity as trackers name it (:class:`RunMeta`) and the writer's
interface (:class:`Tracker`), apart from the package so that each tracker module imports only this."""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunMeta:
    """A run as a tracker names it.

    Attributes:
        run_id: the run's id in the store.
        label: the method's label (the tracker's run name).
        params: the resolved config, flat: option name -> value (method options beside core ones).
        tags: ``fedbench.<key>`` -> text: run_id, label, command, method, dataset, eval_protocol, status,
            sweep, device, data_digest, partition_digest, versions (JSON), results (the store's path).
    """

    run_id: str
    label: str
    params: dict[str, Any]
    tags: dict[str, str]

    @property
    def folder(self) -> str:
        """A folder name for the run: its label made path-safe, then its id."""
        return f"{re.sub(r'[^A-Za-z0-9._=-]+', '_', self.label).strip('_')}-{self.run_id}"


class Tracker(abc.ABC):
    """One run's writer in one tracker. Subclasses implement every method."""

    @abc.abstractmethod
    def start(self, meta: RunMeta) -> None:
        """Open the run in the tracker (an earlier export of the same run id is replaced where the tracker
        allows it), with its parameters and tags."""

    @abc.abstractmethod
    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Record round ``step``'s scalars."""

    @abc.abstractmethod
    def artifacts(self, files: list[Path]) -> None:
        """Attach files (the report's figures, PNG; its report.html)."""

    @abc.abstractmethod
    def finish(self, status: str) -> None:
        """Close the run: ``status`` "complete" or "failed"."""

    @abc.abstractmethod
    def location(self) -> str:
        """Where the run was written (a folder, or a tracking URI and run id)."""
