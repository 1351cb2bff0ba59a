"""Comparison tables rendered to Markdown, HTML, LaTeX (booktabs table body) and CSV."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fedbench.errors import ConfigError
from fedbench.report.stats import WILCOXON_MIN_N, compare_to_best, describe_test
from fedbench.summary import STAT_NAMES

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
            t = html.escape(c.text).replace("(n = ", "(n&nbsp;=&nbsp;") + (" &dagger;" if c.mark else "")
            return f"<b>{t}</b>" if c.bold else t
        out = [f"<table class='fb'><caption>{html.escape(self.caption)}</caption><thead>"]
        rows = self._setting_header_rows() or [self.header]
        out += ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in r) + "</tr>" for r in rows]
        out.append("</thead><tbody>")
        for row in self.rows:
            out.append("<tr>" + "".join(f"<td>{fmt(c)}</td>" for c in row) + "</tr>")
        out.append("</tbody></table>")
        out += [f"<p class='note'>{html.escape(n)}</p>" for n in self.notes]
        return "\n".join(out)

    def _setting_header_rows(self) -> list[list[str]] | None:
        """Where every column after the first is a setting named ``k=v, k=v, ...`` with the same keys: one
        header row per key (its name, then each column's value), so that a column is as narrow as its values,
        not as wide as the whole setting's name. None where the columns are not named so."""
        parts = [[kv.split("=", 1) for kv in h.split(", ")] for h in self.header[1:]]
        if not parts or any(len(kv) != 2 for p in parts for kv in p):
            return None
        keys = [k for k, _ in parts[0]]
        if any([k for k, _ in p] != keys for p in parts):
            return None
        return [[k] + [p[i][1] for p in parts] for i, k in enumerate(keys)]

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


def _summaries(df: pd.DataFrame) -> dict[str, str]:
    """{setting: the summary its runs were computed under}; refuses a setting whose runs differ."""
    out = {}
    for st, sub in df.groupby("setting", sort=False):
        kinds = list(dict.fromkeys(sub["summary_text"]))
        if len(kinds) > 1:
            raise ConfigError(f"runs of setting {st!r} were summarised differently ({' | '.join(kinds)}); "
                              f"refusing to put them in one column")
        out[st] = kinds[0]
    return out


def summary_caption(df: pd.DataFrame) -> str:
    """Names the summary (protocol, population, statistic, weighting) by its short name, once, or says that
    the summary row names it per column; :func:`summary_legend` defines each name, once per page."""
    _summaries(df)  # refuses a setting summarised two ways
    kinds = list(dict.fromkeys(df["summary"]))
    if len(kinds) == 1:
        return f"Summary: {kinds[0]} (defined under Summaries)."
    return ("Summaries differ by column (each protocol's convention): the summary row names each, defined under "
            "Summaries.")


def summary_legend(df: pd.DataFrame) -> list[str]:
    """One line per summary the runs use: its short name and what it means."""
    pairs = dict(zip(df["summary"], df["summary_text"], strict=True))
    return [f"{short}: {text}" for short, text in pairs.items()]


def _summary_row(df: pd.DataFrame, settings: list[str]) -> list[Cell]:
    short = df.groupby("setting", sort=False)["summary"].first()
    return [Cell("summary")] + [Cell(short[s]) for s in settings]


def _defined_range(sub: pd.DataFrame) -> str:
    from fedbench.summary import defined_text
    return defined_text({k: int(sub[k].min() if k.endswith("_min") else sub[k].max())
                         for k in ("defined_min", "defined_max", "population_min", "population_max",
                                   "never_min", "never_max")})


def _incomplete(sub: pd.DataFrame) -> bool:
    return bool((sub["defined_min"] < sub["population_max"]).any() or (sub["never_max"] > 0).any())


def global_accuracy_table(df: pd.DataFrame, alpha: float = 0.05, test: str = "paired") -> Table | None:
    """The global model (methods that have one) on the union of the clients' test splits."""
    if "global_accuracy" not in df or df["global_accuracy"].notna().sum() == 0:
        return None
    t = accuracy_table(df, alpha, column="global_accuracy", test=test)
    marks = t.caption[t.caption.index("†"):t.caption.index("; –")]
    t.name = "global_accuracy"
    stats_ = df.groupby("setting", sort=False)["statistic"].first()
    stat_text = (STAT_NAMES[stats_.iloc[0]] if stats_.nunique() == 1
                 else " | ".join(f"{s}: {STAT_NAMES[v]}" for s, v in stats_.items()))
    t.caption = (f"Global-model accuracy (%) on the union of all clients' test splits (one pooled accuracy, "
                 f"sample-weighted by construction; population and weighting do not apply), statistic: {stat_text} "
                 f"(val: at the round the clients' validation accuracy selects); evaluation protocol: the server's model after "
                 f"the round's aggregation; mean ± std over seeds (n), or the one seed's value (n = 1); – (why): no global "
                 f"accuracy. Bold: best per setting of two or more methods; {marks}.")
    t.rows[0] = [Cell("statistic")] + [Cell(stats_.get(h, "")) for h in t.header[1:]]
    for row in t.rows[1:]:
        for s, c in zip(t.header[1:], row[1:], strict=True):
            if c.text == "–":
                c.text = "– (" + _no_global_reason(df[(df["variant"] == row[0].text) & (df["setting"] == s)]) + ")"
    t.notes = [n for n in t.notes if not n.startswith("Defined predictions")]
    return t


def _no_global_reason(runs: pd.DataFrame) -> str:
    """Why a variant's cell of the global table is empty: not run there, or its method has no global model
    (declared by the federated-LoRA method's ``evaluations`` where the method declares them, else its
    ``personalised`` flag, ``--head local``, or a method that never overrides ``global_predict``), or no
    global-accuracy rows were stored."""
    from fedbench.methods.base import Method
    from fedbench.registry import methods
    if runs.empty:
        return "not run"
    cls = methods().get(runs["method"].iloc[0])
    kinds = getattr(cls, "evaluations", None)
    if getattr(cls, "personalised", False) or (kinds is not None and "global" not in kinds):
        return "personalised method: no global model"
    if "hp_head" in runs and (runs["hp_head"] == "local").all():
        return "--head local: no global head"
    if isinstance(cls, type) and cls.global_predict is Method.global_predict:
        return "no global model"
    return "no global accuracy stored"


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


def global_scored(df: pd.DataFrame) -> set[str]:
    """The variants whose client score is the global model: federated-LoRA methods whose declared
    evaluation kinds (``FederatedLoRA.evaluations``) lack "personalised"."""
    from fedbench.methods.lora_family import FederatedLoRA
    from fedbench.registry import methods
    reg = methods()
    out = set()
    for v, m in df.groupby("variant", sort=False)["method"].first().items():
        cls = reg.get(m)
        if isinstance(cls, type) and issubclass(cls, FederatedLoRA) and "personalised" not in cls.evaluations:
            out.add(v)
    return out


def accuracy_table(df: pd.DataFrame, alpha: float = 0.05, column: str = "accuracy", test: str = "paired") -> Table:
    """Variants x settings: mean ± std over seeds, best in bold, † = not significantly worse than best
    (:mod:`fedbench.report.stats`: ``paired`` t-test by seed or ``welch``, Holm-corrected per column).
    The first row names each column's summary (a CSV has no caption)."""
    settings = list(dict.fromkeys(df["setting"]))
    variants = list(dict.fromkeys(df.sort_values(["method", "variant"])["variant"]))
    t = Table("accuracy", "", ["method"] + settings)
    t.rows.append(_summary_row(df, settings))
    cells, ns = {}, set()
    for s in settings:
        sub = df[df["setting"] == s]
        groups = {v: sub[sub["variant"] == v] for v in variants}
        aggs = {v: _seeds_agg(g[column] * 100) for v, g in groups.items()}
        valid = {v: a for v, a in aggs.items() if a[2] > 0}
        best = max(valid, key=lambda v: valid[v][0]) if valid else None
        marks = compare_to_best({v: g for v, g in groups.items() if v in valid}, best, column, test,
                                f"setting {s!r}") if best is not None else {}
        ns |= {c.n for c in marks.values()}
        for v in variants:
            m, sd, n = aggs[v]
            if n == 0:
                cells[(v, s)] = Cell("–")
                continue
            # a single seed has no spread to show; a lone method in a column is no "best"
            c = Cell(f"{m:.2f} ± {sd:.2f} ({n})" if n > 1 else f"{m:.2f} (n = 1)", m,
                     bold=(v == best and len(valid) > 1))
            if v in marks:
                c.mark = marks[v].p_holm >= alpha
            cells[(v, s)] = c
    by_global = global_scored(df) if column == "accuracy" else set()  # a client score that is the global model
    t.caption = (f"Personalised accuracy (%): each client scored on its own test split with the model it holds. "
                 f"{summary_caption(df)} Mean ± std over seeds (n), or the one seed's value (n = 1). Bold: best per "
                 f"setting of two or more methods; {describe_test(test, alpha, ns)}; –: no defined accuracy.")
    for v in variants:
        t.rows.append([Cell(v + (" (global model)" if v in by_global else ""))] + [cells[(v, s)] for s in settings])
    if by_global:
        t.notes.append("(global model): the method has no personalised model (its evaluation kinds lack "
                       "\"personalised\"): its clients are scored with the global model as each last "
                       "downloaded it, not with a model of their own.")
    if (df.groupby(["variant", "setting"]).size() < 2).any():
        t.notes.append("Cells with a single seed (or a single shared seed with the best) get no significance mark.")
    for (v, s), sub in df.groupby(["variant", "setting"], sort=False):
        if _incomplete(sub):
            t.notes.append(f"Defined predictions: {v} in {s}: {_defined_range(sub)} clients at the selected "
                           f"round(s); the accuracy is over the defined ones (see the fairness table).")
    return t


def comparison_table(df: pd.DataFrame, alpha: float = 0.05, column: str = "accuracy", test: str = "paired",
                     name: str = "comparisons") -> Table | None:
    """Per setting, every method against the best of its column: n, the mean difference best - method
    (points) with its 95 % CI, the test's p, Holm's adjusted p and (paired, n >= 6) Wilcoxon's p."""
    rows = []
    for s in dict.fromkeys(df["setting"]):
        sub = df[(df["setting"] == s) & df[column].notna()]
        if sub.empty:
            continue
        groups = {v: g for v, g in sub.groupby("variant", sort=True)}
        means = {v: g[column].mean() for v, g in groups.items()}
        best = max(means, key=means.get)
        for v, c in compare_to_best(groups, best, column, test, f"setting {s!r}").items():
            ci = "–" if not np.isfinite(c.ci_low) else f"[{c.ci_low:.2f}, {c.ci_high:.2f}]"
            wil = f"{c.p_wilcoxon:.4f}" if np.isfinite(c.p_wilcoxon) else f"– (n < {WILCOXON_MIN_N})"
            rows.append([Cell(s), Cell(best), Cell(v), Cell(str(c.n)), Cell(f"{c.diff:.2f}", c.diff), Cell(ci),
                         Cell(f"{c.p:.4f}", c.p), Cell(f"{c.p_holm:.4f}", c.p_holm,
                                                        bold=c.p_holm < alpha), Cell(wil)])
    if not rows:
        return None
    what = "local test accuracy" if column == "accuracy" else "global-model accuracy"
    kind = ("paired t-test on the per-seed differences (runs paired by seed, same partition digest), 95 % CI of "
            "the mean difference (t, n - 1 df, not corrected)" if test == "paired"
            else "Welch's unpaired t-test on the seed samples (no CI)")
    t = Table(name, f"Each method against the best of its setting ({what}, points): {kind}; p Holm-corrected over "
                    f"the methods of the setting (bold: adjusted p < {alpha}); Wilcoxon signed-rank (exact, two-sided) "
                    f"only where n ≥ {WILCOXON_MIN_N} pairs (below, its smallest p is 2/2^n ≥ 0.0625). "
                    f"{summary_caption(df)}",
              ["setting", "best", "method", "n", "best − method", "95 % CI", "p", "p (Holm)", "p (Wilcoxon)"])
    t.rows = rows
    return t


def fairness_table(df: pd.DataFrame) -> Table:
    """Per variant and setting: spread of per-client accuracy at the summary's round(s), and how many
    clients had a defined prediction there."""
    t = Table("fairness",
              "Fairness across clients at the round(s) the summary selects (computed per round, averaged over "
              "the rounds of last10): std of per-client accuracies (population std, points), mean of the worst "
              "ceil(10 %) clients (%), minimum (%); mean over seeds. defined: clients with a defined prediction "
              "/ clients in the population at those rounds (ranges over rounds and seeds); never evaluated: "
              f"clients with no evaluation yet, left out. {summary_caption(df)}",
              ["method", "setting", "std", "worst 10 %", "min", "defined"])
    order = {s: i for i, s in enumerate(dict.fromkeys(df["setting"]))}
    keys = sorted(df.groupby(["setting", "variant"], sort=False).groups,
                  key=lambda k: (order[k[0]], k[1]))
    for s, v in keys:
        sub = df[(df["setting"] == s) & (df["variant"] == v)]

        def pct(c, sub=sub):
            x = sub[c].dropna()
            return Cell("–") if x.empty else Cell(f"{100 * x.mean():.2f}", float(x.mean()))
        t.rows.append([Cell(v), Cell(s), pct("fair_std"), pct("fair_worst10"), pct("fair_min"),
                       Cell(_defined_range(sub))])
    return t


def _fmt_bytes(b: float) -> str:
    if not np.isfinite(b):
        return "–"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= div:
            return f"{b / div:.2f} {unit}"
    return f"{b:.0f} B"


def _ratio(name: str, base: float, mine: float, unit: str) -> str:
    def show(x):
        return _fmt_bytes(x) if unit == "bytes" else f"{x:.3f} TFLOP"
    if base == 0 or mine == 0:
        return f"{name} {show(mine)} vs {show(base)}"
    return f"{name} {base / mine:.2f}× lower" if base >= mine else f"{name} {mine / base:.2f}× higher"


ONCE_UNKNOWN = "not recorded"


def cost_table(df: pd.DataFrame, target: float | None, focus: str | None = None,
               against: str | None = None) -> Table:
    """Per variant and setting: whom the server sends to, the one-time bytes, bytes and FLOPs per round,
    rounds to the target accuracy and the per-round bytes and FLOPs summed up to that round (the one-time
    bytes beside them), and the ratios of the best-accuracy baseline's costs to the focus method's (as the
    FedLoRA abstract states them), to the target with and without the one-time sends; ``against``: a
    named baseline method instead of the best-accuracy one."""
    df = df.assign(bytes_once=df["bytes_once"] if "bytes_once" in df else np.nan,
                   down_to=df["down_to"] if "down_to" in df else "?")
    header = ["method", "setting", "down to", "one-time bytes", "up / round", "down / round", "client TFLOP / round",
              "server TFLOP / round"]
    if target is not None:
        header += [f"rounds to {target:.0%}", "bytes to target", "client TFLOP to target", "server TFLOP to target"]
    cap = ("Costs (mean over seeds; all clients). One-time bytes: what the run sends once, before round 1's "
           "training (the initial state pushed to every client: FedKD's dense mentee, LG-FedAvg's head, FedGH's "
           f"header); '{ONCE_UNKNOWN}': a run stored before fedbench kept it apart, its per-round figures then "
           "include it spread over the rounds. Per round: the stored totals less the one-time bytes, / rounds "
           "(up and down separately; FLOPs = 2 × fvcore MACs, training only; the pretrained backbone a "
           "federated-LoRA client holds is not sent and not counted). Down to: the per-round send goes to every "
           "client or to the round's participants")
    if target is not None:
        cap += (f". To reach {target:.0%} accuracy: the first evaluation round whose accuracy, in the series "
                f"the accuracy table summarises, reaches it; bytes and TFLOP to target are the per-round sums of "
                f"rounds 1 up to and including that round (the one-time bytes not included: add the one-time "
                f"column), mean over the seeds that reached it ((k/n seeds) where not all did). {summary_caption(df)}")
    else:
        cap += "."
    t = Table("costs", cap, header)
    g = df.groupby(["setting", "variant"], sort=False)

    def reached_mean(x):
        return x.dropna().mean() if x.notna().any() else np.nan
    agg = g.agg(up=("bytes_up_round", "mean"), down=("bytes_down_round", "mean"),
                once=("bytes_once", "mean"), down_to=("down_to", "first"),
                tflop=("client_tflop_round", "mean"), server=("server_tflop_round", "mean"),
                acc=("accuracy", "mean"), method=("method", "first"),
                rtt=("rounds_to_target", reached_mean), reached=("rounds_to_target", lambda x: int(x.notna().sum())),
                bytes_tt=("bytes_to_target", reached_mean), tflop_tt=("client_tflop_to_target", reached_mean),
                server_tt=("server_tflop_to_target", reached_mean), n=("accuracy", "size")).reset_index()
    order = {s: i for i, s in enumerate(dict.fromkeys(df["setting"]))}
    agg["_order"] = agg["setting"].map(order)

    def num(x, fmt):
        return Cell("–") if not np.isfinite(x) else Cell(fmt(x), float(x))
    for _, r in agg.sort_values(["_order", "method", "variant"]).iterrows():
        once = Cell(ONCE_UNKNOWN) if not np.isfinite(r["once"]) else Cell(_fmt_bytes(r["once"]), float(r["once"]))
        silent = r["up"] == 0 and r["down"] == 0 and r["once"] == 0
        row = [Cell(r["variant"]), Cell(r["setting"]), Cell("nothing sent" if silent else r["down_to"]), once, Cell(_fmt_bytes(r["up"])),
               Cell(_fmt_bytes(r["down"])), Cell(f"{r['tflop']:.4f}"), Cell(f"{r['server']:.4f}")]
        if target is not None:
            seeds = f" ({r['reached']}/{r['n']} seeds)" if 0 < r["reached"] < r["n"] else ""
            if r["reached"] == 0:
                row += [Cell(f"not reached ({r['n']} seeds)")] + [Cell("not reached")] * 3
            else:
                row += [Cell(f"{r['rtt']:.1f}{seeds}"), Cell(_fmt_bytes(r["bytes_tt"]) + seeds),
                        num(r["tflop_tt"], lambda x: f"{x:.3f}"), num(r["server_tt"], lambda x: f"{x:.3f}")]
        t.rows.append(row)
    if "warmup_rounds" in df:
        for (s, v), sub in df.groupby(["setting", "variant"], sort=False):
            if sub["warmup_rounds"].max() > 0:
                t.notes.append(f"{v} in {s}: {int(sub['warmup_rounds'].max())} warm-up rounds of local training "
                               f"before it federates, {sub['warmup_tflop'].mean():.3f} TFLOP (client + server), "
                               f"one-time: left out of the per-round figures, which are over the rounds after them.")
    if target is not None and "never_at_target" in df:
        for (s, v), sub in df.groupby(["setting", "variant"], sort=False):
            never = sub["never_at_target"].dropna()
            if len(never) and never.max() > 0:
                t.notes.append(f"{v} in {s} reached the target while up to {int(never.max())} clients had not "
                               f"been evaluated yet (left out of the accuracy of that round).")
    if focus is not None and (agg["method"] == focus).any():
        t.notes += _focus_notes(agg, focus, target, against)
    return t


def _focus_notes(agg: pd.DataFrame, focus: str, target: float | None, against: str | None = None) -> list[str]:
    """Per setting: the focus method against the best-accuracy baseline (or the method ``against``), per
    round and to the target (with and without the one-time sends)."""
    notes = []
    for s, sub in agg.groupby("setting", sort=False):
        mine_rows = sub[(sub["method"] == focus) & sub["acc"].notna()]
        others = sub[(sub["method"] != focus) & sub["acc"].notna() & ((sub["method"] == against) | (against is None))]
        if others.empty or mine_rows.empty:
            continue
        mine = mine_rows.loc[mine_rows["acc"].idxmax()]
        base = others.loc[others["acc"].idxmax()]
        ratios = [f"accuracy {(mine['acc'] - base['acc']) * 100:+.2f} points",
                  _ratio("communication per round", base["up"] + base["down"], mine["up"] + mine["down"], "bytes"),
                  _ratio("computation per round", base["tflop"], mine["tflop"], "tflop")]
        if target is not None:
            if mine["reached"] == mine["n"] and base["reached"] == base["n"]:
                ratios.append(_ratio("communication to target (per-round sends)", base["bytes_tt"], mine["bytes_tt"],
                                     "bytes"))
                if np.isfinite(base["once"]) and np.isfinite(mine["once"]):
                    ratios.append(_ratio("with the one-time sends", base["bytes_tt"] + base["once"],
                                         mine["bytes_tt"] + mine["once"], "bytes"))
                else:
                    ratios.append(f"one-time sends {ONCE_UNKNOWN} (inside the per-round figures)")
                ratios.append(_ratio("computation to target (client + server)", base["tflop_tt"] + base["server_tt"],
                                     mine["tflop_tt"] + mine["server_tt"], "tflop"))
            else:
                ratios.append(f"no cost-to-target ratio: the target was reached by {mine['variant']} in "
                              f"{mine['reached']}/{mine['n']} seeds and by {base['variant']} in "
                              f"{base['reached']}/{base['n']}")
        notes.append(f"{mine['variant']} vs {'the best-accuracy baseline ' if against is None else ''}{base['variant']} "
                     f"({base['acc'] * 100:.2f}%) in {s}: " + "; ".join(ratios) + ".")
    return notes


LANGUAGE_COLUMNS = (("ppl_global_before", "global ppl before"), ("ppl_global_after", "global ppl after"),
                    ("ppl_clients_before", "clients' ppl before"), ("ppl_clients_after", "clients' ppl after"))


def language_table(df: pd.DataFrame) -> Table | None:
    """Perplexity before and after federated training (the language tier), mean over seeds."""
    cols = [(c, h) for c, h in LANGUAGE_COLUMNS if c in df and df[c].notna().any()]
    if not cols:
        return None
    t = Table("language",
              "Next-token perplexity on held-out lines (exp of the mean token loss over non-padding targets): the "
              "global model on the union of the clients' test splits, and the unweighted mean over clients of each "
              "client's own model on its own test split; before = before round 1's training (--eval-initial), "
              "after = the last evaluated round; mean over seeds; – : not measured (no --eval-initial, or no global "
              "model).", ["method", "setting"] + [h for _, h in cols])
    g = df.groupby(["setting", "variant"], sort=False)[[c for c, _ in cols]].mean().reset_index()
    for _, r in g.iterrows():
        t.rows.append([Cell(r["variant"]), Cell(r["setting"])]
                      + [Cell("–" if not np.isfinite(r[c]) else f"{r[c]:.2f}") for c, _ in cols])
    return t
