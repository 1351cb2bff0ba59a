"""The swing table of reports/fedkd-swing/README.md, computed from the four folders' runs.csv.

    python benchmarks/fedkd_swing.py reports/fedkd-swing

Writes ``swing.csv`` there: per code (before / after the faithful KL and clip) and machine, the seed-42
last-round accuracy (%) under each numeric variant and the swing (max - min over the variants); per code
and variant, the difference between the two machines; per code, the span over every variant and both
machines; and per code and variant the seed spread (std over seeds, where more than one seed ran).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

FOLDERS = {("before", "Intel Xeon (AMX)"): "before", ("before", "AMD EPYC (AVX-512)"): "before-amd",
           ("after", "Intel Xeon (AMX)"): "after", ("after", "AMD EPYC (AVX-512)"): "after-amd"}
VARIANTS = {(True, True): "default", (False, False): "plain", (True, False): "cl", (False, True): "fused"}


def main(root: Path) -> None:
    runs = []
    for (code, machine), folder in FOLDERS.items():
        d = pd.read_csv(root / folder / "runs.csv")
        d = d.assign(code=code, machine=machine, accuracy=d["accuracy"] * 100,
                     variant=[VARIANTS[(bool(a), bool(b))] for a, b in zip(d["channels_last"], d["fused_sgd"],
                                                                            strict=True)])
        runs.append(d[["code", "machine", "variant", "seed", "accuracy"]])
    df = pd.concat(runs, ignore_index=True)
    s42 = df[df["seed"] == 42]
    rows = []
    for (code, machine), g in s42.groupby(["code", "machine"], sort=False):
        rows.append({"code": code, "what": f"swing over variants, {machine}", "value": g["accuracy"].max() - g["accuracy"].min()})
    for (code, variant), g in s42.groupby(["code", "variant"], sort=False):
        if g["machine"].nunique() == 2:
            rows.append({"code": code, "what": f"{variant}: Intel - AMD", "value": g["accuracy"].iloc[0] - g["accuracy"].iloc[1]})
    for code, g in s42.groupby("code", sort=False):
        rows.append({"code": code, "what": "span over variants and machines", "value": g["accuracy"].max() - g["accuracy"].min()})
    for (code, variant), g in df[df["machine"] == "Intel Xeon (AMX)"].groupby(["code", "variant"], sort=False):
        if len(g) > 1:
            rows.append({"code": code, "what": f"{variant}: std over seeds", "value": g["accuracy"].std(ddof=1)})
    out = pd.DataFrame(rows).round(4)
    out.to_csv(root / "swing.csv", index=False)
    print(out.to_string(index=False))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
