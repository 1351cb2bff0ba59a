"""The HTML report a person reads: figures at a readable size, tables inside the page, the summaries defined
once, no "best" for a lone method, "n = 1" for single seeds, per-round lines only where there are two rounds.

The layout is checked in a real browser (headless Chromium, tests/browser_page.py); that test is skipped
where no ``chromium`` is installed (Debian: ``apt-get install chromium``; .ci/run installs it)."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from browser_page import chromium, measure, problems, screenshot
from test_summaries import Round, Row, add_run

from fedbench.report import build, plots
from fedbench.store import Store

# four settings (N and C x protocol) and FedAvg's own: 5-panel figures, as wide as the committed reports'
SETTINGS = [dict(clients=c, fraction=f, eval_protocol=p) for c, f in ((4, 1.0), (6, 0.5)) for p in ("yi", "pfllib")]
METHODS = ("standalone", "fml", "fedkd", "fd")


def _rounds(n_clients: int, shift: int, rounds: int = 6, every: int = 1) -> list[Round]:
    out = []
    for t in range(1, rounds + 1):
        evaluated = t % every == 0 or t == rounds
        rows = [Row(c, True, 1000 * (shift + 1), 2000, 10**9,
                    correct=(2 + (t + c) % 5 + shift % 3) if evaluated else None, total=10 if evaluated else None)
                for c in range(n_clients)]
        out.append(Round(t, rows, evaluated=evaluated))
    return out


def page_store(path) -> Store:
    """Four methods in four settings, two seeds each except FD (one seed: "n = 1"); FedAvg alone in a fifth
    setting of its own (--models cnn1); one FedKD seed evaluated once only (at its last round)."""
    store = Store(path)
    k = 0
    for s_i, s in enumerate(SETTINGS):
        for m_i, m in enumerate(METHODS):
            for seed in (0,) if m == "fd" else (0, 1):
                once = m == "fedkd" and seed == 1
                add_run(store, f"r{k}", _rounds(s["clients"], m_i + s_i + seed, every=99 if once else 1),
                        method=m, protocol=s["eval_protocol"], seed=seed,
                        **{key: v for key, v in s.items() if key not in ("clients", "eval_protocol")})
                k += 1
    add_run(store, "avg", _rounds(4, 2), method="fedavg", protocol="yi", models="cnn1", fraction=1.0)
    return store


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("page")
    build.build_report(page_store(out / "s.sqlite"), out / "rep", target=0.5, command="fedbench report (test)")
    return out / "rep"


def test_summaries_are_defined_once_per_page(report):
    page = (report / "report.html").read_text()
    definition = "population: all clients (a client not evaluated in a round carries its last known accuracy"
    # two summaries (yi's and pfllib's conventions), each defined once, in the legend block
    assert page.count(definition) == 2
    assert page.index("<section class='legend'>") < page.index(definition) < page.index("<table")
    assert page.count("statistic: mean of the last 10 evaluated rounds") == 1
    # a table file read on its own still defines what its caption names
    assert (report / "accuracy.md").read_text().count(definition) == 2


def test_a_lone_method_is_not_bold_and_a_single_seed_shows_n_1(report):
    acc = pd.read_csv(report / "accuracy.csv")
    alone = [c for c in acc.columns if c.startswith("clients=4") and "models=cnn1" in c]
    assert len(alone) == 1 and (acc[alone[0]] != "–").sum() == 2  # the summary row and FedAvg
    html = (report / "accuracy.html").read_text()
    fedavg_row = re.search(r"<tr><td>fedavg</td>.*?</tr>", html).group(0)
    assert "<b>" not in fedavg_row and "(n&nbsp;=&nbsp;1)" in fedavg_row  # kept on one line
    fd_row = re.search(r"<tr><td>fd</td>.*?</tr>", html).group(0)
    assert "± 0.00" not in html and fd_row.count("(n&nbsp;=&nbsp;1)") == 4
    assert html.count("<b>") == 4  # a best in each of the four settings with four methods


def test_per_round_lines_leave_out_runs_evaluated_once():
    long = pd.DataFrame({"run_id": ["a", "a", "a", "b", "c", "c"], "round": [1, 2, 3, 3, 1, 2],
                         "accuracy": [0.1, 0.2, 0.3, 0.5, float("nan"), 0.4]})
    kept = plots._evaluated_more_than_once(long, "accuracy")
    assert kept["run_id"].tolist() == ["a", "a", "a"]  # b: one round; c: one defined round


def test_figures_are_drawn_for_the_page(report):
    """Natural width within the page, smallest text not below the body text (before any browser)."""
    from PIL import Image
    pngs = sorted(report.glob("*.png"))
    assert {p.name for p in pngs} >= {"accuracy_rounds.png", "accuracy_vs_bytes.png", "accuracy_vs_flops.png"}
    for p in pngs:
        with Image.open(p) as im:
            assert im.size[0] <= plots.PAGE_WIDTH_PX, (p.name, im.size)
            assert float(im.text[plots.TEXT_PX_KEY]) >= build.BODY_FONT_PX, p.name


@pytest.mark.skipif(chromium() is None, reason="no chromium on PATH (Debian: apt-get install chromium)")
def test_the_page_reads_in_a_browser(report, tmp_path):
    m = measure(report / "report.html")
    assert problems(m) == []
    assert len(m["figures"]) >= 3 and len(m["tables"]) >= 3
    assert m["body_font_px"] == build.BODY_FONT_PX
    shot = screenshot(report / "report.html", tmp_path / "page.png", m["page_height"])
    from PIL import Image
    with Image.open(shot) as im:
        assert im.size == (1280, m["page_height"])
        assert len(np.unique(np.asarray(im.convert("L").resize((64, 64))))) > 16  # drawn, not blank
