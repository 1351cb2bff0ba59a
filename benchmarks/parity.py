#!/usr/bin/env python
"""Accuracy parity of fedbench's numeric fast paths, from a results store.

    fedbench sweep benchmarks/parity-cifar10.toml --results parity.sqlite --jobs 1
    python benchmarks/parity.py --results parity.sqlite --out benchmarks/results/parity-cifar10.md

Groups the complete runs whose configs differ only in the numeric switches (``precision``,
``channels_last``, ``fused_sgd``) and prints, per group, the plain fp32 run (no switch on) against each
variant: final accuracy, mean of the last 10 rounds (clients unweighted, as `fedbench run` prints), the
difference in points and whether it is within the bar (1 point, issue 5), and the mean wall seconds per
round with the speed-up. The run ids trace every number to its per-client rows in the store.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SWITCHES = ("precision", "channels_last", "fused_sgd")
PLAIN = {"precision": "fp32", "channels_last": False, "fused_sgd": False}


def _accuracy(store, run_id: str) -> tuple[float, float, int]:
    from fedbench.report.frame import accuracy_series
    acc = accuracy_series(store.client_rounds(run_id))["acc_mean"].to_numpy(dtype=float)
    return float(acc[-1]), float(acc[-10:].mean()), len(acc)


def parity_rows(store, bar: float = 1.0) -> list[dict]:
    runs = store.runs(status="complete")
    groups: dict[str, list[dict]] = {}
    for _, r in runs.iterrows():
        cfg = json.loads(r["config_json"])
        sw = {k: cfg.get(k, PLAIN[k]) for k in SWITCHES}
        rest = {k: v for k, v in cfg.items() if k not in SWITCHES}
        groups.setdefault(json.dumps(rest, sort_keys=True), []).append({"run_id": r["run_id"], "switches": sw,
                                                                        "method": cfg["method"]})
    rows = []
    for members in groups.values():
        plain = [m for m in members if m["switches"] == PLAIN]
        if not plain or len(members) < 2:
            continue
        p = plain[0]
        p_last, p_l10, _ = _accuracy(store, p["run_id"])
        p_wall = float(store.rounds(p["run_id"])["wall_s"].mean())
        for m in members:
            last, l10, n = _accuracy(store, m["run_id"])
            wall = float(store.rounds(m["run_id"])["wall_s"].mean())
            on = [k if not isinstance(v, str) else f"{v}" for k, v in m["switches"].items() if v != PLAIN[k]]
            d_last, d_l10 = 100 * (last - p_last), 100 * (l10 - p_l10)
            rows.append({"method": m["method"], "variant": " + ".join(on) or "plain fp32", "run_id": m["run_id"],
                         "rounds": n, "acc_last": last, "acc_last10": l10, "delta_last_pts": d_last,
                         "delta_last10_pts": d_l10, "within_bar": m is p or (abs(d_last) <= bar and abs(d_l10) <= bar),
                         "wall_s_per_round": wall, "speedup": p_wall / wall})
    return sorted(rows, key=lambda r: (r["method"], r["variant"] != "plain fp32", r["variant"]))


def markdown(rows: list[dict], bar: float) -> str:
    head = ("| method | variant | run | last | mean of last 10 | Δ last (pts) | Δ last 10 (pts) | within "
            f"{bar:g} pt | s/round | speed-up |\n|---|---|---|---:|---:|---:|---:|---|---:|---:|\n")
    body = "".join(
        f"| {r['method']} | {r['variant']} | `{r['run_id']}` | {100 * r['acc_last']:.2f}% | {100 * r['acc_last10']:.2f}% "
        f"| {r['delta_last_pts']:+.2f} | {r['delta_last10_pts']:+.2f} | {'yes' if r['within_bar'] else 'NO'} | "
        f"{r['wall_s_per_round']:.1f} | {r['speedup']:.2f}x |\n" for r in rows)
    return head + body


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", required=True, help="SQLite results store")
    ap.add_argument("--bar", type=float, default=1.0, help="largest accuracy difference allowed, in points")
    ap.add_argument("--out", help="also write the table (markdown) here")
    a = ap.parse_args(argv)
    from fedbench.store import Store
    if not Path(a.results).exists():
        print(f"parity: error: --results {a.results} does not exist", file=sys.stderr)
        return 2
    store = Store(a.results)
    try:
        rows = parity_rows(store, a.bar)
    finally:
        store.close()
    text = markdown(rows, a.bar)
    print(text)
    if a.out:
        Path(a.out).write_text(f"Accuracy parity (from `{a.results}`; `python benchmarks/parity.py --results "
                               f"{a.results}`). s/round is wall time as stored (machine load varies).\n\n" + text)
    return 0 if all(r["within_bar"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
