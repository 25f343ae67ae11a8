"""Integration session setup: optionally select the checkpoint the suite needs (and put it back).

``TE_SWITCH_WEBUI_CHECKPOINT`` (e.g. ``sd15-random.safetensors``): set as ``sd_model_checkpoint`` before
the first test, restored after the last. Without it the server's current checkpoint must be SD1.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Iterator

import pytest

URL = os.environ.get("TE_SWITCH_WEBUI_URL", "").rstrip("/")


def _options(payload: dict | None = None) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(URL + "/sdapi/v1/options", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=1800) as response:
        return json.loads(response.read() or b"null") or {}


@pytest.fixture(scope="session", autouse=True)
def webui_checkpoint() -> Iterator[None]:
    wanted = os.environ.get("TE_SWITCH_WEBUI_CHECKPOINT")
    if not URL or not wanted:
        yield
        return
    before = _options().get("sd_model_checkpoint")
    _options({"sd_model_checkpoint": wanted})
    try:
        yield
    finally:
        if before and before != wanted:
            _options({"sd_model_checkpoint": before})
