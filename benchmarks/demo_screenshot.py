"""The screenshot of the demo in docs/ and the README: `vitbn serve` over the study models, a drawn "7" predicted,
then an uploaded MNIST test digit, in headless Chromium (Playwright driving Debian's package).

    python benchmarks/demo_screenshot.py [--runs-dir runs | --checkpoint FILE ...] [--out docs/images/demo.png]
"""

from __future__ import annotations

import argparse
import sys

from vitbn.serve.launch import CHROMIUM_ARGS, chromium_path, running_server

SEVEN = [(70, 60), (210, 60), (190, 120), (160, 180), (130, 240)]  # canvas pixels of a drawn "7"


def draw(page, points: list[tuple[int, int]]) -> None:
    box = page.locator("#pad").bounding_box()
    page.mouse.move(box["x"] + points[0][0], box["y"] + points[0][1])
    page.mouse.down()
    for x, y in points[1:]:
        page.mouse.move(box["x"] + x, box["y"] + y, steps=8)
    page.mouse.up()


def wait_answer(page, before: int) -> None:
    page.wait_for_function(f"Number(document.body.dataset.answers || 0) > {before}", timeout=30000)


def answers(page) -> int:
    return int(page.evaluate("Number(document.body.dataset.answers || 0)"))


def main(argv: list[str] | None = None) -> int:
    from playwright.sync_api import sync_playwright

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", action="append", default=[])
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--out", default="docs/images/demo.png")
    args = p.parse_args(argv)
    serve_args = [a for c in args.checkpoint for a in ("--checkpoint", c)] or ["--runs-dir", args.runs_dir]
    with running_server(serve_args) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1180, "height": 640})
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']", timeout=30000)
        before = answers(page)
        draw(page, SEVEN)
        page.click("#predict")
        wait_answer(page, before)
        tops = page.locator(".model-panel").evaluate_all(
            "ps => ps.map(p => p.querySelector('h2').textContent + ': ' + p.dataset.top1)"
        )
        page.screenshot(path=args.out, full_page=True)
        browser.close()
    print(f"drawn 7 -> {', '.join(tops)}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
