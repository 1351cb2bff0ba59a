"""What a training run tells the code watching it: the declared interface of ``fedbench.run(callbacks=...)``.

A callback sees a run that is being trained (never one shown from the store): ``on_run_start`` once its
header is stored (the ``runs`` and ``clients`` rows exist), ``on_round_end`` after each round is stored
(its ``rounds``, ``client_rounds``, ``round_metrics`` and ``client_metrics`` rows are readable from
``run.results``), ``on_run_end`` once the run is marked complete or failed. The command line's progress
bar and the experiment trackers' live streaming (``fedbench run --track``) are callbacks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedbench.config import RunConfig
    from fedbench.engine.simulation import RoundResult


@dataclass(frozen=True)
class RunInfo:
    """The run a callback is watching.

    Attributes:
        run_id: the run's id in the store (hash of its resolved config and its data's digest).
        label: the method's label with its non-default variant options, e.g. ``fedkd (temperature=2)``.
        config: the resolved config.
        command: the command recorded with the run.
        results: the SQLite results store the run is written to.
    """

    run_id: str
    label: str
    config: RunConfig
    command: str
    results: Path


class RunCallback:
    """Base class of run callbacks: override the hooks you need (each does nothing here).

    An exception raised by a hook stops the run, which is then stored as failed.
    """

    def on_run_start(self, run: RunInfo) -> None:
        """Called once the run's header is stored, before its first round trains."""

    def on_round_end(self, run: RunInfo, result: RoundResult) -> None:
        """Called after round ``result.round`` is stored; ``result`` is the engine's record of it."""

    def on_run_end(self, run: RunInfo, status: str, error: str | None) -> None:
        """Called once: ``status`` "complete" (``error`` None) or "failed" (``error`` says why)."""
