"""Put a fake WebUI on ``sys.path`` for one test and take it away afterwards."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

FAKES = os.path.dirname(os.path.abspath(__file__))
# top-level packages a fake tree may provide; cleared before and after so trees never mix
FAKE_ROOTS = ("modules", "ldm", "sgm", "backend", "modules_forge", "ldm_patched", "scripts_fake", "networks")
# trees a host's fake is layered from, first wins (reForge and Forge Classic keep A1111's text path)
LAYERS = {"reforge": ("reforge", "ldm_forge", "a1111"), "forge-classic": ("forge_classic", "ldm_forge", "a1111")}


def _purge() -> None:
    for name in list(sys.modules):
        if name.split(".", 1)[0] in FAKE_ROOTS:
            del sys.modules[name]
    for name in list(sys.modules):
        if name.startswith(("te_switch.hosts.a1111", "te_switch.hosts.forge", "te_switch.hosts.ldm_forge")):
            del sys.modules[name]


@contextmanager
def fake_webui(host: str) -> Iterator[None]:
    """``host``: 'a1111', 'forge', 'reforge' or 'forge-classic'. Imports of ``modules.*`` inside resolve to the fakes."""
    paths = [os.path.join(FAKES, tree) for tree in LAYERS.get(host, (host,))] + [os.path.join(FAKES, "common")]
    saved = list(sys.path)
    _purge()
    sys.path[:0] = paths
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path[:] = saved
        _purge()
