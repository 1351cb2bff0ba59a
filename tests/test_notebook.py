"""docs/tutorial.ipynb runs top to bottom on synthetic data (executed here, so it cannot rot)."""

import base64
import os
import sqlite3
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook extra is not installed (pip install 'fedbench[notebook]')")
nbclient = pytest.importorskip("nbclient", reason="the notebook extra is not installed (pip install 'fedbench[notebook]')")
pytest.importorskip("ipykernel", reason="the notebook extra is not installed (pip install 'fedbench[notebook]')")

NOTEBOOK = Path(__file__).resolve().parent.parent / "docs" / "tutorial.ipynb"
# where to keep the executed plot (a PNG), e.g. to look at it: FEDBENCH_TUTORIAL_PLOT=docs/tutorial-plot.png
PLOT_ENV = "FEDBENCH_TUTORIAL_PLOT"


def test_tutorial_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    root = str(NOTEBOOK.parent.parent)  # the kernel imports this checkout's fedbench
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    pngs = [o["data"]["image/png"] for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]
    assert len(pngs) == 1  # the custom plot
    if os.environ.get(PLOT_ENV):
        Path(os.environ[PLOT_ENV]).write_bytes(base64.b64decode(pngs[0]))
    db = sqlite3.connect(tmp_path / "tutorial-results.sqlite")
    methods = sorted(m for (m,) in db.execute("SELECT method FROM runs WHERE status = 'complete'"))
    assert methods == ["fedavg", "standalone"]
    assert (tmp_path / "tutorial-accuracy-vs-bytes.png").stat().st_size > 10_000
    report = (tmp_path / "tutorial-report" / "report.md").read_text()
    assert "2 complete runs" in report
