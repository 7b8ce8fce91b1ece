"""The run report in a real browser: headless Chromium driven by Playwright, nothing downloaded.

Playwright only drives the system's Chromium (Debian's ``chromium`` package, ``/usr/bin/chromium``);
``playwright install`` is never needed. The test opens the page from disk with the network off and
checks that it loads without a console error, that its tables are there and work, and that model
text holding a ``<script>`` tag is shown as text, not run. A full-page screenshot is written beside
the run (and copied to ``$SPEED_TEST_ARTIFACTS`` when that is set).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fakerun import CHANGED, DURATIONS, FINAL, KINDS, XSS, make_fake_run
from speed.report import build_report

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str:
    path = os.environ.get("SPEED_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        msg = "no Chromium: apt-get install -y chromium (or set SPEED_CHROMIUM to its path)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="pip install playwright (no browser download)"
    )
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=_chromium(), headless=True, args=CHROMIUM_FLAGS)
        try:
            yield b
        finally:
            b.close()


class Page:
    """A page opened on a report, with every console error, page error and dialog recorded."""

    def __init__(self, browser: Any, report: Path):
        self.context = browser.new_context(viewport={"width": 1440, "height": 900}, offline=True)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("requestfailed", lambda r: self.errors.append(f"request failed: {r.url}"))

        def on_dialog(dialog: Any) -> None:
            self.dialogs.append(f"{dialog.type}: {dialog.message}")
            dialog.dismiss()

        self.page.on("dialog", on_dialog)
        self.page.goto(report.resolve().as_uri(), wait_until="load")

    def visible_rows(self, table: str) -> int:
        return int(self.page.locator(f"#{table} tbody tr:visible").count())

    def close(self) -> None:
        self.context.close()


def _artifact(path: Path) -> None:
    target = os.environ.get("SPEED_TEST_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


def test_full_report_in_chromium(browser: Any, tmp_path: Path) -> None:
    run = make_fake_run(tmp_path / "run")
    p = Page(browser, build_report(run))
    try:
        page = p.page
        assert page.title().startswith("speed run report")
        for table in ("stage-table", "cost-table", "e5-table", "kind-table", "drop-table", "eval-table"):
            assert page.locator(f"#{table}").is_visible(), table
        assert p.visible_rows("stage-table") == len(DURATIONS)  # one row per stage of the run
        assert p.visible_rows("sample-table") == FINAL
        assert p.visible_rows("verdict-table") == 7
        assert page.locator("img[alt='evaluate/scale/scale_plot.png']").evaluate("i => i.naturalWidth") == 4
        assert p.visible_rows("scale-table") == 3

        # the <script> in model text is text on the page, not an element, and never ran
        sample_text = page.locator("#sample-table").inner_text()
        assert XSS in sample_text
        assert page.locator("#sample-table script").count() == 0
        assert page.evaluate("document.scripts.length") == 1
        assert page.locator("#sample-table pre.text", has_text=XSS).first.is_visible()

        # filter by kind, by text, and sort a column
        page.select_option("#kind-filter", "sts")
        assert p.visible_rows("sample-table") == KINDS["sts"]
        assert page.locator("#sample-count").inner_text() == f"{KINDS['sts']} of {FINAL} shown"
        page.select_option("#kind-filter", "")
        page.fill("#text-filter", "alert(1)")
        assert p.visible_rows("sample-table") == 1
        page.fill("#text-filter", "")
        assert p.visible_rows("sample-table") == FINAL
        page.check("#changed-filter")
        assert p.visible_rows("sample-table") == CHANGED
        page.uncheck("#changed-filter")
        delta = page.locator("#eval-table th", has_text="Δ")
        first_task = page.locator("#eval-table tbody tr").first.locator("td").first
        delta.click()  # ascending: +9.00 first
        assert first_task.inner_text() == "Banking77Classification"
        delta.click()  # descending: +12.00 first
        assert first_task.inner_text() == "SciFact"
    finally:
        shot = run / "report.png"
        p.page.screenshot(path=str(shot), full_page=True)
        p.close()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _artifact(shot)
    assert p.dialogs == [], "model text opened a dialog"
    assert p.errors == [], "console errors on the report page"


def test_partial_report_in_chromium(browser: Any, tmp_path: Path) -> None:
    run = make_fake_run(tmp_path / "partial", stages=("topics", "brainstorm", "seed"))
    p = Page(browser, build_report(run))
    try:
        assert p.page.locator("#stage-table").is_visible()
        assert p.page.get_by_text("The synthesize stage has not finished.", exact=True).is_visible()
        assert p.page.get_by_text("No evaluation results yet.", exact=True).is_visible()
        shot = run / "report-partial.png"
        p.page.screenshot(path=str(shot), full_page=True)
    finally:
        p.close()
    _artifact(shot)
    assert p.dialogs == [] and p.errors == []
