"""nox sessions. They run in the current environment (venv_backend="none"): the project's
environment already holds torch (several GB), and re-installing it per session buys nothing.

    nox -s tests     the default suite (what CI runs)
    nox -s lint      ruff
    nox -s nightly   long runs on real CIFAR-10 (needs FEDBENCH_DATA_DIR)
"""

import nox

nox.options.sessions = ["lint", "tests"]


@nox.session(venv_backend="none")
def tests(session):
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(venv_backend="none")
def lint(session):
    session.run("ruff", "check", "fedbench", "baselines", "tests", "benchmarks", "noxfile.py")


@nox.session(venv_backend="none")
def nightly(session):
    """Real-data runs marked `nightly` (minutes each on a 2-core CPU)."""
    session.run("python", "-m", "pytest", "-m", "nightly", "-v", *session.posargs)
