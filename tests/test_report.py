"""`snakemake --report report.html` on the tiny study: one self-contained file that renders.

The report is a JavaScript (React) app: its content only exists once a browser has run it. The
rendering tests open it in headless Chromium (`--dump-dom` after a virtual-time budget, and
`--screenshot`), with every host name unresolvable so that nothing can come from the network.
Clicks are made by a small script appended to a copy of the report, which clicks the app's own
links once the page has loaded (the same DOM click events a user's mouse makes).

Chromium: the Debian package `chromium`, installed by the test when absent and we are root with
apt-get (nothing cached in the repository); otherwise the tests are skipped with a message.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from workflow_runner import snakemake

pytestmark = [pytest.mark.workflow, pytest.mark.browser]

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CATEGORIES = (
    "Tables",
    "Registration overlays",
    "Jacobian determinant",
    "Dice",
    "Landmark errors",
    "Training",
    "Classification",
)
TABLE_FILES = (
    "table1_dice.tsv",
    "table2_landmarks.tsv",
    "pairs.tsv",
    "landmarks.tsv",
    "jacobian.tsv",
    "endpoint_error.tsv",
    "classification.tsv",
    "classification_sources.tsv",
    "tables.html",
)
MAX_REPORT_BYTES = 30 * 2**20  # the tiny study's report is ~4 MB (vega, react and the figures inline)


# ------------------------------------------------------------------------------ fixtures


def _find_chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        if path := shutil.which(name):
            return path
    return None


def _install_chromium() -> str:
    """Why chromium could not be installed ('' when it was)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not root"
    if not shutil.which("apt-get"):
        return "no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    result = None
    for commands in ([install], [["apt-get", "update"], install]):  # update the lists only when needed
        for command in commands:
            result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
            if result.returncode != 0:
                break
        if _find_chromium():
            return ""
    lines = (result.stderr or result.stdout).strip().splitlines()
    return f"apt-get install chromium failed: {lines[-1] if lines else result.returncode}"


@pytest.fixture(scope="module")
def chromium() -> str:
    path = _find_chromium()
    if path is None:
        reason = _install_chromium()
        path = _find_chromium()
        if path is None:
            pytest.skip(
                f"headless Chromium is absent and could not be installed ({reason}); "
                f"install the Debian package 'chromium' to run the report rendering tests"
            )
    return path


@pytest.fixture(scope="module")
def report(tiny_study) -> Path:
    started = time.perf_counter()
    snakemake(tiny_study, "--report", "report.html")
    path = tiny_study / "report.html"
    print(f"\nreport: {path}, {path.stat().st_size / 2**20:.2f} MiB, built in {time.perf_counter() - started:.1f} s")
    return path


# ------------------------------------------------------------------------------- helpers


class _Resources(HTMLParser):
    """Every URL the page would fetch to render: script/img/iframe/... src, stylesheet hrefs."""

    FETCHING = {
        "script": "src",
        "img": "src",
        "iframe": "src",
        "embed": "src",
        "source": "src",
        "audio": "src",
        "video": "src",
        "object": "data",
        "link": "href",
    }

    def __init__(self):
        super().__init__()
        self.urls: list[tuple[str, str]] = []
        self.inline_scripts = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        attribute = self.FETCHING.get(tag)
        if tag == "link" and "stylesheet" not in (attrs.get("rel") or "") and "preload" not in (attrs.get("rel") or ""):
            return  # e.g. rel=license: not fetched
        if attribute and attrs.get(attribute):
            self.urls.append((tag, attrs[attribute]))
        elif tag == "script":
            self.inline_scripts += 1


def _is_remote(url: str) -> bool:
    return bool(re.match(r"^\s*(https?:)?//", url, re.I))


CLICKER = """<script>
// Appended by tests/test_report.py: click through the app like a user, then leave the result in
// the DOM (#test-probe) for --dump-dom. Virtual time makes the waits instant.
(function () {
  const steps = %s;
  const probe = [];
  function textOf(node) { return node.textContent.replace(/\\s+/g, " ").trim(); }
  function findLink(text) {
    return [...document.querySelectorAll("#app a")].find(a => textOf(a) === text);
  }
  function findRowButton(text) {
    const row = [...document.querySelectorAll("#app tr")].find(tr => textOf(tr).includes(text));
    return row && row.querySelector("a");
  }
  function run(i, tries) {
    if (i === steps.length) { finish(); return; }
    const [kind, text] = steps[i];
    const target = kind === "link" ? findLink(text) : findRowButton(text);
    if (!target) {
      if (tries < 50) { setTimeout(() => run(i, tries + 1), 100); return; }
      probe.push({step: text, found: false}); finish(); return;
    }
    target.click();
    setTimeout(() => {
      const nav = document.querySelector("#app nav");
      probe.push({step: text, found: true, navbar: nav ? textOf(nav) : ""});
      run(i + 1, 0);
    }, 300);
  }
  function finish() {
    const pre = document.createElement("pre");
    pre.id = "test-probe";
    pre.style.display = "none";
    pre.textContent = JSON.stringify(probe);
    document.body.appendChild(pre);
  }
  window.addEventListener("load", () => setTimeout(() => run(0, 0), 300));
})();
</script>"""


