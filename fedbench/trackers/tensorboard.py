"""TensorBoard event files: one folder per run (``<label>-<run id>``) under the log folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fedbench.trackers.base import RunMeta, Tracker


class TensorBoardTracker(Tracker):
    """Scalars by round (``add_scalar``), the config and tags as JSON text (``fedbench/config``,
    ``fedbench/tags``) and in the HParams dashboard, figures as images (``figures/<name>``)."""

    def __init__(self, where: str | None) -> None:
        self.root = Path(where or "runs")
        self.writer = None
        self.dir: Path | None = None

    def start(self, meta: RunMeta) -> None:
        """Open the run (see :meth:`fedbench.trackers.Tracker.start`)."""
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.dir = self.root / meta.folder
        if self.dir.exists():  # an earlier export of this run: replaced, not appended to
            shutil.rmtree(self.dir)
        self.writer = SummaryWriter(log_dir=str(self.dir))
        self.writer.add_text("fedbench/config", json.dumps(meta.params, sort_keys=True))
        self.writer.add_text("fedbench/tags", json.dumps(meta.tags, sort_keys=True))
        plain = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in meta.params.items()}
        for summary in hparams(plain, {})[:2]:  # the experiment and the session start, in this run's folder
            self.writer.file_writer.add_summary(summary)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Record one round's scalars at step ``step``."""
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)

    def artifacts(self, files: list[Path]) -> None:
        """Attach the report's files."""
        import matplotlib.image

        for f in files:
            if f.suffix == ".png":
                img = matplotlib.image.imread(f)[..., :3]
                self.writer.add_image(f"figures/{f.stem}", img, dataformats="HWC")

    def finish(self, status: str) -> None:
        """Close the run with its status."""
        self.writer.add_text("fedbench/status", status)
        self.writer.close()

    def location(self) -> str:
        """Where the run was written."""
        return str(self.dir)
