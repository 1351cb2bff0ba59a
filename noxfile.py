"""nox sessions. They run in the current environment (venv_backend="none"): the project's
environment already holds torch (several GB), and re-installing it per session buys nothing.

    nox -s tests     the default suite (what CI runs)
    nox -s lint      ruff
    nox -s nightly   long runs on real CIFAR-10 (needs FEDBENCH_DATA_DIR)
"""

import sys

import nox

PY = sys.executable  # the environment nox itself runs in (it holds fedbench and torch)

nox.options.sessions = ["lint", "tests"]


@nox.session(venv_backend="none")
def tests(session):
    session.run(PY, "-m", "pytest", *session.posargs)


@nox.session(venv_backend="none")
def lint(session):
    session.run(PY, "-m", "ruff", "check", "fedbench", "baselines", "tests", "benchmarks", "noxfile.py")


@nox.session(venv_backend="none")
def nightly(session):
    """Real-data tests marked `nightly`, then the nightly ablation sweep and its report in reports/nightly/.

    Needs FEDBENCH_DATA_DIR with cifar10.npz. The sweep resumes: a killed night continues where it stopped.
    """
    session.run(PY, "-m", "pytest", "-m", "nightly", "-v", *session.posargs)
    store = "nightly.sqlite"
    session.run(PY, "-m", "fedbench", "sweep", "benchmarks/nightly.toml", "--results", store, "--jobs", "2")
    session.run(PY, "-m", "fedbench", "report", "--results", store, "--sweep", "nightly", "--out", "reports/nightly",
                "--statistic", "last", "--target", "0.8")


@nox.session(venv_backend="none")
def bench(session):
    """Speed suite on real CIFAR-10: ceiling, reference loop, engine (batch 64 and 10), scale. Writes JSON."""
    session.run(PY, "benchmarks/speed.py", "--out", "bench-64.json", *session.posargs)
    session.run(PY, "benchmarks/speed.py", "--batch-size", "10", "--out", "bench-10.json", *session.posargs)
    session.run(PY, "benchmarks/scale.py", "--out", "bench-scale.json", *session.posargs)
