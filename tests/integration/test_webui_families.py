"""SD2 and SD3 over HTTP (A1111 runs both; stock A1111 ignores Clip skip on them): the effective-layer
line, clip skip reaching the towers, and a swap of the family's CLIP-H / CLIP-G and back.

Needs, besides ``TE_SWITCH_WEBUI_URL`` and ``TE_SWITCH_WEBUI_MODELS`` (see test_webui_http.py),
``TE_SWITCH_WEBUI_FAMILY_CHECKPOINTS``: comma-separated ``checkpoint:family`` pairs the server has,
e.g. ``sd21-random.safetensors:sd2,sd3-random.safetensors:sd3``. Each is selected in turn and the
server's checkpoint is put back afterwards.

Requests use emphasis "No norm": A1111's "Original" emphasis rescales the cond by
``mean(z) / mean(z·weights)``, which is 0/0 = NaN when a synthetic checkpoint's final layer norm has
weight 1 and bias 0 and the mean comes out exactly 0.0 (seen with the CPU test host's random SD2 at
layer 22). That is the host's arithmetic, unrelated to clip skip; real checkpoints have a bias.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from webui_client import URL, Result, call, checkpoint_selected, encoder_dir, txt2img, write_clip

NO_NORM = {"override_settings": {"emphasis": "No norm"}}
PAIRS = [
    tuple(p.split(":", 1)) for p in os.environ.get("TE_SWITCH_WEBUI_FAMILY_CHECKPOINTS", "").split(",") if ":" in p
]
# family -> (label on the line, the slot swapped here, the file's shape)
SWAPS = {
    "sd2": ("SD2 · CLIP-H layer 23/24", "clip_h", {"width": 1024, "layers": 24, "projection": True}),
    "sd3": (
        "SD3 · CLIP-L layer 11/12 · CLIP-G layer 31/32",
        "clip_g",
        {"width": 1280, "layers": 32, "projection": True},
    ),
}

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not URL, reason="TE_SWITCH_WEBUI_URL is not set (no WebUI to talk to)"),
    pytest.mark.skipif(not PAIRS, reason="TE_SWITCH_WEBUI_FAMILY_CHECKPOINTS is not set"),
]


@pytest.fixture(scope="module", autouse=True)
def restore_checkpoint() -> Iterator[None]:
    with checkpoint_selected(None):
        yield


@pytest.mark.parametrize(("checkpoint", "family"), PAIRS)
def test_family_clip_skip_and_swap(checkpoint: str, family: str) -> None:
    line, slot, shape = SWAPS[family]
    call("/sdapi/v1/options", {"sd_model_checkpoint": checkpoint, "te_switch_clip_skip": "Auto"})
    native = txt2img([True], **NO_NORM)
    state = call("/te-switch/v1/state")
    assert state["host"]["family"] == family
    assert state["layers"].startswith(line)

    assert txt2img([False, 2], **NO_NORM).hash == native.hash  # the family's native layer
    three = txt2img([False, 3], **NO_NORM)
    assert three.hash != native.hash  # stock A1111 ignores Clip skip here; TE Switch reaches the towers
    # A1111 records Emphasis only for prompts with ( or [: pass it again
    assert Result(call("/sdapi/v1/txt2img", {"infotext": three.infotext, **NO_NORM})).hash == three.hash

    folder = encoder_dir() / "te-switch-it-families"
    path = write_clip(folder / f"it-{slot}.safetensors", seed=21, **shape)
    call("/te-switch/v1/refresh", {}, method="POST")
    try:
        label = f"te-switch-it-families/{path.name}"
        swapped = txt2img([{slot: label}], **NO_NORM)
        assert swapped.hash != native.hash
        assert call("/te-switch/v1/state")["host"]["slots"][slot]["encoder"] == label
        assert txt2img([True], **NO_NORM).hash == native.hash  # Built-in: bit-identical again
    finally:
        path.unlink(missing_ok=True)
        folder.rmdir()
        call("/te-switch/v1/refresh", {}, method="POST")
