"""Send stored runs to a tracker (``fedbench export``), or one run while it trains (``fedbench run --track``)."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from dataclasses import dataclass

from fedbench.callbacks import RunCallback, RunInfo
from fedbench.trackers import Tracker, make_tracker, parse_target
from fedbench.trackers.source import round_scalars, run_figures, run_meta


@dataclass(frozen=True)
class Exported:
    """One run sent to a tracker: its id, label and where the tracker holds it."""

    run_id: str
    label: str
    location: str


def send_run(store, run_id: str, tracker: Tracker, figures: bool = True) -> Exported:
    """Write one stored run to ``tracker``: start, every round, the figures, finish (its stored status)."""
    meta = run_meta(store, run_id)
    tracker.start(meta)
    for step, scalars in round_scalars(store, run_id).items():
        tracker.log(step, scalars)
    status = meta.tags["fedbench.status"]
    if figures and status == "complete":
        _attach_figures(store, run_id, tracker)
    tracker.finish("complete" if status == "complete" else "failed")
    return Exported(run_id, meta.label, tracker.location())


def _attach_figures(store, run_id: str, tracker: Tracker) -> None:
    files = run_figures(store, run_id)
    try:
        tracker.artifacts(files)
    finally:
        shutil.rmtree(files[-1].parent, ignore_errors=True)


class TrackerCallback(RunCallback):
    """Streams a training run to a tracker: its header at the start, each round as it is stored, the
    figures and the status at the end (what an export of the finished run writes)."""

    def __init__(self, tracker: Tracker, figures: bool = True) -> None:
        self.tracker, self.figures, self.store = tracker, figures, None

    def on_run_start(self, run: RunInfo) -> None:
        """Open the run in the tracker with its stored header (config, tags)."""
        from fedbench.store import Store
        self.store = Store(run.results)
        self.tracker.start(run_meta(self.store, run.run_id))

    def on_round_end(self, run: RunInfo, result) -> None:
        """Send the round's stored scalars."""
        for step, scalars in round_scalars(self.store, run.run_id, result.round).items():
            self.tracker.log(step, scalars)

    def on_run_end(self, run: RunInfo, status: str, error: str | None) -> None:
        """Attach the run's figures (when complete) and close it in the tracker."""
        try:
            if self.figures and status == "complete":
                _attach_figures(self.store, run.run_id, self.tracker)
            self.tracker.finish(status)
        finally:
            self.store.close()


def tracking_callbacks(targets: Iterable[str]) -> list[TrackerCallback]:
    """One streaming callback per ``--track`` target (``KIND`` or ``KIND:WHERE``), checked now."""
    parsed = [parse_target(t) for t in targets]
    return [TrackerCallback(make_tracker(kind, where)) for kind, where in parsed]
