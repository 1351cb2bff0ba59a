"""Readings that hold: every number a report README quotes is one its report's data contain.

For each ``reports/<name>/README.md`` the data are the tables ``fedbench report`` and the scripts in
``benchmarks/`` wrote in that folder and below it (every ``*.csv`` and every generated ``*.md`` table:
cells and notes) and the per-run values of ``runs.csv`` (accuracies as fractions are compared x 100).
``reports/README.md`` is read against the data of every report folder, and so are the paragraphs of the
main ``README.md`` that name a ``reports/`` folder (the rest of it quotes benchmarks, not reports).

A quoted number is checked when it has a decimal point or a unit: a percentage, a ratio or bytes
(``89 %``, ``65.34``, ``29x``, ``2.68 MB``); integers without a unit (counts, rounds, seeds, N = 10) are
settings and are not. It holds
where some data value rounds to it at the quoted precision (``88.7`` holds for 88.67); a number with a
byte unit holds against data values in the same unit. Left out: code spans and fenced code (commands,
paths), version numbers (``2.14.1``), and the short per-file :data:`SETTINGS` list of decimals that are
settings or facts from elsewhere (a learning rate, a published figure), each with its reason.
"""

from __future__ import annotations

import math
import re
from functools import cache
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "reports"
UNITS = {"B": 1.0, "kB": 1e3, "MB": 1e6, "GB": 1e9}
BYTE_COLUMNS = ("bytes_up_round", "bytes_down_round", "bytes_round", "bytes_to_target", "bytes_once")
# the measured per-run values of runs.csv a README may quote (not its settings: those are quoted as settings)
METRIC_COLUMNS = ("accuracy", "global_accuracy", "fair_std", "fair_worst10", "fair_min", "rounds_to_target",
                  "client_tflop_round", "server_tflop_round", "client_tflop_to_target", "server_tflop_to_target",
                  "wall_s", *BYTE_COLUMNS)
# decimals quoted as settings or as facts from outside the report's data, per README (path relative to the
# repository), each with the reason
SETTINGS: dict[str, dict[str, str]] = {
    "reports/compare-cifar10/README.md": {"126.5": "minutes of wall clock the N = 10 sweep took (its log)"},
    "reports/README.md": {"126.5": "minutes of wall clock the N = 10 sweep took (its log)"},
    "README.md": {"35.7 %": "the lora-vision report's backbone, from its pretraining sidecar",
                  "56.7 %": "the lora-vision report's backbone, from its pretraining sidecar",
                  "34.1 %": "the lora-vision report's backbone, from its pretraining sidecar"},
    "reports/lora-vision/README.md": {
        "35.7 %": "the ViT's CIFAR-100 test accuracy, from its pretraining sidecar",
        "56.7 %": "the ViT's CIFAR-10 linear probe, from its pretraining sidecar",
        "34.1 %": "the linear probe of the random initialisation, from the pretraining sidecar"},
    "reports/screenshots/README.md": {"0.00": "the single-seed cell text of the old page, quoted",
                                      "16.7": "the figures' smallest text in px, measured by tests/browser_page.py"},
}

NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?:\s?(kB|MB|GB|B)\b|\s?(%|x\b|×))?(?![\w.]*\d)")
VERSION = re.compile(r"\d+\.\d+\.\d+")


def prose(text: str) -> str:
    """The README without fenced code, inline code, link targets and version numbers."""
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    text = re.sub(r"`[^`]*`", " ", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return VERSION.sub(" ", text)


def quoted(text: str) -> list[tuple[str, str | None]]:
    """(number, unit) of every checked number: decimals, and numbers with a unit: percentages, ratios
    (``29x``), bytes (``812 kB``); unit '%', 'x', '×', a byte unit or None."""
    out = []
    for m in NUMBER.finditer(prose(text)):
        num, unit = m.group(1), m.group(2) or m.group(3)
        if "." in num or unit:
            out.append((num, unit))
    return out


CELL_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e-?\d+)?(?:\s?(kB|MB|GB|B)\b)?")


