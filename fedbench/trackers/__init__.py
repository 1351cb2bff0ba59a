"""Experiment trackers: a stored run (or one training) in TensorBoard, MLflow or Weights & Biases.

Each tracker is an optional extra (``pip install 'fedbench[tensorboard]'``, ``[mlflow]``, ``[wandb]``)
and a :class:`Tracker`: a writer for one run, told its identity (``start``), its rounds (``log``), the
report's figures (``artifacts``) and its end (``finish``). What it is told is read from the results
store (fedbench/trackers/source.py), so an export after the fact and a stream while the run trains
(``fedbench run --track``) write the same thing:

- per-round scalars under the store's names: the ``rounds`` columns (acc_mean, acc_weighted, wall_s,
  train_s, eval_s, server_macs, evaluated), the ``client_rounds`` columns summed over the round's clients
  (bytes_up, bytes_down, train_macs, eval_macs, train_samples, selected) and every ``round_metrics`` name;
  the step is the round;
- the resolved config as parameters (core options and the method's, by option name with underscores);
- the run id, label, command and provenance (versions, device, digests, sweep, status) as tags
  (``fedbench.run_id``, ``fedbench.label``, ...);
- the figures of the run's own report (``fedbench report`` of that run alone) as artifacts.
"""

from __future__ import annotations

import importlib.util

from fedbench.errors import ConfigError, choice_error
from fedbench.trackers.base import RunMeta as RunMeta
from fedbench.trackers.base import Tracker as Tracker

# tracker -> the module its extra installs
TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def require(kind: str, option: str) -> None:
    """ConfigError (one line: which extra to install) unless ``kind`` is a tracker whose package is
    installed. ``option`` names the option that asked for it (``--to``, ``--track``)."""
    if kind not in TRACKERS:
        raise choice_error(f"{option} tracker", kind, TRACKERS)
    if importlib.util.find_spec(TRACKERS[kind]) is None:
        raise ConfigError(f"{option} {kind} needs the {kind} extra, which is not installed: "
                          f"pip install 'fedbench[{kind}]' (in a checkout: pip install -e '.[{kind}]')")


def make_tracker(kind: str, where: str | None, *, experiment: str = "fedbench",
                 project: str = "fedbench") -> Tracker:
    """A writer for one run. ``where``: tensorboard: the log folder (default ``runs``); mlflow: a tracking
    URI or a local folder (default ``$MLFLOW_TRACKING_URI``, else ``mlruns``); wandb: the folder of its
    ``wandb/`` run folders (default ``.``; offline unless ``$WANDB_MODE`` says otherwise). ``experiment``:
    MLflow's experiment; ``project``: the W&B project."""
    if kind == "tensorboard":
        from fedbench.trackers.tensorboard import TensorBoardTracker
        return TensorBoardTracker(where)
    if kind == "mlflow":
        from fedbench.trackers.mlflow import MlflowTracker
        return MlflowTracker(where, experiment)
    from fedbench.trackers.wandb import WandbTracker
    return WandbTracker(where, project)


def parse_target(text: str, option: str = "--track") -> tuple[str, str | None]:
    """``KIND`` or ``KIND:WHERE`` (``tensorboard:runs``, ``mlflow:sqlite:///mlflow.db``) -> (kind, where),
    the tracker checked installed."""
    kind, sep, where = text.partition(":")
    kind = kind.strip().lower()
    require(kind, option)
    if sep and not where.strip():
        raise ConfigError(f"{option} {text!r}: nothing after the colon; give KIND or KIND:WHERE")
    return kind, where.strip() or None
