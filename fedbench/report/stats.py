"""Comparisons of methods across seeds: paired tests against the best method, Holm-corrected.

A seed fixes the data split of every method of a setting, so two methods' runs of one seed are a pair
(they saw the same clients' data). The default test is the **paired t-test** on the per-seed differences
d_i = best_i - other_i: t = mean(d) / (sd(d) / sqrt(n)), n - 1 degrees of freedom, two-sided; the
95 % confidence interval of the mean difference is mean(d) ± t_{0.975, n-1} sd(d) / sqrt(n) (not
corrected for multiplicity). The p-values of all methods compared with the best of one table column are
corrected together by **Holm**'s step-down rule (family-wise error at alpha). The **Wilcoxon signed-rank**
test (exact distribution) is reported beside it only where n >= 6: with n paired seeds its smallest
two-sided p is 2 / 2^n (0.0625 at n = 5), so below six seeds it could never reject at 0.05.

Runs are paired only where they share a partition digest: a pair whose digests differ is refused
(``ConfigError``, one line). ``welch`` (Welch's unpaired t-test on the two seed samples) stays available
for runs that do not share splits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from fedbench.errors import ConfigError, choice_error

TESTS = ("paired", "welch")
WILCOXON_MIN_N = 6  # 2 / 2^n < 0.05 first at n = 6
CI_LEVEL = 0.95


@dataclass(frozen=True)
class Comparison:
    """One method against the best of its column: n (pairs, or the smaller sample for Welch), the mean
    difference best - other (points), its CI (paired only), the raw and Holm-adjusted p, Wilcoxon's p."""
    n: int
    diff: float
    ci_low: float
    ci_high: float
    p: float
    p_holm: float = math.nan
    p_wilcoxon: float = math.nan


def check_test(test: str) -> str:
    if test not in TESTS:
        raise choice_error("--test", test, TESTS)
    return test


def paired_t(d: np.ndarray) -> tuple[float, float, float, float]:
    """(mean, p, ci_low, ci_high) of the paired t-test on differences ``d`` (n >= 2). Differences all
    equal: p = 1 if they are 0, else 0 (a difference without spread), the CI the point."""
    d = np.asarray(d, dtype=float)
    n = d.size
    m = float(d.mean())
    sd = float(d.std(ddof=1))
    if sd == 0:
        return m, (1.0 if m == 0 else 0.0), m, m
    se = sd / math.sqrt(n)
    t = m / se
    p = float(2 * stats.t.sf(abs(t), n - 1))
    half = float(stats.t.ppf(0.5 + CI_LEVEL / 2, n - 1)) * se
    return m, p, m - half, m + half


def wilcoxon_p(d: np.ndarray) -> float:
    """Two-sided exact Wilcoxon signed-rank p of differences ``d``; NaN below :data:`WILCOXON_MIN_N`
    pairs, 1 where every difference is 0."""
    d = np.asarray(d, dtype=float)
    if d.size < WILCOXON_MIN_N:
        return math.nan
    if not np.any(d != 0):
        return 1.0
    return float(stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided", method="exact").pvalue)


def welch_p(a: np.ndarray, b: np.ndarray) -> float:
    """Welch's unpaired t-test p; samples without spread: 1 if the means agree, else 0."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if np.std(a) + np.std(b) == 0:
        return 1.0 if np.mean(a) == np.mean(b) else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def holm(p: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as ``p``): the i-th smallest of m is multiplied by
    m - i + 1 (i from 1), made monotone by a running maximum, capped at 1."""
    p = np.asarray(p, dtype=float)
    order = np.argsort(p, kind="stable")
    m = p.size
    adj = np.empty(m)
    running = 0.0
    for i, k in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[k]))
        adj[k] = running
    return adj.tolist()


def _by_seed(runs: pd.DataFrame, column: str) -> pd.DataFrame:
    """seed -> (value, digest) of one method's runs in a setting (runs without a value left out)."""
    r = runs[runs[column].notna()]
    digest = r["split_digest"] if "split_digest" in r else pd.Series([None] * len(r), index=r.index)
    return pd.DataFrame({"seed": r["seed"].to_numpy(), "value": r[column].to_numpy(float) * 100,
                         "digest": digest.to_numpy()}).drop_duplicates("seed").set_index("seed")


def pair(best: pd.DataFrame, other: pd.DataFrame, column: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The two methods' values (points) of the seeds both ran, in seed order; ConfigError where a seed's
    two runs have different partition digests (they did not see the same split)."""
    a, b = _by_seed(best, column), _by_seed(other, column)
    seeds = sorted(set(a.index) & set(b.index))
    for s in seeds:
        da, db = a.at[s, "digest"], b.at[s, "digest"]
        if isinstance(da, str) and isinstance(db, str) and da and db and da != db:
            raise ConfigError(f"{where}: seed {s} has partition digest {da} for one method and {db} for the other; "
                              f"a paired test needs one split per seed (use --test welch for runs that do not "
                              f"share splits)")
    return a.loc[seeds, "value"].to_numpy(float), b.loc[seeds, "value"].to_numpy(float)


def compare_to_best(groups: dict[str, pd.DataFrame], best: str, column: str, test: str,
                    where: str) -> dict[str, Comparison]:
    """{variant: Comparison with ``best``} for every other variant with at least two usable seeds (pairs
    for ``paired``), the p-values Holm-corrected together."""
    check_test(test)
    out: dict[str, Comparison] = {}
    for v, runs in groups.items():
        if v == best:
            continue
        if test == "paired":
            a, b = pair(groups[best], runs, column, f"{where}, {best} vs {v}")
            if a.size < 2:
                continue
            d = a - b
            m, p, lo, hi = paired_t(d)
            out[v] = Comparison(int(d.size), m, lo, hi, p, p_wilcoxon=wilcoxon_p(d))
        else:
            a = groups[best][column].dropna().to_numpy(float) * 100
            b = runs[column].dropna().to_numpy(float) * 100
            if a.size < 2 or b.size < 2:
                continue
            out[v] = Comparison(int(min(a.size, b.size)), float(a.mean() - b.mean()), math.nan, math.nan,
                                welch_p(a, b))
    adj = holm([c.p for c in out.values()])
    return {v: Comparison(c.n, c.diff, c.ci_low, c.ci_high, c.p, p_holm=q, p_wilcoxon=c.p_wilcoxon)
            for (v, c), q in zip(out.items(), adj, strict=True)}


def describe_test(test: str, alpha: float, ns: set[int]) -> str:
    """The caption's sentence: the test, n and the correction."""
    if not ns:
        return "†: none (no method shares two seeds with the best)"
    n = f"n = {next(iter(ns))}" if len(ns) == 1 else f"n = {min(ns)}-{max(ns)}"
    if test == "paired":
        return (f"†: not significantly different from the best: paired t-test across seeds (runs paired by seed, "
                f"same partition; {n} pairs), Holm-corrected over the methods of the column, adjusted p ≥ {alpha}")
    return (f"†: not significantly different from the best: Welch's unpaired t-test across seeds ({n} per method), "
            f"Holm-corrected over the methods of the column, adjusted p ≥ {alpha}")
