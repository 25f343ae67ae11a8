"""A CLIP-L swap against the same checkpoint with that CLIP-L baked in offline (``-m integration``).

Needs, besides ``TE_SWITCH_WEBUI_URL`` and ``TE_SWITCH_WEBUI_MODELS`` (see test_webui_http.py),
``TE_SWITCH_WEBUI_BAKED_CLIP_L=<checkpoint>:<file>``: a checkpoint the server has that equals the loaded
SD1 checkpoint except for its CLIP-L, and the HF-layout CLIP-L file that was baked into it (a path on this
machine; it is linked into the server's encoder folder for the test). Swapping that file into the loaded
checkpoint must give the baked checkpoint's image pixel for pixel, and Built-in the loaded one's again.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from webui_client import URL, call, encoder_dir, txt2img

BAKED = os.environ.get("TE_SWITCH_WEBUI_BAKED_CLIP_L", "")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not URL, reason="TE_SWITCH_WEBUI_URL is not set (no WebUI to talk to)"),
    pytest.mark.skipif(":" not in BAKED, reason="TE_SWITCH_WEBUI_BAKED_CLIP_L is not set (<checkpoint>:<file>)"),
]


@pytest.fixture(scope="module")
def baked() -> Iterator[tuple[str, str]]:
    """(baked checkpoint, the encoder's library name)."""
    checkpoint, source = BAKED.split(":", 1)
    link = encoder_dir() / "te-switch-baked" / Path(source).name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(Path(source).resolve())
    call("/te-switch/v1/refresh", {}, method="POST")
    try:
        yield checkpoint, f"te-switch-baked/{link.name}"
    finally:
        link.unlink(missing_ok=True)
        link.parent.rmdir()
        call("/te-switch/v1/refresh", {}, method="POST")


def test_clip_l_swap_equals_the_baked_checkpoint(baked: tuple[str, str]) -> None:
    checkpoint, encoder = baked
    loaded = txt2img([True])
    swapped = txt2img([True, 1, "both", encoder])
    assert swapped.hash != loaded.hash
    assert txt2img([True]).hash == loaded.hash  # Built-in again: the checkpoint's own, bit for bit
    stock = txt2img(override_settings={"sd_model_checkpoint": checkpoint}, override_settings_restore_afterwards=True)
    assert stock.hash == swapped.hash, "the swap differs from the checkpoint with that CLIP-L baked in"
    assert txt2img([True]).hash == loaded.hash  # the loaded checkpoint is back, with its own CLIP-L
