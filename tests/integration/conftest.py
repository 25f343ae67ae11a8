"""Integration session setup: optionally select the checkpoint the suite needs (and put it back).

``TE_SWITCH_WEBUI_CHECKPOINT`` (e.g. ``sd15-random.safetensors``): set as ``sd_model_checkpoint`` before
the first test, restored after the last. Without it the server's current checkpoint must be SD1.
``TE_SWITCH_WEBUI_LOG``: the server's console log; the session fails if a traceback appears in what the
server writes there while the tests run (refused files are one line, never a traceback).
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


LOG = os.environ.get("TE_SWITCH_WEBUI_LOG", "")
_log_start: list[int] = []


def pytest_sessionstart(session: pytest.Session) -> None:
    if URL and LOG and os.path.exists(LOG):
        _log_start.append(os.path.getsize(LOG))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not _log_start:
        return
    with open(LOG, encoding="utf-8", errors="replace") as f:
        f.seek(_log_start[0])
        written = f.read()
    if "Traceback" in written:
        start = written.index("Traceback")
        print(
            f"\nthe server logged a traceback during the tests ({LOG}):\n{written[max(0, start - 200) : start + 3000]}"
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    else:
        print(f"\nno traceback in the server log during the tests ({LOG})")


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
