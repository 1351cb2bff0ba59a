"""Seaborn plots of a run frame. Each function returns the PNG paths it wrote."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _line_panels(long: pd.DataFrame, y: str, ylabel: str, path: Path) -> list[Path]:
    """One panel per setting: ``y`` against round, one line per variant with a band (sd) over seeds."""
    # rows concatenated from runs repeat index labels (0..n per run); with an undefined (NaN) point seaborn's
    # reindexing then fails
    long = long.reset_index(drop=True)
    settings = list(dict.fromkeys(long["setting"]))
    fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4), squeeze=False, sharey=True)
    for ax, s in zip(axes[0], settings, strict=True):
        sns.lineplot(data=long[long["setting"] == s], x="round", y=y, hue="variant", errorbar="sd", ax=ax)
        ax.set_title(s, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    return [_save(fig, path)]


def accuracy_curves(df: pd.DataFrame, curves: dict, out: Path) -> list[Path]:
    """The per-round series each run's summary reads (its population and weighting)."""
    rows = []
    for _, r in df.iterrows():
        c = curves[r["run_id"]].copy()
        c["variant"], c["setting"] = r["variant"], r["setting"]
        rows.append(c)
    if not rows:
        return []
    long = pd.concat(rows)
    long["accuracy"] *= 100
    kinds = df.drop_duplicates(["population", "weighting"])
    what = (f"{kinds['population'].iloc[0]} clients, {kinds['weighting'].iloc[0]}" if len(kinds) == 1
            else "per protocol's population and weighting")
    return _line_panels(long, "accuracy", f"local test accuracy (%), {what}", out / "accuracy_rounds.png")


def pareto_mask(cost: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """Points no other point beats on both lower cost and higher accuracy."""
    keep = np.ones(len(cost), bool)
    for i in range(len(cost)):
        dominated = (cost <= cost[i]) & (acc >= acc[i]) & ((cost < cost[i]) | (acc > acc[i]))
        keep[i] = not dominated.any()
    return keep


def accuracy_vs_cost(df: pd.DataFrame, out: Path) -> list[Path]:
    agg = df.groupby(["setting", "variant"], sort=False).agg(
        accuracy=("accuracy", "mean"), bytes=("bytes_round", "mean"), tflop=("client_tflop_round", "mean")).reset_index()
    agg["accuracy"] *= 100
    paths = []
    for col, label, fname in (("bytes", "bytes per round (up + down, all clients)", "accuracy_vs_bytes.png"),
                              ("tflop", "client TFLOP per round (2 × fvcore MACs)", "accuracy_vs_flops.png")):
        settings = list(dict.fromkeys(agg["setting"]))
        fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4), squeeze=False)
        for ax, s in zip(axes[0], settings, strict=True):
            sub = agg[agg["setting"] == s].copy()
            x = sub[col].to_numpy(float)
            sub["x"] = x
            sns.scatterplot(data=sub, x="x", y="accuracy", hue="variant", ax=ax, s=60)
            mask = pareto_mask(np.nan_to_num(x, nan=0.0), sub["accuracy"].to_numpy(float))
            front = sub[mask].sort_values("x")
            ax.plot(front["x"], front["accuracy"], "k--", lw=1, label="Pareto front")
            ax.set_xlabel(label + _zero_axis(ax, x))
            ax.set_ylabel("accuracy (%)")
            ax.set_title(s, fontsize=8)
            ax.legend(fontsize=7)
        paths.append(_save(fig, out / fname))
    return paths


def _zero_axis(ax, x: np.ndarray) -> str:
    """A log x axis that still shows zero-cost points: symmetric log (linear below the smallest positive
    value, 0 at the left edge) where any x is 0, plain log otherwise; the label's note."""
    pos = x[np.isfinite(x) & (x > 0)]
    if not pos.size:
        return ""
    if (x == 0).any():
        ax.set_xscale("symlog", linthresh=float(pos.min()))
        ax.set_xlim(left=-0.5 * float(pos.min()))  # the zero-cost points inside the frame, not on its edge
        return " (symlog; 0: none)"
    ax.set_xscale("log")
    return ""