def _with_clicks(report: Path, steps: list[tuple[str, str]], destination: Path) -> Path:
    text = report.read_text(encoding="utf-8")
    end = text.rindex("</body>")
    destination.write_text(text[:end] + CLICKER % json.dumps(steps) + text[end:], encoding="utf-8")
    return destination


def _chromium(chromium: str, page: Path, profile: Path, *arguments: str) -> subprocess.CompletedProcess:
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        "--disable-extensions",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # nothing may come from the network
        "--virtual-time-budget=15000",
        "--window-size=1280,900",
        *arguments,
        page.as_uri(),
    ]
    # the DOM is UTF-8 whatever the locale (the tables hold e.g. "±")
    result = subprocess.run(command, capture_output=True, encoding="utf-8", errors="replace", timeout=180)
    assert result.returncode == 0, f"chromium failed ({result.returncode}): {result.stderr[-3000:]}"
    return result


def _rendered_text(dom: str) -> str:
    """The visible text the app rendered into #app (scripts and styles left out)."""
    start = dom.find('<div id="app">')
    assert start >= 0, "no #app element in the rendered DOM"
    app = re.sub(r"<(script|style)\b.*?</\1>", " ", dom[start:], flags=re.S | re.I)
    app = app.split('<pre id="test-probe"')[0]
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", app))).strip()


def _probe(dom: str) -> list[dict]:
    match = re.search(r'<pre id="test-probe"[^>]*>(.*?)</pre>', dom, re.S)
    assert match, "the click script did not finish (no #test-probe in the DOM)"
    return json.loads(html.unescape(match.group(1)))


# --------------------------------------------------------------------------------- tests


def test_report_is_one_self_contained_file(report):
    size = report.stat().st_size
    assert 100_000 < size < MAX_REPORT_BYTES, f"report size {size} bytes"
    text = report.read_text(encoding="utf-8")
    parser = _Resources()
    parser.feed(text)
    remote = [(tag, url[:100]) for tag, url in parser.urls if _is_remote(url)]
    assert not remote, f"the report fetches from the network to render: {remote}"
    local = [(tag, url[:100]) for tag, url in parser.urls if not url.startswith("data:")]
    assert not local, f"the report needs files beside it: {local}"
    assert parser.inline_scripts >= 3  # react, vega and the report's own code, all inline
    # every figure and table travels inside the file as a data URI
    for name in ("dice.png", "landmark_errors.png", "table1_dice.tsv", "tables.html"):
        assert name in text, name
    assert text.count("data:image/png;") >= 5  # overlays, Jacobian, boxplots, training curve, ROC


def test_report_renders_its_categories_in_headless_chromium(report, chromium, tmp_path):
    started = time.perf_counter()
    dom = _chromium(chromium, report, tmp_path / "profile", "--dump-dom").stdout
    text = _rendered_text(dom)
    assert "Loading Snakemake Report" not in text
    missing = [c for c in CATEGORIES if c not in text]
    assert not missing, f"categories not rendered: {missing}; rendered text: {text[:1500]}"
    assert "Christodoulidis" in text  # report/workflow.rst, the landing page
    print(f"\nlanding page rendered in {time.perf_counter() - started:.1f} s")


def test_report_tables_category_lists_every_table(report, chromium, tmp_path):
    page = _with_clicks(report, [("link", "Tables")], tmp_path / "report_tables.html")
    dom = _chromium(chromium, page, tmp_path / "profile", "--dump-dom").stdout
    probe = _probe(dom)
    assert probe and probe[0]["found"], f"no 'Tables' link to click: {probe}"
    text = _rendered_text(dom)
    missing = [name for name in TABLE_FILES if name not in text]
    assert not missing, f"Tables category lacks {missing}: {text[:1500]}"


def test_report_shows_a_figure_and_screenshot(report, chromium, tmp_path):
    """Click Dice, then the figure's view button: the PNG is shown; screenshot of that view."""
    started = time.perf_counter()
    steps = [("link", "Dice"), ("row", "dice.png")]
    page = _with_clicks(report, steps, tmp_path / "report_dice.html")
    dom = _chromium(chromium, page, tmp_path / "profile", "--dump-dom").stdout
    probe = _probe(dom)
    assert [p["found"] for p in probe] == [True, True], probe
    start = dom.find('<div id="app">')
    shown = re.findall(r'<img[^>]*src="(data:image/png;[^"]{0,40})', dom[start:])
    assert shown, "no PNG figure displayed after clicking the Dice entry"
    assert "dice.png" in _rendered_text(dom)

    screenshot = tmp_path / "report_dice.png"
    _chromium(chromium, page, tmp_path / "profile", f"--screenshot={screenshot}")
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000
    import matplotlib.image

    pixels = matplotlib.image.imread(screenshot)[..., :3]
    assert pixels.shape[:2] == (900, 1280)
    colours = np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 50, f"screenshot has only {len(colours)} colours"
    assert pixels.std() > 0.05
    print(
        f"\nscreenshot: {screenshot} ({screenshot.stat().st_size} bytes, {len(colours)} colours); "
        f"report {report.stat().st_size / 2**20:.2f} MiB; {time.perf_counter() - started:.1f} s"
    )
