"""`fedbench report`: tables in four formats, plots, and one Markdown and one self-contained HTML report."""

from __future__ import annotations

import base64
import html
import sys
from collections.abc import Collection
from pathlib import Path

from PIL import Image

from fedbench.errors import ConfigError
from fedbench.report import plots
from fedbench.report.frame import add_names, run_frame
from fedbench.report.tables import (
    accuracy_table,
    comparison_table,
    cost_table,
    error_table,
    fairness_table,
    global_accuracy_table,
    language_table,
    summary_legend,
)
from fedbench.summary import BY_PROTOCOL


def no_runs_error(path, filters: dict) -> ConfigError:
    """The error of an empty selection, naming the filters given (``{"sweep": "nightly", "seed": [0, 1]}``)."""
    what = " and ".join(f"{k} {v!r}" for k, v in filters.items() if v is not None and v != "")
    return ConfigError(f"no complete runs in {path}" + (f" for {what}" if what else ""))


FORMATS = {"md": "to_markdown", "html": "to_html", "tex": "to_latex", "csv": "to_csv"}
BODY_FONT_PX = 16  # the page's body text; every figure's text is drawn at least this large (plots.TEXT_PT)
PAGE_CSS = (f"body{{font-family:sans-serif;font-size:{BODY_FONT_PX}px;line-height:1.4;max-width:{plots.PAGE_WIDTH_PX}px;"
            f"margin:2em auto;padding:0 1em}}"
            "table.fb{border-collapse:collapse;margin:1em 0;max-width:100%}"
            "table.fb td,table.fb th{border-bottom:1px solid #ccc;padding:3px 8px;text-align:right;vertical-align:top}"
            "table.fb td:first-child,table.fb th:first-child{text-align:left}"
            "caption{text-align:left;padding:4px 0}"
            ".legend{border:1px solid #ccc;background:#f8f8f8;padding:0 1em;margin:1em 0}"
            ".legend dt{font-weight:bold;margin-top:.5em}.legend dd{margin:0 0 .5em 1.5em}"
            "figure{margin:2em 0}img{display:block;max-width:100%;height:auto}")
# what each figure shows (file stem -> caption); a stem not listed is captioned with its name
FIGURE_CAPTIONS = {
    "accuracy_rounds": "Local test accuracy per evaluated round, the series each run's summary reads (line: mean "
                       "over seeds, band: sd); runs evaluated in fewer than two rounds are left out.",
    "global_accuracy_rounds": "Global-model accuracy per evaluated round on the union of the clients' test splits "
                              "(line: mean over seeds, band: sd); runs evaluated in fewer than two rounds are left out.",
    "agg_deviation_rounds": "Aggregation error D_t per round (line: mean over seeds, band: sd).",
    "accuracy_vs_bytes": "Accuracy against bytes per round (mean over seeds); dashed: the Pareto front.",
    "accuracy_vs_flops": "Accuracy against client TFLOP per round (mean over seeds); dashed: the Pareto front.",
    "accuracy_vs_clients": "Accuracy against the number of clients N (participation fraction C); bars: sd over seeds.",
}


def _comparison_tables(df, test: str) -> list:
    """The per-method test details behind the accuracy tables' marks (personalised, and global where any)."""
    return [comparison_table(df, test=test),
            comparison_table(df, column="global_accuracy", test=test, name="global_comparisons")
            if "global_accuracy" in df and df["global_accuracy"].notna().any() else None]


