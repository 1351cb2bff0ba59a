"""Seaborn plots of a run frame. Each function returns the PNG paths it wrote."""

from __future__ import annotations

import functools
import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.text  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

# Page geometry the figures are drawn for (fedbench.report.build lays the page out to match): a figure is
# at most PAGE_WIDTH_PX wide at DPI, so the page shows it at its natural size, and its smallest text is
# TEXT_PT points, TEXT_PT x DPI / 72 = 16.7 px: not smaller than the page's 16 px body text.
DPI = 100
PAGE_WIDTH_PX = 1100
TEXT_PT = 12
PANEL_IN = (5.4, 4.0)   # one panel; two panels per row fill PAGE_WIDTH_PX
COLUMNS = 2
TEXT_PX_KEY = "fedbench-text-px"  # PNG text chunk: the smallest text of the figure in pixels, at natural size
STYLE = {"font.size": TEXT_PT, "axes.titlesize": TEXT_PT, "axes.labelsize": TEXT_PT, "xtick.labelsize": TEXT_PT,
         "ytick.labelsize": TEXT_PT, "legend.fontsize": TEXT_PT, "legend.title_fontsize": TEXT_PT,
         "figure.titlesize": TEXT_PT, "figure.dpi": DPI, "savefig.dpi": DPI}


def _styled(fn):
    """Draw under STYLE (the rc settings apply to what is drawn inside, and are restored after)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with plt.rc_context(STYLE):
            return fn(*args, **kwargs)
    return wrapper


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


def _fit_text(fig) -> None:
    """Wrap each panel's title and axis labels to the panel (at TEXT_PT a long setting name or axis label
    would run into the next panel)."""
    for ax in fig.axes:
        width = ax.get_position().width * fig.get_figwidth() * 72 / (0.55 * TEXT_PT)  # characters that fit
        ax.set_title(_wrap(ax.get_title(), int(width)))
        ax.set_xlabel(_wrap(ax.get_xlabel(), int(width)))
        height = ax.get_position().height * fig.get_figheight() * 72 / (0.55 * TEXT_PT)
        ax.set_ylabel(_wrap(ax.get_ylabel(), int(height)))


def _grid(n: int, **kw):
    """A figure of ``n`` panels, COLUMNS to a row (a wrapping grid), and the panels as a flat list."""
    cols = min(COLUMNS, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL_IN[0] * cols, PANEL_IN[1] * rows), squeeze=False, **kw)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.remove()
    return fig, flat[:n]


def _shared_legend(fig, axes) -> None:
    """One legend for the figure, under the panels, in place of each panel's own."""
    seen = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(lab, h)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    if seen:  # as many columns as fit the figure's width (a character ~0.6 em, a handle ~5 characters)
        fits = fig.get_figwidth() * 72 / (0.6 * TEXT_PT) / (max(map(len, seen)) + 5)
        cols = max(1, min(len(seen), int(fits)))
        fig.legend(list(seen.values()), list(seen), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=cols,
                   frameon=False)


def _smallest_text_px(fig) -> float:
    sizes = [t.get_fontsize() for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text().strip()]
    return min(sizes) * DPI / 72 if sizes else math.inf


def _save(fig, path: Path) -> Path:
    _fit_text(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, bbox_inches="tight", metadata={TEXT_PX_KEY: f"{_smallest_text_px(fig):.2f}"})
    plt.close(fig)
    return path


def _evaluated_more_than_once(long: pd.DataFrame, y: str) -> pd.DataFrame:
    """The rows of the runs (column ``run_id``) with more than one round where ``y`` is defined: a
    per-round line needs two points."""
    long = long.reset_index(drop=True)
    points = long[y].notna().groupby(long["run_id"]).transform("sum")
    return long[points > 1]


def _palette(variants) -> dict:
    """One colour per variant, the same in every panel of a figure."""
    variants = list(dict.fromkeys(variants))
    return dict(zip(variants, sns.color_palette(n_colors=len(variants)), strict=True))


def _line_panels(long: pd.DataFrame, y: str, ylabel: str, path: Path) -> list[Path]:
    """One panel per setting: ``y`` against round, one line per variant with a band (sd) over seeds; runs
    with fewer than two evaluated rounds are left out (no figure where none is left)."""
    # rows concatenated from runs repeat index labels (0..n per run); with an undefined (NaN) point seaborn's
    # reindexing then fails
    long = _evaluated_more_than_once(long, y)
    if long.empty:
        return []
    settings = list(dict.fromkeys(long["setting"]))
    palette = _palette(long["variant"])
    fig, axes = _grid(len(settings), sharey=True)
    for ax, s in zip(axes, settings, strict=True):
        sns.lineplot(data=long[long["setting"] == s], x="round", y=y, hue="variant", palette=palette,
                     errorbar="sd", ax=ax)
        ax.set_title(s)
        ax.set_ylabel(ylabel)
    _shared_legend(fig, axes)
    return [_save(fig, path)]


@_styled
def accuracy_curves(df: pd.DataFrame, curves: dict, out: Path) -> list[Path]:
    """The per-round series each run's summary reads (its population and weighting)."""
    rows = []
    for _, r in df.iterrows():
        c = curves[r["run_id"]].copy()
        c["variant"], c["setting"], c["run_id"] = r["variant"], r["setting"], r["run_id"]
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


