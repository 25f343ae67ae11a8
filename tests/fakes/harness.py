"""Put a fake WebUI on ``sys.path`` for one test and take it away afterwards."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

FAKES = os.path.dirname(os.path.abspath(__file__))
# top-level packages a fake tree may provide; cleared before and after so trees never mix
FAKE_ROOTS = ("modules", "ldm", "sgm", "backend", "modules_forge", "scripts_fake", "networks")


def _purge() -> None:
    for name in list(sys.modules):
        if name.split(".", 1)[0] in FAKE_ROOTS:
            del sys.modules[name]
    for name in list(sys.modules):
        if name.startswith("te_switch.hosts.a1111") or name.startswith("te_switch.hosts.forge"):
            del sys.modules[name]


@contextmanager
def fake_webui(host: str) -> Iterator[None]:
    """``host``: 'a1111' or 'forge'. Imports of ``modules.*`` inside resolve to the fakes."""
    paths = [os.path.join(FAKES, host), os.path.join(FAKES, "common")]
    saved = list(sys.path)
    _purge()
    sys.path[:0] = paths
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path[:] = saved
        _purge()
