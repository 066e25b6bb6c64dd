"""The dashboard in real headless Chromium (Debian's, driven by Playwright): upload, compress, watch, chart."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import pytest

from tests.helpers import CNN, CNN_SAMPLES
from tests.processes import Server

if TYPE_CHECKING:
    from playwright.async_api import Page

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Without these, Chromium tries Google's services at start, and this machine refuses them by the dozen.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_dashboard_uploads_compresses_and_charts(server_factory: Callable[..., Server], tmp_path: Path) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (`make test` installs it with apt)")
    url = server_factory(tmp_path / "data").url
    # Playwright's async API: its sync API switches greenlets on the test process's main thread.
    asyncio.run(_drive_dashboard(url, tmp_path))


async def _drive_dashboard(url: str, tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page(viewport={"width": 1400, "height": 1100})
            await _use_dashboard(page, url, tmp_path)
        finally:
            await browser.close()


async def _use_dashboard(page: Page, url: str, tmp_path: Path) -> None:
    from playwright.async_api import expect

    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(url + "/")
    await expect(page.get_by_text("no models yet")).to_be_visible()

    form = page.get_by_test_id("upload-form")
    await form.locator("input[name=name]").fill("digits")
    await form.locator("input[name=file]").set_input_files(str(CNN))  # the example model `make run` serves
    await form.locator("input[name=samples]").set_input_files(str(CNN_SAMPLES))
    await form.get_by_role("button", name="Upload").click()
    await expect(page.locator("#message")).to_have_text("uploaded digits (ready)")
    variants = page.get_by_test_id("variants-digits")
    await expect(variants.locator("tr[data-variant=original]")).to_contain_text("reference")

    compress = page.get_by_test_id("compress-digits")
    # auto: its result is a variant, and every candidate it tried is a hollow point on the charts.
    await compress.locator("select").select_option("auto")
    await compress.get_by_role("button", name="Start").click()
    await expect(page.locator("#message")).to_contain_text("queued: digits → auto")
    job = page.get_by_test_id("jobs").locator("tr").first
    await expect(job).to_have_attribute("data-state", "succeeded", timeout=120_000)
    await expect(job).to_contain_text("100%")

    row = variants.locator("tr[data-variant=auto]")
    await expect(row).to_be_visible()
    await expect(row).to_contain_text("within")
    charts = page.get_by_test_id("charts-digits")
    candidates = [c for j in httpx.get(f"{url}/jobs").json()["jobs"] for c in j["candidates"] or [] if c["report"]]
    assert len(candidates) >= 2
    for chart in ("speedup", "size"):
        await expect(charts.locator(f"svg[data-chart={chart}] circle[data-point=auto]")).to_have_count(1)
        await expect(charts.locator(f"svg[data-chart={chart}] circle[data-point=original]")).to_have_count(1)
        await expect(charts.locator(f'svg[data-chart={chart}] circle[data-point^="auto: "]')).to_have_count(
            len(candidates))

    await row.get_by_role("button", name="make default").click()
    await expect(page.locator("#message")).to_have_text("digits: auto now answers unversioned requests")
    await expect(page.get_by_test_id("models")).to_contain_text("routing: default auto")
    assert httpx.get(f"{url}/models/digits").json()["routing"]["default"] == "auto"
    await variants.locator("tr[data-variant=original]").get_by_role("button", name="make default").click()
    await expect(page.get_by_test_id("models")).to_contain_text("routing: default original")

    # Traffic shows up as per-variant latency from the server's own histograms.
    with np.load(CNN_SAMPLES) as archive:
        rows = archive["input"][:4].tolist()
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        for _ in range(20):
            response = await client.post("/models/digits/predict", json={"inputs": {"input": rows}})
            assert response.status_code == 200
    original = variants.locator("tr[data-variant=original] td")
    await expect(original.nth(10)).to_have_text("20", timeout=10_000)
    assert await original.nth(11).inner_text() != "–" and await original.nth(12).inner_text() != "–"

    shot = Path(os.environ.get("DASHBOARD_SCREENSHOT", tmp_path / "dashboard.png"))
    await page.screenshot(path=str(shot), full_page=True)
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
