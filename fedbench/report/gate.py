"""The regression gate of `fedbench compare`: a store (or a report's runs.csv) against a committed
reference report's runs.csv.

A *cell* is one configuration without its seed: every run option and method hyper-parameter of a row
but ``seed`` (the rows of one accuracy-table cell, over its seeds). For each cell of the reference:

* the reference's **seed band** is ``[min - tolerance, max + tolerance]`` of the reference's
  accuracies over its seeds (with one seed: its accuracy ± tolerance);
* the candidate's number is the mean accuracy over the candidate's seeds of that cell, under the
  reference's own summary (statistic, population, weighting, as its rows record them);
* the cell **offends** when that number lies outside the band (below: a regression; above: the
  reference no longer describes the code, so it is flagged too), or when the candidate has no run of
  the cell at all.

Cells the candidate has and the reference lacks are not judged (they are counted). Accuracies are
fractions, so ``tolerance = 0.02`` is two percentage points.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedbench.config import CORE_FIELDS
from fedbench.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_TOLERANCE = 0.02  # the CLI's default: imported by fedbench.cli, so pandas is imported only when used
SUMMARY_COLUMNS = ("statistic", "population", "weighting")


@dataclass(frozen=True)
class CellCheck:
    """One reference cell judged against the candidate."""

    name: str                 # the reference's variant and setting, as its tables name them
    low: float                # the band: reference min - tolerance ...
    high: float               # ... reference max + tolerance
    reference_seeds: int
    value: float | None       # the candidate's mean accuracy over its seeds; None: no run of this cell
    candidate_seeds: int

    @property
    def offends(self) -> bool:
        return self.value is None or not self.low <= self.value <= self.high  # NaN (undefined) offends too

    def line(self) -> str:
        band = f"[{100 * self.low:.2f}, {100 * self.high:.2f}] % ({self.reference_seeds} reference seed(s))"
        if self.value is None:
            return f"{self.name}: no complete run in the candidate; reference band {band}"
        where = ("below" if self.value < self.low else "above" if self.value > self.high
                 else "within" if self.low <= self.value <= self.high else "undefined, not within")
        return (f"{self.name}: accuracy {100 * self.value:.2f} % ({self.candidate_seeds} seed(s)) is {where} the "
                f"reference band {band}")


def read_runs_csv(path: Path) -> pd.DataFrame:
    """A report's ``runs.csv`` (the file, or the report folder holding it)."""
    import pandas as pd

    path = Path(path)
    if path.is_dir():
        path = path / "runs.csv"
    if not path.is_file():
        raise ConfigError(f"reference {path} does not exist (give a report's runs.csv or its folder)")
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not a report's runs.csv: {' '.join(str(e).split())}") from None
    missing = [c for c in ("seed", "accuracy", "method", *SUMMARY_COLUMNS) if c not in df.columns]
    if missing:
        raise ConfigError(f"{path} is not a report's runs.csv: no column {missing[0]}")
    return df


def reference_summary(ref: pd.DataFrame) -> dict[str, str]:
    """The one summary (statistic, population, weighting) the reference's rows were made under."""
    combos = ref[list(SUMMARY_COLUMNS)].drop_duplicates()
    if len(combos) != 1:
        raise ConfigError("the reference mixes summaries (" + "; ".join(
            ", ".join(map(str, r)) for r in combos.itertuples(index=False)) + "): compare one protocol at a time")
    return dict(zip(SUMMARY_COLUMNS, combos.iloc[0], strict=True))


def _as_read_back(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` as a CSV round trip types it, so that a store's frame compares like a runs.csv."""
    import pandas as pd
    return pd.read_csv(io.StringIO(df.to_csv(index=False)))


def _key_value(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool) or str(v) in ("True", "False"):
        return str(v)
    try:
        return repr(float(v))
    except (TypeError, ValueError):
        return str(v)


def _cell_keys(df: pd.DataFrame, columns: list[str]) -> pd.Series:
    def key(row) -> tuple:
        return tuple(_key_value(row[c]) if c in row.index else "" for c in columns)
    return df.apply(key, axis=1)


def key_columns(ref: pd.DataFrame) -> list[str]:
    """What makes a cell: the run options and method hyper-parameters of the reference, the seed left out."""
    return [c for c in ref.columns if (c in CORE_FIELDS and c != "seed") or c.startswith("hp_")]


def compare(reference: pd.DataFrame, candidate: pd.DataFrame,
            tolerance: float = DEFAULT_TOLERANCE) -> tuple[list[CellCheck], int]:
    """Every reference cell judged against ``candidate`` (both frames as a report's runs.csv holds
    them), and the number of candidate cells the reference lacks."""
    import pandas as pd

    if not tolerance >= 0:
        raise ConfigError(f"--tolerance must be >= 0, got {tolerance}")
    reference = _as_read_back(reference)
    cols = key_columns(reference)
    ref_keys = _cell_keys(reference, cols)
    mine_by_cell: dict[tuple, pd.Series] = {}
    if len(candidate):  # none: every reference cell offends
        candidate = _as_read_back(candidate)
        mine_by_cell = {k: rows["accuracy"].astype(float)
                        for k, rows in candidate.groupby(_cell_keys(candidate, cols), sort=False)}
    checks = []
    for k, rows in reference.groupby(ref_keys, sort=False):
        acc = rows["accuracy"].astype(float)
        mine = mine_by_cell.get(k, pd.Series([], dtype=float))
        first = rows.iloc[0]
        name = " · ".join(str(first[c]) for c in ("variant", "setting") if c in rows and pd.notna(first[c]))
        checks.append(CellCheck(name=name or str(first["method"]), low=float(acc.min()) - tolerance,
                                high=float(acc.max()) + tolerance, reference_seeds=len(acc),
                                value=float(mine.mean()) if len(mine) else None, candidate_seeds=len(mine)))
    return checks, len(set(mine_by_cell) - set(ref_keys))