@_styled
def accuracy_vs_cost(df: pd.DataFrame, out: Path) -> list[Path]:
    agg = df.groupby(["setting", "variant"], sort=False).agg(
        accuracy=("accuracy", "mean"), bytes=("bytes_round", "mean"), tflop=("client_tflop_round", "mean")).reset_index()
    agg["accuracy"] *= 100
    palette = _palette(agg["variant"])
    paths = []
    for col, label, fname in (("bytes", "bytes per round (up + down, all clients)", "accuracy_vs_bytes.png"),
                              ("tflop", "client TFLOP per round (2 × fvcore MACs)", "accuracy_vs_flops.png")):
        settings = list(dict.fromkeys(agg["setting"]))
        fig, axes = _grid(len(settings))
        for ax, s in zip(axes, settings, strict=True):
            sub = agg[agg["setting"] == s].copy()
            x = sub[col].to_numpy(float)
            sub["x"] = x  # zero-byte methods stay on the plot (a symmetric-log axis, 0 at the left)
            sns.scatterplot(data=sub, x="x", y="accuracy", hue="variant", palette=palette, ax=ax, s=60)
            mask = pareto_mask(np.nan_to_num(x, nan=0.0), sub["accuracy"].to_numpy(float))
            front = sub[mask].sort_values("x")
            ax.plot(front["x"], front["accuracy"], "k--", lw=1, label="Pareto front")
            ax.set_xlabel(label + _zero_axis(ax, x))
            ax.set_ylabel("accuracy (%)")
            ax.set_title(s)
        _shared_legend(fig, axes)
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


@_styled
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
    palette = _palette(mean["variant"])
    paths = []
    for col, label, fname in (("cum_bytes", "cumulative bytes, up + down", "accuracy_vs_cumulative_bytes.png"),
                              ("cum_tflop", "cumulative TFLOP, clients + server", "accuracy_vs_cumulative_flops.png")):
        fig, axes = _grid(len(settings))
        for ax, s in zip(axes, settings, strict=True):
            sub = mean[mean["setting"] == s]
            for v, g in sub.groupby("variant", sort=False):
                color = palette[v]
                ax.plot(g[col], g["accuracy"], "-", marker=".", color=color, label=v)
                once = g["once"].iloc[0]
                if col == "cum_bytes" and np.isfinite(once) and once > 0:
                    ax.plot([once, g[col].iloc[0]], [g["accuracy"].iloc[0]] * 2, ":", color=color)
                    ax.plot([once], [g["accuracy"].iloc[0]], "o", mfc="none", color=color)
            note = _zero_axis(ax, sub[col].to_numpy(float))
            ax.set_xlabel(label + note + ("; ○: one-time sends" if col == "cum_bytes" else ""))
            ax.set_ylabel("accuracy (%)")
            ax.set_title(s)
        _shared_legend(fig, axes)
        paths.append(_save(fig, out / fname))
    return paths


@_styled
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
        sns.heatmap(piv, annot=True, fmt=".1f", cmap="viridis", ax=ax, cbar_kws={"label": "accuracy (%)"},
                    annot_kws={"size": TEXT_PT})
        ax.set_xlabel("mu")
        ax.set_ylabel("rank r")
        ax.set_title(f"FedLoRA rank × mu, {s}")
        paths.append(_save(fig, out / f"rank_mu_{len(paths)}.png"))
    return paths


@_styled
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
    _shared_legend(fig, [ax])
    return [_save(fig, out / "accuracy_vs_clients.png")]


@_styled
def metric_curves(df: pd.DataFrame, out: Path, metric: str = "agg_deviation",
                  ylabel: str = "aggregation error D_t (relative)") -> list[Path]:
    """A per-round metric (default: the aggregation error D_t), band over seeds, one panel per setting."""
    rows = []
    for _, r in df.iterrows():
        c = (r.get("metric_curves") or {}).get(metric)
        if c is None or len(c) == 0:
            continue
        rows.append(pd.DataFrame({"round": c.index, "value": c.to_numpy(), "variant": r["variant"],
                                  "setting": r["setting"], "run_id": r["run_id"]}))
    if not rows:
        return []
    return _line_panels(pd.concat(rows), "value", ylabel, out / f"{metric}_rounds.png")


@_styled
def global_accuracy_curves(df: pd.DataFrame, curves: dict, out: Path) -> list[Path]:
    rows = []
    for _, r in df.iterrows():
        c = curves[r["run_id"]]
        if "global_accuracy" not in c or c["global_accuracy"].notna().sum() == 0:
            continue
        c = c.dropna(subset=["global_accuracy"]).copy()
        c["variant"], c["setting"], c["run_id"] = r["variant"], r["setting"], r["run_id"]
        rows.append(c)
    if not rows:
        return []
    long = pd.concat(rows)
    long["global_accuracy"] *= 100
    return _line_panels(long, "global_accuracy", "global-model accuracy (%), union of test splits",
                        out / "global_accuracy_rounds.png")
