"""Lay a report page out in headless Chromium (Debian's ``chromium``) and measure what a reader sees.

``python tests/browser_page.py REPORT.html [--screenshot OUT.png]`` prints the problems found (none: exit 0);
tests/test_report_page.py runs the same checks on a page it builds.

A copy of the page gets a script that, once the page has loaded, writes the measurements into the DOM as
JSON; ``chromium --headless --dump-dom`` prints that DOM. Checks:

* every figure is shown at least at its natural width, or, where it is wider, at the page's width;
* every figure's smallest text, as shown (``data-text-px`` x shown width / natural width), is at least as
  large as the page's body text (a figure without ``data-text-px`` states no text size: a problem);
* no table reaches past the page's right edge, and the page does not scroll sideways.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

WINDOW_WIDTH = 1280
MEASURE_ID = "fedbench-measure"
MEASURE_SCRIPT = """<script>
window.addEventListener('load', () => {
  const body = document.body, cs = getComputedStyle(body);
  const box = body.getBoundingClientRect();
  const left = box.left + parseFloat(cs.paddingLeft), right = box.right - parseFloat(cs.paddingRight);
  const out = {
    body_font_px: parseFloat(cs.fontSize), content_left: left, content_right: right,
    content_width: right - left, window_width: window.innerWidth,
    scroll_width: document.documentElement.scrollWidth, page_height: document.documentElement.scrollHeight,
    figures: [...document.querySelectorAll('img')].map((im, i) => ({
      index: i, alt: im.alt, natural_width: im.naturalWidth, shown_width: im.getBoundingClientRect().width,
      text_px: im.dataset.textPx ? parseFloat(im.dataset.textPx) : null})),
    tables: [...document.querySelectorAll('table')].map((t, i) => {
      const r = t.getBoundingClientRect();
      return {index: i, caption: (t.caption ? t.caption.textContent : '').slice(0, 60), left: r.left,
              right: r.right, width: r.width};
    }),
  };
  const pre = document.createElement('pre');
  pre.id = '@ID@';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>""".replace("@ID@", MEASURE_ID)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run(args: list[str], timeout: int = 120) -> str:
    exe = chromium()
    if exe is None:
        raise RuntimeError("no chromium on PATH")
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
           "--virtual-time-budget=10000", *args]
    with tempfile.TemporaryDirectory() as profile:
        r = subprocess.run([*cmd, f"--user-data-dir={profile}"], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"chromium exited {r.returncode}: {r.stderr[-2000:]}")
    return r.stdout


def measure(page: Path, width: int = WINDOW_WIDTH) -> dict:
    """The layout of ``page`` in a window ``width`` pixels wide (see MEASURE_SCRIPT)."""
    text = page.read_text()
    with tempfile.TemporaryDirectory() as d:
        probe = Path(d) / "probe.html"
        probe.write_text(text.replace("</body>", MEASURE_SCRIPT + "</body>") if "</body>" in text
                         else text + MEASURE_SCRIPT)
        dom = _run([f"--window-size={width},1000", "--dump-dom", probe.as_uri()])
    m = re.search(rf'<pre id="{MEASURE_ID}">(.*?)</pre>', dom, re.S)
    if m is None:
        raise RuntimeError("the measuring script wrote nothing (did the page load?)")
    return json.loads(html.unescape(m.group(1)))


def problems(m: dict) -> list[str]:
    """What a reader of the measured page cannot read, one line each."""
    out = []
    body_px, page_w = m["body_font_px"], m["content_width"]
    for f in m["figures"]:
        name = f"figure {f['index'] + 1} ({f['alt']})"
        want = min(f["natural_width"], page_w)
        if f["shown_width"] < want - 0.5:
            out.append(f"{name}: shown {f['shown_width']:.0f} px wide, natural {f['natural_width']} px, "
                       f"page {page_w:.0f} px")
        if f["text_px"] is None:
            out.append(f"{name}: states no text size (data-text-px)")
        elif f["natural_width"]:
            shown_px = f["text_px"] * f["shown_width"] / f["natural_width"]
            if shown_px < body_px - 0.01:
                out.append(f"{name}: smallest text shown at {shown_px:.1f} px, body text {body_px:.0f} px "
                           f"({f['natural_width']} px wide figure shown at {f['shown_width']:.0f} px)")
    for t in m["tables"]:
        if t["right"] > m["content_right"] + 0.5:
            out.append(f"table {t['index'] + 1} ({t['caption']}...): reaches {t['right'] - m['content_right']:.0f} px "
                       f"past the page's right edge")
    if m["scroll_width"] > m["window_width"]:
        out.append(f"the page scrolls sideways: {m['scroll_width']} px wide in a {m['window_width']} px window")
    return out


def screenshot(page: Path, png: Path, height: int, width: int = WINDOW_WIDTH) -> Path:
    """The whole page (``height``: its measured height) as a PNG, ``width`` pixels wide."""
    _run([f"--window-size={width},{height}", f"--screenshot={png}", page.resolve().as_uri()])
    return png


def main(argv: list[str]) -> int:
    page = Path(argv[0])
    m = measure(page)
    if "--screenshot" in argv:
        screenshot(page, Path(argv[argv.index("--screenshot") + 1]), m["page_height"])
    found = problems(m)
    print(f"{page}: body text {m['body_font_px']:.0f} px, page {m['content_width']:.0f} px, "
          f"{len(m['figures'])} figures, {len(m['tables'])} tables: {len(found)} problems")
    for line in found:
        print("  " + line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