@cache
def data_values(folder: Path) -> tuple[frozenset, dict]:
    """(plain values, {unit: values}) of the data under ``folder``."""
    plain: set[float] = set()
    units: dict[str, set[float]] = {u: set() for u in UNITS}
    texts = [p.read_text() for p in folder.rglob("*.csv")]
    texts += [p.read_text() for p in folder.rglob("*.md") if p.name != "README.md"]
    for text in texts:
        for m in CELL_NUMBER.finditer(text):
            v = float(m.group(0).split()[0].rstrip("kMGB"))
            (units[m.group(1)] if m.group(1) else plain).add(v)
    for runs in folder.rglob("runs.csv"):
        df = pd.read_csv(runs)
        metrics = [c for c in df.columns if c in METRIC_COLUMNS or c.startswith(("ppl_", "agg_deviation"))]
        for c in metrics:
            vals = df[c].dropna().astype(float)
            if c in BYTE_COLUMNS:
                for u, div in UNITS.items():
                    units[u].update(vals / div)
            plain.update(vals)
            if vals.between(0, 1).all():
                plain.update(vals * 100)
        means = df.groupby([k for k in ("variant", "setting") if k in df])[metrics].mean()
        for c in metrics:
            vals = means[c].dropna().astype(float)
            plain.update(vals)
            if vals.between(0, 1).all():
                plain.update(vals * 100)
    return frozenset(plain), {u: frozenset(v) for u, v in units.items()}


def holds(num: str, unit: str | None, folder: Path) -> bool:
    x = float(num)
    decimals = len(num.split(".")[1]) if "." in num else 0
    tol = 0.5 * 10 ** -decimals + 1e-9
    plain, units = data_values(folder)
    pool = units[unit] if unit in UNITS else plain
    return any(math.isclose(v, x, abs_tol=tol) or abs(v - x) <= tol for v in pool)


def readmes() -> list[tuple[Path, Path]]:
    """(README, the folder whose data it is read against)."""
    out = [(p, p.parent) for p in sorted(REPORTS.glob("*/README.md"))]
    return out + [(REPORTS / "README.md", REPORTS), (ROOT / "README.md", REPORTS)]


def report_paragraphs(text: str) -> str:
    """The paragraphs (blank-line separated) that name a reports/ folder."""
    return "\n\n".join(p for p in re.split(r"\n\s*\n", text) if "reports/" in p)


def unheld(readme: Path, folder: Path) -> list[str]:
    allowed = SETTINGS.get(str(readme.relative_to(ROOT)) if readme.is_relative_to(ROOT) else "", {})
    text = readme.read_text()
    if readme == ROOT / "README.md":
        text = report_paragraphs(text)
    bad = []
    for num, unit in quoted(text):
        shown = num + (f" {unit}" if unit else "")
        if shown in allowed or num in allowed:
            continue
        if not holds(num, unit, folder):
            bad.append(shown)
    return bad


@pytest.mark.parametrize("readme,folder", readmes(), ids=[str(p.relative_to(ROOT)) for p, _ in readmes()])
def test_readme_numbers_are_in_the_data(readme, folder):
    bad = unheld(readme, folder)
    assert not bad, f"{readme.relative_to(ROOT)} quotes numbers its data do not hold: {', '.join(dict.fromkeys(bad))}"


def test_checker_catches_a_number_the_data_do_not_hold(tmp_path):
    (tmp_path / "t.csv").write_text("method,acc\nx,88.67 ± 0.95 (3)\ny,2.70 MB\n")
    (tmp_path / "README.md").write_text("x reaches 88.67 (88.7 rounded, 89 %), spread 0.95, y sends 2.70 MB; "
                                        "`lr 0.013` in code, torch 2.14.1; x is 88.76; y sends 2.7 kB; z 31 %; 88x more.")
    assert quoted("a 1.5 b 2 c 30 % d 4.0 MB e `7.5` f 2.14.1 g 29x") == [("1.5", None), ("30", "%"), ("4.0", "MB"),
                                                                         ("29", "x")]
    assert unheld(tmp_path / "README.md", tmp_path) == ["88.76", "2.7 kB", "31 %", "88 x"]
