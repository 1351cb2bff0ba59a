"""Comparison tables rendered to Markdown, HTML, LaTeX (booktabs table body) and CSV."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "$": r"\$", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}", "±": r"$\pm$", "×": r"$\times$"}


@dataclass
class Cell:
    text: str
    value: float = math.nan
    bold: bool = False
    mark: bool = False  # not significantly different from the best


@dataclass
class Table:
    name: str
    caption: str
    header: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_markdown(self) -> str:
        def fmt(c: Cell) -> str:
            t = c.text + (" †" if c.mark else "")
            return f"**{t}**" if c.bold else t
        lines = [f"**{self.caption}**", "", "| " + " | ".join(self.header) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(self.header) - 1)) + "|"]
        lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in self.rows]
        lines += [""] + [f"_{n}_" for n in self.notes]
        return "\n".join(lines) + "\n"

    def to_html(self) -> str:
        def fmt(c: Cell) -> str:
            t = html.escape(c.text) + (" &dagger;" if c.mark else "")
            return f"<b>{t}</b>" if c.bold else t
        out = [f"<table class='fb'><caption>{html.escape(self.caption)}</caption><thead><tr>"]
        out += [f"<th>{html.escape(h)}</th>" for h in self.header]
        out.append("</tr></thead><tbody>")
        for row in self.rows:
            out.append("<tr>" + "".join(f"<td>{fmt(c)}</td>" for c in row) + "</tr>")
        out.append("</tbody></table>")
        out += [f"<p class='note'>{html.escape(n)}</p>" for n in self.notes]
        return "\n".join(out)

    def to_latex(self) -> str:
        def esc(t: str) -> str:
            return "".join(_LATEX.get(ch, ch) for ch in t)

        def fmt(c: Cell) -> str:
            t = esc(c.text) + (r"$^\dagger$" if c.mark else "")
            return rf"\textbf{{{t}}}" if c.bold else t
        spec = "l" + "r" * (len(self.header) - 1)
        lines = [f"% {self.caption}", rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
                 " & ".join(esc(h) for h in self.header) + r" \\", r"\midrule"]
        lines += [" & ".join(fmt(c) for c in row) + r" \\" for row in self.rows]
        lines += [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        df = pd.DataFrame([[c.text for c in row] for row in self.rows], columns=self.header)
        return df.to_csv(index=False)


def _seeds_agg(values: pd.Series) -> tuple[float, float, int]:
    v = values.dropna().to_numpy(dtype=float)
    if v.size == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


STAT_NAMES = {"last": "last evaluated round", "best": "best round", "last10": "mean of the last 10 evaluations"}


def global_accuracy_table(df: pd.DataFrame, stat: str, alpha: float = 0.05) -> Table | None:
    """The global model (methods that have one) on the union of the clients' test splits."""
    if "global_accuracy" not in df or df["global_accuracy"].notna().sum() == 0:
        return None
    t = accuracy_table(df, stat, "unweighted", alpha, column="global_accuracy")
    t.name = "global_accuracy"
    t.caption = (f"Global-model accuracy (%) on the union of all clients' test splits (one pooled accuracy, "
                 f"sample-weighted by construction), {STAT_NAMES[stat]}; mean ± std over seeds (n); – : the method "
                 f"has no global model (personalised or local-only). Bold: best per setting; †: not significantly "
                 f"different from the best (Welch's t-test, p ≥ {alpha}).")
    return t


def error_table(df: pd.DataFrame) -> Table | None:
    """Aggregation error per round (spec §5), mean over rounds and at the last round, mean over seeds."""
    if "agg_deviation_mean" not in df or df["agg_deviation_mean"].notna().sum() == 0:
        return None
    cols = [("agg_deviation_mean", "D_t mean over rounds"), ("agg_deviation_last", "D_t last round"),
            ("fedit_factor_error_rel_mean", "FedIT factor error (rel.), mean"),
            ("energy_ratio_rmin_mean", "energy in top r_min, mean")]
    cols = [(c, h) for c, h in cols if c in df]
    t = Table("aggregation_error",
              "Aggregation error: D_t = ||W_glob^{t+1} - sum p_i W_i^{t,end}||_F / ||sum p_i (W_i^{t,end} - "
              "W_glob^t)||_F over all adapted matrices (spec §5.2; 0 = the server keeps the exact FedAvg of the "
              "clients' effective weights), mean over seeds; – : not defined (no global model).",
              ["method", "setting"] + [h for _, h in cols])
    g = df.groupby(["setting", "variant"], sort=False)[[c for c, _ in cols]].mean().reset_index()
    for _, r in g.iterrows():
        t.rows.append([Cell(r["variant"]), Cell(r["setting"])]
                      + [Cell("–" if not np.isfinite(r[c]) else f"{r[c]:.4f}") for c, _ in cols])
    return t


