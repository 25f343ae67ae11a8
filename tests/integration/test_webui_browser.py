"""The panel and its JavaScript in a real WebUI page (headless Chromium via Playwright).

Same environment as ``test_webui_http.py`` (``TE_SWITCH_WEBUI_URL``; an SD1 checkpoint loaded);
``TE_SWITCH_CHROMIUM`` names the browser binary (default: Playwright's own, else /usr/bin/chromium).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

URL = os.environ.get("TE_SWITCH_WEBUI_URL", "").rstrip("/")
PREFIX = "script_txt2img_clip_skip__text_encoders_"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.browser,
    pytest.mark.skipif(not URL, reason="TE_SWITCH_WEBUI_URL is not set (no WebUI to talk to)"),
]


def load_a_model() -> None:
    """Forge builds the model on the first generation: make one so the panel has something to show."""
    with urllib.request.urlopen(f"{URL}/te-switch/v1/state", timeout=60) as response:
        if json.loads(response.read())["host"]["family"] is not None:
            return
    body = json.dumps({"prompt": "warm-up", "steps": 1, "width": 64, "height": 64}).encode()
    request = urllib.request.Request(f"{URL}/sdapi/v1/txt2img", data=body, headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=1800).read()


@pytest.fixture(scope="module")
def page() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    load_a_model()
    executable = os.environ.get("TE_SWITCH_CHROMIUM") or shutil.which("chromium") or None
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        tab = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        tab.on("pageerror", lambda e: errors.append(str(e)))
        tab.goto(URL, timeout=180_000)
        tab.wait_for_selector(f"#{PREFIX}accordion", timeout=180_000)
        tab.locator(f"#{PREFIX}accordion .label-wrap").first.click()
        tab.errors = errors
        yield tab
        browser.close()


def element(page: Any, item: str) -> Any:
    # Gradio 3 repeats some elem_ids on an inner element: the first is the component's block
    return page.locator(f"#{PREFIX}{item}").first


def wait_for(condition: Any, timeout: float = 30.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if condition():
            return True
        time.sleep(0.25)
    return False


def test_panel_follows_the_loaded_model(page: Any) -> None:
    assert wait_for(lambda: element(page, "layers").inner_text().strip().startswith("SD1"))
    assert element(page, "clip_l_row").is_visible()
    assert not element(page, "clip_g_row").is_visible()
    assert not element(page, "scope").is_visible()  # one tower on SD1
    assert page.errors == []


def test_slider_looks_inactive_while_auto(page: Any) -> None:
    slider = element(page, "clip_skip")
    assert "te-switch-inactive" in (slider.get_attribute("class") or "")
    element(page, "clip_skip_auto").locator("input[type=checkbox]").uncheck()
    assert wait_for(lambda: "te-switch-inactive" not in (slider.get_attribute("class") or ""))
    assert wait_for(lambda: "layer 12/12" in element(page, "layers").inner_text())
    element(page, "clip_skip_auto").locator("input[type=checkbox]").check()
    assert wait_for(lambda: "te-switch-inactive" in (slider.get_attribute("class") or ""))


def test_sync_button_is_hidden_but_clickable(page: Any) -> None:
    assert not element(page, "sync").is_visible()
    page.evaluate(f"() => gradioApp().getElementById('{PREFIX}sync').click()")
    assert wait_for(lambda: element(page, "layers").inner_text().strip().startswith("SD1"))
