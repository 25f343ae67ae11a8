"""A CLIP-L swap against the same checkpoint with that CLIP-L baked in offline (``-m integration``).

Needs, besides ``TE_SWITCH_WEBUI_URL`` and ``TE_SWITCH_WEBUI_MODELS`` (see test_webui_http.py),
``TE_SWITCH_WEBUI_BAKED_CLIP_L=<checkpoint>:<file>``: a checkpoint the server has that equals the loaded
SD1 checkpoint except for its CLIP-L, and the HF-layout CLIP-L file that was baked into it (a path on this
machine; it is linked into the server's encoder folder for the test). Swapping that file into the loaded
checkpoint must give the baked checkpoint's image pixel for pixel, and Built-in the loaded one's again.
With ``TE_SWITCH_WEBUI_LOG`` (the server's console log) Built-in must come back from the checkpoint file,
without the console line of the copy fallback. On reForge its *Text Encoder* setting is also checked: set to
the baked checkpoint, its encoders are the Built-in, ours win per slot, and Built-in comes back from that file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from webui_client import URL, call, encoder_dir, txt2img, write_clip

BAKED = os.environ.get("TE_SWITCH_WEBUI_BAKED_CLIP_L", "")
LOG = os.environ.get("TE_SWITCH_WEBUI_LOG", "")
FALLBACK = "on CPU to restore Built-in"  # the engine's line when a file cannot give the weights back

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


class ConsoleSince:
    """What the server writes to its log from now on (empty without ``TE_SWITCH_WEBUI_LOG``)."""

    def __init__(self) -> None:
        self.start = os.path.getsize(LOG) if LOG and os.path.exists(LOG) else None

    def text(self) -> str:
        if self.start is None:
            return ""
        with open(LOG, encoding="utf-8", errors="replace") as f:
            f.seek(self.start)
            return f.read()


def test_built_in_comes_back_from_the_checkpoint_file(baked: tuple[str, str]) -> None:
    if not LOG:
        pytest.skip("TE_SWITCH_WEBUI_LOG is not set (the server's console log)")
    _checkpoint, encoder = baked
    loaded = txt2img([True])
    console = ConsoleSince()
    assert txt2img([True, 1, "both", encoder]).hash != loaded.hash
    assert txt2img([True]).hash == loaded.hash
    assert FALLBACK not in console.text(), "Built-in was kept as a copy instead of read back from the checkpoint"


def test_reforge_text_encoder_setting_is_the_built_in_and_ours_wins(baked: tuple[str, str]) -> None:
    if call("/te-switch/v1/state")["host"].get("host") != "reforge":
        pytest.skip("the host has no Text Encoder setting (reForge only)")
    checkpoint, encoder = baked
    label = f"TE: {Path(checkpoint).stem}"  # reForge's name for a checkpoint in models/Stable-diffusion
    loaded = txt2img([True])
    baked_stock = txt2img(
        override_settings={"sd_model_checkpoint": checkpoint}, override_settings_restore_afterwards=True
    )
    other = write_clip(encoder_dir() / "te-switch-baked" / "other-clip-l.safetensors", seed=71)
    call("/te-switch/v1/refresh", {}, method="POST")
    call("/sdapi/v1/options", {"sd_text_encoder": label})  # reForge reloads the model with those encoders
    try:
        assert call("/te-switch/v1/state")["host"]["host_text_encoder"] == label
        with_setting = txt2img([True])
        assert with_setting.hash == baked_stock.hash, "the setting's encoders (the baked CLIP-L) are the Built-in"
        console = ConsoleSince()
        ours = txt2img([True, 1, "both", f"te-switch-baked/{other.name}"])
        assert ours.hash not in (with_setting.hash, loaded.hash)  # our file wins over the setting's
        assert txt2img([True, 1, "both", encoder]).hash == baked_stock.hash
        assert txt2img([True]).hash == with_setting.hash  # Built-in: the setting's encoders again
        assert FALLBACK not in console.text(), (
            "Built-in was kept as a copy instead of read back from the setting's file"
        )
    finally:
        call("/sdapi/v1/options", {"sd_text_encoder": "Automatic"})
        other.unlink(missing_ok=True)
        call("/te-switch/v1/refresh", {}, method="POST")
    assert txt2img([True]).hash == loaded.hash
