"""Paired comparisons across seeds (fedbench/report/stats.py) on tiny hand-made data: every expected
p-value, interval and correction is derived by hand below (closed forms of Student's t with 2 degrees of
freedom, the exact signed-rank distribution, Holm's rule)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from test_summaries import Round, Row, add_run

from fedbench.cli import main
from fedbench.errors import ConfigError
from fedbench.report.stats import compare_to_best, holm, paired_t, welch_p, wilcoxon_p
from fedbench.report.tables import accuracy_table, comparison_table
from fedbench.store import Store


def t2_two_sided_p(t: float) -> float:
    """Student's t with 2 df: F(t) = 1/2 + t / (2 sqrt(2 + t^2)), so the two-sided p is 1 - |t| / sqrt(2 + t^2)."""
    return 1 - abs(t) / math.sqrt(2 + t * t)


def t2_quantile(q: float) -> float:
    """Student's t with 2 df: the q-quantile is (2q - 1) / sqrt(2 q (1 - q))."""
    return (2 * q - 1) / math.sqrt(2 * q * (1 - q))


def test_paired_t_on_three_differences():
    # d = 1, 2, 3: mean 2, sd 1, se 1/sqrt(3), t = 2 sqrt(3), 2 df
    m, p, lo, hi = paired_t(np.array([1.0, 2.0, 3.0]))
    t = 2 * math.sqrt(3)
    assert m == 2.0
    assert p == pytest.approx(t2_two_sided_p(t), rel=1e-12)  # 0.0742
    half = t2_quantile(0.975) / math.sqrt(3)                # 4.3027 / sqrt(3)
    assert (lo, hi) == pytest.approx((2 - half, 2 + half), rel=1e-12)


def test_paired_t_without_spread():
    assert paired_t(np.array([0.5, 0.5]))[1] == 0.0   # the same nonzero difference in every seed
    assert paired_t(np.array([0.0, 0.0]))[1] == 1.0


def test_holm_step_down():
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1 = 0.03, 0.06, 0.04 -> running max 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_wilcoxon_exact_and_its_floor():
    # 6 positive differences: of the 2^6 sign patterns only all-plus and all-minus are as extreme: p = 2/64
    assert wilcoxon_p(np.arange(1.0, 7.0)) == pytest.approx(2 / 64)
    # one negative smallest difference: W- = 1; patterns with W- <= 1 are {} and {1}: p = 2 * 2/64
    assert wilcoxon_p(np.array([-1.0, 2, 3, 4, 5, 6])) == pytest.approx(4 / 64)
    assert math.isnan(wilcoxon_p(np.arange(1.0, 6.0)))  # n = 5: its smallest p, 2/32, cannot reach 0.05


def test_welch_matches_its_formula():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([4.0, 6.0, 8.0])
    va, vb = 1 / 3, 4 / 3                          # s^2 / n: 1/3 and 4/3
    t = (2 - 6) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)  # Welch-Satterthwaite: 50/17
    assert df == pytest.approx(50 / 17)
    from scipy import stats
    assert welch_p(a, b) == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-12)


def frame(values: dict[str, list[float]], digests: dict[str, list[str]] | None = None) -> pd.DataFrame:
    """Runs of one setting: per method, accuracy (fraction) per seed 0, 1, 2, ..."""
    rows = []
    for method, accs in values.items():
        for seed, a in enumerate(accs):
            rows.append({"method": method, "variant": method, "setting": "s", "seed": seed, "accuracy": a,
                         "split_digest": (digests or {}).get(method, [f"d{i}" for i in range(len(accs))])[seed],
                         "summary": "x", "summary_text": "x", "defined_min": 1, "population_max": 1,
                         "never_max": 0})
    return pd.DataFrame(rows)


# best "a"; "b" is 1, 2, 3 points below it in seeds 0, 1, 2 (a consistent gap Welch cannot see: the seeds
# move both methods by 10 points); "c" is 1, 1, 4 below
PAIRED = {"a": [0.80, 0.90, 0.70], "b": [0.79, 0.88, 0.67], "c": [0.79, 0.89, 0.66]}


def test_comparison_uses_seed_pairs_and_holm():
    groups = {v: g for v, g in frame(PAIRED).groupby("variant")}
    got = compare_to_best(groups, "a", "accuracy", "paired", "test")
    p_b = t2_two_sided_p(2 * math.sqrt(3))          # d = 1, 2, 3 points
    # d = 1, 1, 4: mean 2, sd sqrt(3), se 1, t = 2
    p_c = t2_two_sided_p(2.0)
    assert got["b"].p == pytest.approx(p_b) and got["c"].p == pytest.approx(p_c)
    assert got["b"].diff == pytest.approx(2.0) and got["b"].n == 3
    lo, hi = sorted([p_b, p_c])
    assert got["b"].p_holm == pytest.approx(2 * lo) and got["c"].p_holm == pytest.approx(max(2 * lo, hi))


