"""The QA report and the served dashboard in headless Chromium (Debian's ``chromium``,
which ``./pgtw test`` installs; Playwright drives it, its own browsers are not used).

Each test checks that the page logs no console error, that the key numbers shown equal
the metrics table, and that clicks reach a recording's curves and a frame's overlay.
Screenshots go to the test's tmp dir.
"""

from __future__ import annotations

import re
import shutil
import socket
import time
from collections.abc import Iterator

import pytest

from storage import delta
from tests.dashboard_data import DISTILLED
from workflows.dashboard.views import fmt, group_key

KEY_METRICS = ("semantic_accuracy", "smoothness", "eye_closure", "active_mae", "amplitude_ratio")


def chromium_path() -> str:
    path = shutil.which("chromium")
    assert path, "Debian's chromium is missing: ./pgtw test installs it (apt-get install chromium)"
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=["--no-sandbox"])
        yield b
        b.close()


def open_page(browser, url: str, ready: str):
    """(page, console errors) after ``url`` shows the selector ``ready``."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector(ready, timeout=90_000)
    return page, errors


def check_key_numbers(page, sources) -> None:
    """The dataset view's product column equals the metrics table's dataset rows."""
    rows = delta.read_rows(sources.metrics_uri, filters={"level": "dataset", "label_source": DISTILLED[0]})
    values = dict(zip(rows.column("metric").to_pylist(), rows.column("value").to_pylist(), strict=True))
    for metric in KEY_METRICS:
        cell = page.locator(f'td[data-metric="{metric}"][data-group="{group_key(DISTILLED)}"]')
        assert cell.inner_text().strip() == fmt(values[metric]), metric


def frame_in_caption(page) -> int:
    caption = page.locator(".pgt-overlay figcaption").first.inner_text()
    return int(re.search(r"frame (\d+)", caption).group(1))


def click_curve_at(page, fraction: float) -> None:
    """Clicks the visible curves plot at ``fraction`` of its width (a tap at that frame)."""
    canvas = page.locator(".bk-Figure:visible canvas").first
    box = canvas.bounding_box()
    page.mouse.click(box["x"] + box["width"] * fraction, box["y"] + box["height"] * 0.5)


def test_offline_report_in_chromium(dashboard_sources, browser, tmp_path):
    from workflows.dashboard.report import build_report

    info = build_report(dashboard_sources, tmp_path / "report.html")
    page, errors = open_page(browser, info.path.as_uri(), "table.pgt-metrics")
    check_key_numbers(page, dashboard_sources)
    page.screenshot(path=str(tmp_path / "report-dataset.png"), full_page=True)
    page.locator(".bk-tab", has_text="Subjects").click()
    subject, recording = info.recordings[0].split("/")
    page.locator(".slick-cell:visible", has_text=recording).first.click()  # a recordings-table row
    page.wait_for_selector(".bk-tab.bk-active:has-text('Recording')", timeout=10_000)
    assert page.locator("select").first.input_value() == f"{subject}/{recording}"
    assert page.locator(".pgt-overlay figcaption").first.inner_text().startswith(f"{subject} / {recording} frame")
    assert page.locator(".bk-Figure:visible canvas").count() >= 2  # the curves and confidence plots
    first = frame_in_caption(page)  # the worst frame is shown when the recording opens
    click_curve_at(page, 0.05)
    deadline = time.time() + 10
    while frame_in_caption(page) == first and time.time() < deadline:
        page.wait_for_timeout(200)
    assert frame_in_caption(page) != first  # the click on the curve picked another frame
    assert page.locator(".pgt-overlay img").first.get_attribute("src").startswith("data:image/jpeg;base64,")
    page.screenshot(path=str(tmp_path / "report-recording.png"), full_page=True)
    assert (tmp_path / "report-recording.png").stat().st_size > 0
    assert errors == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_served_dashboard_in_chromium(dashboard_sources, browser, tmp_path):
    from workflows.dashboard.serve import ServeConfig, serve

    port = _free_port()
    server = serve(dashboard_sources, ServeConfig(port=port, refresh_s=1.0), block=False)
    try:
        page, errors = open_page(browser, f"http://127.0.0.1:{port}/", "table.pgt-metrics")
        check_key_numbers(page, dashboard_sources)
        page.screenshot(path=str(tmp_path / "served-dataset.png"), full_page=True)
        page.locator(".bk-tab", has_text="Subjects").click()
        page.locator(".slick-cell:visible", has_text="synth-").first.click()  # a subjects-table row
        page.wait_for_selector(".pgt-overlay figcaption", timeout=30_000)
        assert page.locator(".bk-tab.bk-active").first.inner_text() == "Recording"
        first = frame_in_caption(page)
        click_curve_at(page, 0.05)
        deadline = time.time() + 30
        while frame_in_caption(page) == first and time.time() < deadline:
            page.wait_for_timeout(250)
        assert frame_in_caption(page) != first  # drawn on demand for the clicked frame
        page.screenshot(path=str(tmp_path / "served-recording.png"), full_page=True)
        # A new version of a table (here: a failure record) reaches the open page.
        before = delta.table_version(dashboard_sources.table("failures"))
        _append_failure(dashboard_sources)
        page.wait_for_selector(f"text=failures v{before + 1}", timeout=30_000)
        assert (tmp_path / "served-recording.png").stat().st_size > 0
        assert errors == []
    finally:
        server.stop()


def _append_failure(sources) -> None:
    from pipeline.records import FailureRecord, write_failures
    from pipeline.runlog import OutputLayout

    record = FailureRecord(run_id="later", subject="synth-late", stage="validate", stage_version="2", key="k",
                           error_type="CaptureError", message="a later failure", attempt=1, time=time.time(),
                           traceback="")
    write_failures(OutputLayout(sources.out), [record])