def accuracy_table(df: pd.DataFrame, stat: str, weighting: str, alpha: float = 0.05,
                   column: str = "accuracy") -> Table:
    """Variants x settings: mean ± std over seeds, best in bold, † = not significantly worse than best."""
    settings = list(dict.fromkeys(df["setting"]))
    variants = list(dict.fromkeys(df.sort_values(["method", "variant"])["variant"]))
    stat_name = STAT_NAMES[stat]
    t = Table("accuracy",
              f"Mean local test accuracy (%) over all clients, {weighting} over clients, {stat_name}; "
              f"mean ± std over seeds (n). Bold: best per setting; †: not significantly different from the best "
              f"(Welch's t-test, p ≥ {alpha}).",
              ["method"] + settings)
    cells = {}
    for s in settings:
        sub = df[df["setting"] == s]
        groups = {v: sub[sub["variant"] == v][column] * 100 for v in variants}
        aggs = {v: _seeds_agg(g) for v, g in groups.items()}
        valid = {v: a for v, a in aggs.items() if a[2] > 0}
        best = max(valid, key=lambda v: valid[v][0]) if valid else None
        for v in variants:
            m, sd, n = aggs[v]
            if n == 0:
                cells[(v, s)] = Cell("–")
                continue
            c = Cell(f"{m:.2f} ± {sd:.2f} ({n})", m, bold=(v == best))
            if v != best and best is not None and n > 1 and aggs[best][2] > 1:
                a, b = groups[best].dropna().to_numpy(float), groups[v].dropna().to_numpy(float)
                if np.std(a) + np.std(b) == 0:
                    p = 1.0 if np.mean(a) == np.mean(b) else 0.0
                else:
                    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
                c.mark = p >= alpha
            cells[(v, s)] = c
    for v in variants:
        t.rows.append([Cell(v)] + [cells[(v, s)] for s in settings])
    if (df.groupby(["variant", "setting"]).size() < 2).any():
        t.notes.append("Cells with a single seed get no significance mark.")
    return t


def _fmt_bytes(b: float) -> str:
    if not np.isfinite(b):
        return "–"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= div:
            return f"{b / div:.2f} {unit}"
    return f"{b:.0f} B"


def cost_table(df: pd.DataFrame, target: float | None, focus: str | None = None) -> Table:
    """Per variant and setting: bytes and FLOPs per round, rounds/bytes/FLOPs to the target accuracy, and
    the ratios of the best-accuracy baseline's costs to the focus method's (as the FedLoRA abstract states them)."""
    header = ["method", "setting", "up / round", "down / round", "client TFLOP / round", "server TFLOP / round"]
    if target is not None:
        header += [f"rounds to {target:.0%}", "bytes to target", "TFLOP to target"]
    cap = ("Costs per round (mean over seeds; all clients, up and down separately; FLOPs = 2 × fvcore MACs, "
           "training only")
    cap += f"), and to reach {target:.0%} mean accuracy (first round reaching it)." if target is not None else ")."
    t = Table("costs", cap, header)
    g = df.groupby(["setting", "variant"], sort=False)
    agg = g.agg(up=("bytes_up_round", "mean"), down=("bytes_down_round", "mean"),
                tflop=("client_tflop_round", "mean"), server=("server_tflop_round", "mean"),
                acc=("accuracy", "mean"), method=("method", "first"),
                rtt=("rounds_to_target", lambda x: x.dropna().mean() if x.notna().any() else np.nan),
                reached=("rounds_to_target", lambda x: int(x.notna().sum())), n=("accuracy", "size")).reset_index()
    agg["bytes_tt"] = (agg["up"] + agg["down"]) * agg["rtt"]
    agg["tflop_tt"] = agg["tflop"] * agg["rtt"]
    order = {s: i for i, s in enumerate(dict.fromkeys(df["setting"]))}
    agg["_order"] = agg["setting"].map(order)
    for _, r in agg.sort_values(["_order", "method", "variant"]).iterrows():
        row = [Cell(r["variant"]), Cell(r["setting"]), Cell(_fmt_bytes(r["up"])), Cell(_fmt_bytes(r["down"])),
               Cell(f"{r['tflop']:.4f}"), Cell(f"{r['server']:.4f}")]
        if target is not None:
            rtt = "not reached" if r["reached"] == 0 else f"{r['rtt']:.1f}" + (
                f" ({r['reached']}/{r['n']} seeds)" if r["reached"] < r["n"] else "")
            row += [Cell(rtt), Cell(_fmt_bytes(r["bytes_tt"])),
                    Cell("–" if not np.isfinite(r["tflop_tt"]) else f"{r['tflop_tt']:.3f}")]
        t.rows.append(row)
    if focus is not None and (agg["method"] == focus).any():
        for s, sub in agg.groupby("setting", sort=False):
            mine_rows = sub[sub["method"] == focus]
            others = sub[sub["method"] != focus]
            if others.empty or mine_rows.empty:
                continue
            mine = mine_rows.sort_values("acc").iloc[-1]
            base = others.sort_values("acc").iloc[-1]
            ratios = [f"accuracy {(mine['acc'] - base['acc']) * 100:+.2f} points"]
            for name, a, b in (("communication per round", base["up"] + base["down"], mine["up"] + mine["down"]),
                               ("computation per round", base["tflop"], mine["tflop"]),
                               ("communication to target", base["bytes_tt"], mine["bytes_tt"]),
                               ("computation to target", base["tflop_tt"], mine["tflop_tt"])):
                if not (np.isfinite(a) and np.isfinite(b)):
                    continue
                if a == 0 or b == 0:
                    ratios.append(f"{name} {_fmt_bytes(b) if 'communication' in name else f'{b:.3f} TFLOP'} vs "
                                  f"{_fmt_bytes(a) if 'communication' in name else f'{a:.3f} TFLOP'}")
                else:
                    ratios.append(f"{name} {a / b:.2f}× lower" if a >= b else f"{name} {b / a:.2f}× higher")
            t.notes.append(f"{mine['variant']} vs the best-accuracy baseline {base['variant']} "
                           f"({base['acc'] * 100:.2f}%) in {s}: " + "; ".join(ratios) + ".")
    return t
