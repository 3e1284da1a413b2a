"""Screenshots of each QA view for docs/qa-report.md, taken in headless chromium.

    python -m benchmarks.dashboard_screenshots REPORT.html docs/img/qa

Opens an offline report (``pgt report``) and saves ``dataset.png``, ``subjects.png``,
``recording.png`` (the worst subject's recording, opened by clicking its row) and
``frame.png`` (the overlay of a frame picked by clicking its curve).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def main() -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(args.report.resolve().as_uri())
        page.wait_for_selector("table.pgt-metrics")
        page.wait_for_timeout(1500)
        page.screenshot(path=str(args.out / "dataset.png"), full_page=True)
        page.locator(".bk-tab", has_text="Subjects").click()
        page.wait_for_timeout(1500)
        page.screenshot(path=str(args.out / "subjects.png"), full_page=True)
        page.locator(".slick-cell:visible", has_text="synth-").first.click()  # the worst subject
        page.wait_for_timeout(1500)
        page.screenshot(path=str(args.out / "recording.png"), full_page=False)
        canvas = page.locator(".bk-Figure:visible canvas").first.bounding_box()
        page.mouse.click(canvas["x"] + canvas["width"] * 0.45, canvas["y"] + canvas["height"] * 0.5)
        page.wait_for_timeout(1000)
        page.locator(".pgt-overlay:visible").first.screenshot(path=str(args.out / "frame.png"))
        browser.close()
    print(f"wrote {sorted(p.name for p in args.out.glob('*.png'))} to {args.out}")


if __name__ == "__main__":
    main()