def build_report(store, out: Path, stat: str = BY_PROTOCOL, weighting: str = BY_PROTOCOL,
                 target: float | None = None, sweep: str | None = None, dataset: str | None = None,
                 focus: str | None = "fedlora", command: str | None = None, population: str = BY_PROTOCOL,
                 protocol: str | None = None, run_ids: Collection[str] | None = None,
                 test: str = "paired") -> dict:
    """Every table is made before anything is written: a summary that does not apply raises ConfigError
    with ``out`` untouched. ``run_ids``: only these runs (with the other filters)."""
    df, curves = run_frame(store, stat, weighting, target, sweep, dataset, population, protocol, run_ids)
    if df.empty:
        raise no_runs_error(store.path, {"sweep": sweep, "dataset": dataset, "protocol": protocol})
    df = add_names(df)
    tables = [accuracy_table(df, test=test), global_accuracy_table(df, test=test), *_comparison_tables(df, test),
              fairness_table(df), cost_table(df, target, focus), error_table(df), language_table(df)]
    tables = [t for t in tables if t is not None]
    legend = summary_legend(df)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for t in tables:
        for ext, fn in FORMATS.items():
            p = out / f"{t.name}.{ext}"
            p.write_text(_with_legend(getattr(t, fn)(), ext, legend))
            written.append(p)
    pngs = (plots.accuracy_curves(df, curves, out) + plots.accuracy_vs_cost(df, out)
            + plots.accuracy_vs_cumulative(df, curves, out)
            + plots.rank_mu_heatmaps(df, out) + plots.accuracy_vs_clients(df, out)
            + plots.global_accuracy_curves(df, curves, out) + plots.metric_curves(df, out))
    df.drop(columns=["metric_curves"]).to_csv(out / "runs.csv", index=False)
    command = command or "fedbench " + " ".join(sys.argv[1:])
    header = (f"# fedbench report\n\nMade by: `{command}`\n\nStore: `{store.path}` · {len(df)} complete runs"
              f"{f' · sweep {sweep}' if sweep else ''} · per-run rows in `runs.csv` (run ids, exact commands).\n")
    md = ([header, "**Summaries**\n"] + [f"- {line}" for line in legend] + [""] + [t.to_markdown() for t in tables]
          + [f"![{p.stem}]({p.name})\n\n_{FIGURE_CAPTIONS.get(p.stem, p.stem)}_\n" for p in pngs])
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text(_page(command, len(df), legend, tables, pngs))
    return {"runs": len(df), "tables": {t.name: t for t in tables}, "files": [str(p) for p in written] + [str(p) for p in pngs]
            + [str(out / "report.md"), str(out / "report.html")]}


def _with_legend(text: str, ext: str, legend: list[str]) -> str:
    """A table file on its own: the definitions of the summaries its caption names (a CSV names them in its
    summary row)."""
    if ext == "md":
        return text + "\n" + "\n".join(f"_Summary {line}_" for line in legend) + "\n"
    if ext == "html":
        return text + "\n" + "\n".join(f"<p class='note'>Summary {html.escape(line)}</p>" for line in legend)
    if ext == "tex":
        return "".join(f"% Summary {line}\n" for line in legend) + text
    return text


def _figure(p: Path) -> str:
    """A figure at its natural size (width and height in pixels; the page never stretches it), with the size of
    its smallest text in pixels (``data-text-px``, from plots.TEXT_PX_KEY) for the page's layout check."""
    with Image.open(p) as im:
        w, h = im.size
        text_px = im.text.get(plots.TEXT_PX_KEY, "")
    data = base64.b64encode(p.read_bytes()).decode()
    return (f"<figure><img src='data:image/png;base64,{data}' width='{w}' height='{h}' alt='{html.escape(p.stem)}' "
            f"data-text-px='{text_px}'><figcaption>{html.escape(FIGURE_CAPTIONS.get(p.stem, p.stem))}</figcaption>"
            f"</figure>")


def _page(command: str, runs: int, legend: list[str], tables: list, pngs: list[Path]) -> str:
    """The self-contained HTML page: the summaries defined once, the tables, the figures one under another."""
    defs = "".join(f"<dt>{html.escape(short)}</dt><dd>{html.escape(text)}</dd>"
                   for short, text in (line.split(": ", 1) for line in legend))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>fedbench report</title>"
            f"<style>{PAGE_CSS}</style></head><body><h1>fedbench report</h1>"
            f"<p>Made by: <code>{html.escape(command)}</code></p><p>{runs} complete runs</p>"
            f"<section class='legend'><h2>Summaries</h2><p>How each run's accuracy is summarised; the tables name "
            f"the summary by its short name:</p><dl>{defs}</dl></section>"
            + "".join(f"<h2>{html.escape(t.name.replace('_', ' ').capitalize())}</h2>{t.to_html()}" for t in tables)
            + (f"<h2>Figures</h2>{''.join(_figure(p) for p in pngs)}" if pngs else "") + "</body></html>")