def test_paired_marks_a_gap_welch_does_not():
    # b is 0.5 points below a in every seed; the seeds spread both by 10 points
    df = frame({"a": [0.800, 0.900, 0.700], "b": [0.795, 0.895, 0.695]})
    paired = accuracy_table(df, test="paired")
    welch = accuracy_table(df, test="welch")
    b_paired = next(r for r in paired.rows if r[0].text == "b")[1]
    b_welch = next(r for r in welch.rows if r[0].text == "b")[1]
    assert not b_paired.mark   # identical gap in every seed: p = 0, significantly worse
    assert b_welch.mark        # unpaired: the seed spread hides it
    assert "paired t-test" in paired.caption and "n = 3" in paired.caption and "Holm" in paired.caption


def test_comparison_table_lists_n_ci_and_wilcoxon_floor():
    t = comparison_table(frame(PAIRED))
    row = next(r for r in t.rows if r[2].text == "b")
    half = t2_quantile(0.975) / math.sqrt(3)
    assert row[3].text == "3" and row[4].text == "2.00"
    assert row[5].text == f"[{2 - half:.2f}, {2 + half:.2f}]"
    assert row[8].text.startswith("– (n < 6)")


def test_pairing_refuses_different_partitions():
    df = frame(PAIRED, digests={"a": ["d0", "d1", "d2"], "b": ["d0", "X", "d2"], "c": ["d0", "d1", "d2"]})
    with pytest.raises(ConfigError, match="seed 1 has partition digest d1 for one method and X"):
        accuracy_table(df, test="paired")
    accuracy_table(df, test="welch")  # unpaired: allowed


def _store_two_methods(path, digest_b: str) -> Store:
    store = Store(path)
    for method in ("standalone", "fd"):
        for seed, cor in enumerate((6, 8)):
            rid = f"{method}-{seed}"
            bump = 1 if method == "standalone" else 0
            add_run(store, rid, [Round(1, [Row(0, True, correct=cor + bump, total=10)])], method=method, seed=seed)
            digest = digest_b if (method == "fd" and seed == 1) else f"p{seed}"
            store.db.execute("UPDATE runs SET partition_digest = ? WHERE run_id = ?", (digest, rid))
    store.db.commit()
    return store


def test_report_refuses_to_pair_different_splits_exit_2(tmp_path, capsys):
    _store_two_methods(tmp_path / "s.sqlite", "other").close()
    with pytest.raises(SystemExit) as e:
        main(["report", "--results", str(tmp_path / "s.sqlite"), "--out", str(tmp_path / "r")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "partition digest" in err[0] and "--test welch" in err[0]
    assert not (tmp_path / "r").exists()
    with pytest.raises(SystemExit) as e:
        main(["report", "--results", str(tmp_path / "s.sqlite"), "--out", str(tmp_path / "r"), "--test", "welch"])
    assert e.value.code == 0
    assert (tmp_path / "r" / "comparisons.csv").exists()


def test_global_table_says_why_a_cell_is_empty():
    from fedbench.report.tables import global_accuracy_table
    rows = []
    for seed in (0, 1):
        rows.append({"method": "fedit", "variant": "fedit", "setting": "s", "seed": seed, "accuracy": 0.5,
                     "global_accuracy": 0.4 + seed / 100, "statistic": "last"})
        rows.append({"method": "fedsa-lora", "variant": "fedsa-lora", "setting": "s", "seed": seed, "accuracy": 0.6,
                     "global_accuracy": float("nan"), "statistic": "last"})
        rows.append({"method": "fedit", "variant": "fedit", "setting": "t", "seed": seed, "accuracy": 0.5,
                     "global_accuracy": 0.4, "statistic": "last"})
    df = pd.DataFrame(rows).assign(summary="x", summary_text="x", defined_min=1, population_max=1, never_max=0)
    t = global_accuracy_table(df)
    cells = {r[0].text: [c.text for c in r[1:]] for r in t.rows[1:]}
    assert cells["fedsa-lora"] == ["– (personalised method: no global model)", "– (not run)"]
    assert cells["fedit"][0].startswith("40.50")
    assert "evaluation protocol" in t.caption
