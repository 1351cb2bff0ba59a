"""`fedbench report`: tables in four formats, plots, and one Markdown and one self-contained HTML report."""

from __future__ import annotations

import base64
import html
import sys
from pathlib import Path

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
)
from fedbench.summary import BY_PROTOCOL

FORMATS = {"md": "to_markdown", "html": "to_html", "tex": "to_latex", "csv": "to_csv"}


def _comparison_tables(df, test: str) -> list:
    """The per-method test details behind the accuracy tables' marks (personalised, and global where any)."""
    return [comparison_table(df, test=test),
            comparison_table(df, column="global_accuracy", test=test, name="global_comparisons")
            if "global_accuracy" in df and df["global_accuracy"].notna().any() else None]


def build_report(store, out: Path, stat: str = BY_PROTOCOL, weighting: str = BY_PROTOCOL,
                 target: float | None = None, sweep: str | None = None, dataset: str | None = None,
                 focus: str | None = "fedlora", command: str | None = None, population: str = BY_PROTOCOL,
                 protocol: str | None = None, test: str = "paired") -> dict:
    """Every table is made before anything is written: a summary that does not apply raises ConfigError
    with ``out`` untouched."""
    df, curves = run_frame(store, stat, weighting, target, sweep, dataset, population, protocol)
    if df.empty:
        what = " and ".join(x for x in (f"sweep {sweep!r}" if sweep else "", f"dataset {dataset!r}" if dataset else "",
                                        f"protocol {protocol!r}" if protocol else "") if x)
        raise ConfigError(f"no complete runs in {store.path}" + (f" for {what}" if what else ""))
    df = add_names(df)
    tables = [accuracy_table(df, test=test), global_accuracy_table(df, test=test), *_comparison_tables(df, test),
              fairness_table(df), cost_table(df, target, focus), error_table(df), language_table(df)]
    tables = [t for t in tables if t is not None]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for t in tables:
        for ext, fn in FORMATS.items():
            p = out / f"{t.name}.{ext}"
            p.write_text(getattr(t, fn)())
            written.append(p)
    pngs = (plots.accuracy_curves(df, curves, out) + plots.accuracy_vs_cost(df, out)
            + plots.accuracy_vs_cumulative(df, curves, out)
            + plots.rank_mu_heatmaps(df, out) + plots.accuracy_vs_clients(df, out)
            + plots.global_accuracy_curves(df, curves, out) + plots.metric_curves(df, out))
    df.drop(columns=["metric_curves"]).to_csv(out / "runs.csv", index=False)
    command = command or "fedbench " + " ".join(sys.argv[1:])
    header = (f"# fedbench report\n\nMade by: `{command}`\n\nStore: `{store.path}` · {len(df)} complete runs"
              f"{f' · sweep {sweep}' if sweep else ''} · per-run rows in `runs.csv` (run ids, exact commands).\n")
    md = [header] + [t.to_markdown() for t in tables] + [f"![{p.stem}]({p.name})\n" for p in pngs]
    (out / "report.md").write_text("\n".join(md))
    imgs = "".join(f"<figure><img src='data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}'>"
                   f"<figcaption>{html.escape(p.stem)}</figcaption></figure>" for p in pngs)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>fedbench report</title><style>"
            f"body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}table.fb{{border-collapse:collapse;margin:1em 0}}"
            f"table.fb td,table.fb th{{border-bottom:1px solid #ccc;padding:3px 8px;text-align:right}}"
            f"table.fb td:first-child{{text-align:left}}caption{{text-align:left;font-weight:bold;padding:4px}}"
            f"img{{max-width:100%}}</style></head><body><h1>fedbench report</h1>"
            f"<p>Made by: <code>{html.escape(command)}</code></p><p>{len(df)} complete runs</p>"
            + "".join(t.to_html() for t in tables) + imgs + "</body></html>")
    (out / "report.html").write_text(page)
    return {"runs": len(df), "tables": {t.name: t for t in tables}, "files": [str(p) for p in written] + [str(p) for p in pngs]
            + [str(out / "report.md"), str(out / "report.html")]}
