"""The significance marks of a committed report, recomputed from its runs.csv: the paired test by seed
(fedbench's default since the reports were made) beside the uncorrected Welch marks the report shows.

    python benchmarks/paired_marks.py reports/compare-cifar10/n10-c1 reports/compare-cifar10/n50-c0.2

For each folder it writes ``paired-marks.{md,csv}`` (per setting and method: mean, the old Welch p and
mark, the paired p, Holm's adjusted p and the new mark, the 95 % CI of the paired difference, in how many
seeds the best was ahead) and ``comparisons.{md,csv}`` (the table ``fedbench report`` now writes). The
stores are not committed; runs.csv holds each run's accuracy, seed and setting, which is all a test by
seed needs. It has no partition digest column (made before the report recorded one): the runs are
paired by seed, which in these sweeps fixes the split (every method of a seed ran on one partition).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from fedbench.report.stats import compare_to_best, pair, welch_p
from fedbench.report.tables import Cell, Table, comparison_table

ALPHA = 0.05


def marks(df: pd.DataFrame) -> Table:
    t = Table("paired-marks",
              f"Marks against the best method of each setting, old and new (local test accuracy, %). Old: Welch's "
              f"unpaired t-test, not corrected (the committed accuracy table's †, p ≥ {ALPHA}). New: paired t-test "
              f"by seed, Holm-corrected over the setting's methods († where adjusted p ≥ {ALPHA}). 'ahead': seeds "
              f"in which the best method's accuracy is higher, of the paired seeds. CI: 95 % CI of the mean paired "
              f"difference best − method (points).",
              ["setting", "method", "mean", "Welch p", "old †", "paired p", "Holm p", "new †", "best − method",
               "95 % CI", "ahead"])
    for s in dict.fromkeys(df["setting"]):
        sub = df[(df["setting"] == s) & df["accuracy"].notna()]
        groups = {v: g for v, g in sub.groupby("variant", sort=True)}
        if len(groups) < 2:
            continue
        means = {v: g["accuracy"].mean() * 100 for v, g in groups.items()}
        best = max(means, key=means.get)
        new = compare_to_best(groups, best, "accuracy", "paired", s)
        t.rows.append([Cell(s), Cell(best), Cell(f"{means[best]:.2f}")] + [Cell("best")] * 2 + [Cell("")] * 6)
        for v, c in new.items():
            old_p = welch_p(groups[best]["accuracy"].to_numpy(float) * 100, groups[v]["accuracy"].to_numpy(float) * 100)
            a, b = pair(groups[best], groups[v], "accuracy", s)
            t.rows.append([Cell(s), Cell(v), Cell(f"{means[v]:.2f}"), Cell(f"{old_p:.4f}"),
                           Cell("†" if old_p >= ALPHA else ""), Cell(f"{c.p:.4f}"), Cell(f"{c.p_holm:.4f}"),
                           Cell("†" if c.p_holm >= ALPHA else ""), Cell(f"{c.diff:.2f}"),
                           Cell(f"[{c.ci_low:.2f}, {c.ci_high:.2f}]"), Cell(f"{int(np.sum(a > b))}/{a.size}")])
    return t


def main(folders: list[str]) -> None:
    for folder in map(Path, folders):
        df = pd.read_csv(folder / "runs.csv")
        for table in (marks(df), comparison_table(df)):
            (folder / f"{table.name}.md").write_text(table.to_markdown())
            (folder / f"{table.name}.csv").write_text(table.to_csv())
            print(f"{folder}/{table.name}.md")
        print(marks(df).to_markdown())


if __name__ == "__main__":
    main(sys.argv[1:])