def accuracy_vs_cumulative(df: pd.DataFrame, curves: dict, out: Path) -> list[Path]:
    """Accuracy (the series the accuracy table summarises) against the cumulative bytes and the cumulative
    client + server TFLOP spent up to each evaluated round, mean over seeds per round. A run's one-time
    sends are paid before round 1: an open circle at (one-time bytes, first accuracy) joined to the curve
    by a dotted line shows them; zero-byte methods sit at 0."""
    rows = []
    for _, r in df.iterrows():
        c = curves[r["run_id"]]
        if "cum_bytes" not in c:
            continue
        c = c.dropna(subset=["accuracy"]).assign(variant=r["variant"], setting=r["setting"],
                                                 once=r.get("bytes_once", np.nan))
        rows.append(c)
    if not rows:
        return []
    long = pd.concat(rows, ignore_index=True)
    long["accuracy"] *= 100
    mean = long.groupby(["setting", "variant", "round"], sort=False)[["accuracy", "cum_bytes", "cum_tflop", "once"]] \
        .mean().reset_index()
    settings = list(dict.fromkeys(mean["setting"]))
    paths = []
    for col, label, fname in (("cum_bytes", "cumulative bytes, up + down", "accuracy_vs_cumulative_bytes.png"),
                              ("cum_tflop", "cumulative TFLOP, clients + server", "accuracy_vs_cumulative_flops.png")):
        fig, axes = plt.subplots(1, len(settings), figsize=(5.5 * len(settings), 4), squeeze=False)
        for ax, s in zip(axes[0], settings, strict=True):
            sub = mean[mean["setting"] == s]
            for i, (v, g) in enumerate(sub.groupby("variant", sort=False)):
                color = f"C{i % 10}"
                ax.plot(g[col], g["accuracy"], "-", marker=".", color=color, label=v)
                once = g["once"].iloc[0]
                if col == "cum_bytes" and np.isfinite(once) and once > 0:
                    ax.plot([once, g[col].iloc[0]], [g["accuracy"].iloc[0]] * 2, ":", color=color)
                    ax.plot([once], [g["accuracy"].iloc[0]], "o", mfc="none", color=color)
            note = _zero_axis(ax, sub[col].to_numpy(float))
            ax.set_xlabel(label + note + ("; ○: one-time sends" if col == "cum_bytes" else ""))
            ax.set_ylabel("accuracy (%)")
            ax.set_title(s, fontsize=8)
            ax.legend(fontsize=7)
        paths.append(_save(fig, out / fname))
    return paths


def rank_mu_heatmaps(df: pd.DataFrame, out: Path) -> list[Path]:
    if not {"hp_rank", "hp_mu"} <= set(df.columns):
        return []
    sub = df[df["hp_rank"].notna() & df["hp_mu"].notna()]
    if sub["hp_rank"].nunique() < 2 or sub["hp_mu"].nunique() < 2:
        return []
    paths = []
    for s, g in sub.groupby("setting", sort=False):
        if g["hp_rank"].nunique() < 2 or g["hp_mu"].nunique() < 2:
            continue  # a heatmap needs both axes to vary within the setting
        piv = g.pivot_table(index="hp_rank", columns="hp_mu", values="accuracy", aggfunc="mean") * 100
        fig, ax = plt.subplots(figsize=(1.2 * piv.shape[1] + 2.5, 0.6 * piv.shape[0] + 2))
        sns.heatmap(piv, annot=True, fmt=".1f", cmap="viridis", ax=ax, cbar_kws={"label": "accuracy (%)"})
        ax.set_xlabel("mu")
        ax.set_ylabel("rank r")
        ax.set_title(f"FedLoRA rank × mu, {s}", fontsize=8)
        paths.append(_save(fig, out / f"rank_mu_{len(paths)}.png"))
    return paths


def accuracy_vs_clients(df: pd.DataFrame, out: Path) -> list[Path]:
    if df["clients"].nunique() < 2:
        return []
    d = df.copy()
    d["accuracy"] *= 100
    d["N (C)"] = d["clients"].astype(str) + " (" + d["fraction"].astype(str) + ")"
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.pointplot(data=d.sort_values("clients"), x="N (C)", y="accuracy", hue="variant", errorbar="sd", ax=ax,
                  dodge=0.3 if d["variant"].nunique() > 1 else False)  # seaborn divides by (hues - 1)
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=7)
    return [_save(fig, out / "accuracy_vs_clients.png")]


def metric_curves(df: pd.DataFrame, out: Path, metric: str = "agg_deviation",
                  ylabel: str = "aggregation error D_t (relative)") -> list[Path]:
    """A per-round metric (default: the aggregation error D_t), band over seeds, one panel per setting."""
    rows = []
    for _, r in df.iterrows():
        c = (r.get("metric_curves") or {}).get(metric)
        if c is None or len(c) == 0:
            continue
        rows.append(pd.DataFrame({"round": c.index, "value": c.to_numpy(), "variant": r["variant"],
                                  "setting": r["setting"]}))
    if not rows:
        return []
    return _line_panels(pd.concat(rows), "value", ylabel, out / f"{metric}_rounds.png")


def global_accuracy_curves(df: pd.DataFrame, curves: dict, out: Path) -> list[Path]:
    rows = []
    for _, r in df.iterrows():
        c = curves[r["run_id"]]
        if "global_accuracy" not in c or c["global_accuracy"].notna().sum() == 0:
            continue
        c = c.dropna(subset=["global_accuracy"]).copy()
        c["variant"], c["setting"] = r["variant"], r["setting"]
        rows.append(c)
    if not rows:
        return []
    long = pd.concat(rows)
    long["global_accuracy"] *= 100
    return _line_panels(long, "global_accuracy", "global-model accuracy (%), union of test splits",
                        out / "global_accuracy_rounds.png")
