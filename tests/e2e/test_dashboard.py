"""The dashboard in real headless Chromium (Debian's, driven by Playwright): upload, compress, watch, chart."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers import CNN, CNN_SAMPLES
from tests.processes import Server

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Without these, Chromium tries Google's services at start, and this machine refuses them by the dozen.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture
def browser_page() -> object:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (`make test` installs it with apt)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        yield page
        browser.close()


def test_dashboard_uploads_compresses_and_charts(server_factory: Callable[..., Server], tmp_path: Path,
                                                 browser_page: object) -> None:
    from playwright.sync_api import Page, expect

    page: Page = browser_page  # type: ignore[assignment]
    url = server_factory(tmp_path / "data").url
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url + "/")
    expect(page.get_by_text("no models yet")).to_be_visible()

    form = page.get_by_test_id("upload-form")
    form.locator("input[name=name]").fill("digits")
    form.locator("input[name=file]").set_input_files(str(CNN))  # the example model `make run` serves
    form.locator("input[name=samples]").set_input_files(str(CNN_SAMPLES))
    form.get_by_role("button", name="Upload").click()
    expect(page.locator("#message")).to_have_text("uploaded digits (ready)")
    variants = page.get_by_test_id("variants-digits")
    expect(variants.locator("tr[data-variant=original]")).to_contain_text("reference")

    compress = page.get_by_test_id("compress-digits")
    # auto: its result is a variant, and every candidate it tried is a hollow point on the charts.
    compress.locator("select").select_option("auto")
    compress.get_by_role("button", name="Start").click()
    expect(page.locator("#message")).to_contain_text("queued: digits → auto")
    job = page.get_by_test_id("jobs").locator("tr").first
    expect(job).to_have_attribute("data-state", "succeeded", timeout=120_000)
    expect(job).to_contain_text("100%")

    row = variants.locator("tr[data-variant=auto]")
    expect(row).to_be_visible()
    expect(row).to_contain_text("within")
    charts = page.get_by_test_id("charts-digits")
    candidates = [c for j in httpx.get(f"{url}/jobs").json()["jobs"] for c in j["candidates"] or [] if c["report"]]
    assert len(candidates) >= 2
    for chart in ("speedup", "size"):
        expect(charts.locator(f"svg[data-chart={chart}] circle[data-point=auto]")).to_have_count(1)
        expect(charts.locator(f"svg[data-chart={chart}] circle[data-point=original]")).to_have_count(1)
        expect(charts.locator(f'svg[data-chart={chart}] circle[data-point^="auto: "]')).to_have_count(len(candidates))

    row.get_by_role("button", name="make default").click()
    expect(page.locator("#message")).to_have_text("digits: auto now answers unversioned requests")
    expect(page.get_by_test_id("models")).to_contain_text("routing: default auto")
    assert httpx.get(f"{url}/models/digits").json()["routing"]["default"] == "auto"
    variants.locator("tr[data-variant=original]").get_by_role("button", name="make default").click()
    expect(page.get_by_test_id("models")).to_contain_text("routing: default original")

    # Traffic shows up as per-variant latency from the server's own histograms.
    with np.load(CNN_SAMPLES) as archive:
        rows = archive["input"][:4].tolist()
    for _ in range(20):
        assert httpx.post(f"{url}/models/digits/predict", json={"inputs": {"input": rows}}).status_code == 200
    original = variants.locator("tr[data-variant=original] td")
    expect(original.nth(10)).to_have_text("20", timeout=10_000)
    assert original.nth(11).inner_text() != "–" and original.nth(12).inner_text() != "–"

    shot = Path(os.environ.get("DASHBOARD_SCREENSHOT", tmp_path / "dashboard.png"))
    page.screenshot(path=str(shot), full_page=True)
    _assert_not_blank(shot)
    assert errors == []


def _assert_not_blank(png: Path) -> None:
    """Decode the screenshot and check it shows many distinct colours, not one flat fill."""
    import zlib

    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    chunks, position = [], 8
    while position < len(data):
        length = int.from_bytes(data[position:position + 4], "big")
        kind = data[position + 4:position + 8]
        if kind == b"IDAT":
            chunks.append(data[position + 8:position + 8 + length])
        position += 12 + length
    raw = zlib.decompress(b"".join(chunks))
    assert width > 800 and height > 600 and len(raw) > width * height  # RGB(A) rows with a filter byte each
    colours = {raw[i:i + 3] for i in range(1, len(raw) - 3, 97)}
    assert len(colours) > 20, f"screenshot looks blank ({len(colours)} colours)"
