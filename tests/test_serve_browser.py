"""The demo in a real browser: headless Chromium (Debian's package) driven by Playwright against `vitbn serve`.

Fails, never skips, when the browser cannot start: CI installs Chromium (`make browser`)."""

from __future__ import annotations

import base64

import pytest

from test_serve_app import off_centre_png
from vitbn.serve import Predictor
from vitbn.serve.launch import CHROMIUM_ARGS, chromium_path, running_server
from vitbn.serve.preprocess import decode_image
from waits import wait_s


@pytest.fixture(scope="module")
def server(demo_models):
    args = ["--threads", "1"]
    for path in demo_models["paths"]:
        args += ["--checkpoint", str(path)]
    with running_server(args, timeout=wait_s(60)) as url:
        yield url


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import Error, sync_playwright

    with sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        except Error as exc:
            pytest.fail(
                f"Chromium ({chromium_path()}) did not start: {str(exc).splitlines()[0]}; install it: make browser"
            )
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.goto(server)
        page.wait_for_selector("body[data-ready='1']", timeout=wait_s(20) * 1000)  # ms
        yield page
        browser.close()


def _answers(page) -> int:
    return int(page.evaluate("Number(document.body.dataset.answers || 0)"))


def _wait_answer(page, before: int) -> None:
    page.wait_for_function(f"Number(document.body.dataset.answers || 0) > {before}", timeout=wait_s(20) * 1000)


def test_a_drawn_7_is_named_7_in_every_panel(page, demo_models):
    panels = page.locator(".model-panel")
    assert panels.count() == len(demo_models["paths"])
    box = page.locator("#pad").bounding_box()
    before = _answers(page)
    # a "7": a top bar and a diagonal, with mouse events
    x0, y0 = box["x"], box["y"]
    page.mouse.move(x0 + 70, y0 + 60)
    page.mouse.down()
    for x, y in [(210, 60), (190, 120), (160, 180), (130, 240)]:
        page.mouse.move(x0 + x, y0 + y, steps=8)
    page.mouse.up()
    page.click("#predict")
    _wait_answer(page, before)
    # The reference: the pad's own PNG through the same preprocessing and models in this process.
    png = base64.b64decode(page.evaluate("document.getElementById('pad').toDataURL('image/png')").split(",", 1)[1])
    image = decode_image(png)
    expected = [p.predict([p.prepare(image)], top_k=3)[0] for p in (Predictor.load(m) for m in demo_models["paths"])]
    for i in range(panels.count()):
        panel = panels.nth(i)
        rows = panel.locator(".row").evaluate_all("rows => rows.map(r => [r.dataset.class, Number(r.dataset.prob)])")
        assert [c for c, _ in rows] == [c for _, c, _ in expected[i].top]
        assert [p for _, p in rows] == pytest.approx([p for _, _, p in expected[i].top], abs=1e-5)
        assert panel.get_attribute("data-top1") == "7"  # both demo models name the drawn 7 (p > 0.9 for each)
        total = float(panel.get_attribute("data-prob-sum"))
        assert abs(total - 1.0) < 1e-4, total
        shown = [float(p) for p in panel.locator(".row").evaluate_all("rows => rows.map(r => r.dataset.prob)")]
        assert shown == sorted(shown, reverse=True) and sum(shown) <= 1 + 1e-6
        assert "ms" in panel.locator(".latency").inner_text()


def test_uploading_an_mnist_digit_names_its_label(page, demo_models, tmp_path):
    png = tmp_path / "digit.png"
    png.write_bytes(off_centre_png(demo_models["images"][2]))
    label = str(demo_models["labels"][2])
    page.click("#clear")
    before = _answers(page)
    page.set_input_files("#upload", str(png))
    _wait_answer(page, before)
    tops = page.locator(".model-panel").evaluate_all("ps => ps.map(p => p.dataset.top1)")
    assert tops == [label] * len(demo_models["paths"])
    page.screenshot(path=str(tmp_path / "demo.png"))
    assert (tmp_path / "demo.png").stat().st_size > 10000
