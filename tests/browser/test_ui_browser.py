"""Headless Chromium against ``python -m te_switch ui`` on the demo model.

Needs Debian's ``chromium`` (``apt-get install -y chromium``) and Playwright for Python
(``pip install playwright``); Playwright's own browser download is never used. Skipped with the
reason when either is missing.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("TE_SWITCH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 300  # first run builds the demo (a few seconds) and imports diffusers + gradio


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def sync_playwright() -> object:
    if not os.path.isfile(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    playwright = pytest.importorskip("playwright.sync_api", reason="Playwright missing (pip install playwright)")
    return playwright.sync_playwright


@pytest.fixture(scope="module")
def server(sync_playwright: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python -m te_switch ui`` on a free port, with the session's demo cache."""
    port = _free_port()
    log = tmp_path_factory.mktemp("ui") / "server.log"
    env = {
        **os.environ,
        "TE_SWITCH_CACHE": str(tmp_path_factory.getbasetemp() / "te_switch_cache"),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "te_switch", "ui", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`te_switch ui` exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"`te_switch ui` did not answer in {START_TIMEOUT} s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_panel_slider_encoder_generate(sync_playwright: object, server: str) -> None:
    from playwright.sync_api import expect

    with sync_playwright() as p:  # type: ignore[operator]
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(server, timeout=60_000)
            expect(page.locator("#te_switch_demo_note")).to_contain_text("draws noise", timeout=60_000)

            # the effective-layer line follows the slider: drag it from 1 to 2
            layers = page.locator("#te_switch_layers")
            expect(layers).to_have_text("SD1 · CLIP-L layer 12/12 · native", timeout=60_000)
            slider = page.locator("#te_switch_clip_skip input[type=range]")
            box = slider.bounding_box()
            assert box is not None
            y = box["y"] + box["height"] / 2
            page.mouse.move(box["x"] + 3, y)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * 1.5 / 11, y, steps=5)
            page.mouse.up()
            expect(layers).to_have_text("SD1 · CLIP-L layer 11/12", timeout=60_000)
            expect(page.locator("#te_switch_clip_skip_auto input")).not_to_be_checked(timeout=60_000)

            # a Long-CLIP-L: the token counter switches to 246-token chunks
            page.fill("#te_switch_prompt textarea", "a lighthouse at dusk")
            counter = page.locator("#te_switch_token_counter")
            expect(counter).to_have_text("4/75", timeout=60_000)
            page.locator("#te_switch_clip_l input").click()
            page.locator("ul[role=listbox] li", has_text="long-clip-l.safetensors").click()
            expect(counter).to_have_text("4/246", timeout=60_000)
            expect(page.locator("#te_switch_hint")).to_contain_text("246", timeout=60_000)

            page.click("#te_switch_generate")
            infotext = page.locator("#te_switch_infotext textarea")
            expect(infotext).to_have_value(
                re.compile(r"TE CLIP-L: long-clip-l\.safetensors \[[0-9a-f]{10}\]"), timeout=240_000
            )
            value = infotext.input_value()
            assert value.startswith("a lighthouse at dusk\n")
            assert "Clip skip: 2" in value
            image = page.locator("#te_switch_image img")
            expect(image).to_be_visible(timeout=60_000)
            assert image.evaluate("img => img.naturalWidth") == 256
            # the served file is the PNG the page wrote, its infotext inside (not a re-encoded WebP)
            served = page.request.get(image.evaluate("img => img.src"))
            body = served.body()
            assert body.startswith(b"\x89PNG\r\n\x1a\n"), body[:16]
            assert b"parameters" in body
            refresh = page.locator("#te_switch_clip_l_refresh")
            expect(refresh).to_have_text("Rescan")
            expect(page.locator("#te_switch_timing")).to_contain_text("encode", timeout=10_000)

            # the inspect table lists the demo's encoder files
            page.locator("#te_switch_library > button").click()
            expect(page.locator("#te_switch_inspect")).to_contain_text("long-clip-l.safetensors", timeout=60_000)
            expect(page.locator("#te_switch_inspect")).to_contain_text("clip-l-openai-fp8.safetensors")
        finally:
            browser.close()
