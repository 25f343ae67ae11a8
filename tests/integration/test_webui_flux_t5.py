"""Forge 2 Flux over HTTP: a T5 swapped in at precision Auto gives the image stock Forge gives when it
loads that same file itself through its *VAE / Text Encoder* menu (``forge_additional_modules``), pixel
for pixel; Built-in comes back bit for bit.

Needs ``TE_SWITCH_WEBUI_URL`` (a Forge 2 with TE Switch), ``TE_SWITCH_WEBUI_FLUX_CHECKPOINT`` (a Flux or
Chroma checkpoint the server has, selected for the module and put back afterwards) and
``TE_SWITCH_WEBUI_T5_FILES``: comma-separated T5 files as both Forge's menu and TE Switch name them
(relative to ``models/text_encoder``, e.g. ``rig/t5xxl-d2-fp16.safetensors,rig/t5xxl-d2-Q8_0.gguf``).
``TE_SWITCH_WEBUI_T5_HOST_FAILS``: those of them stock Forge cannot load (its menu answers 5xx: Forge
2.0.1 cannot load a GGUF whose ``token_embd`` is F16); for them only the swap and the restore are checked.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Iterator

import pytest
from webui_client import URL, HTTPError, Result, call, checkpoint_selected, txt2img

CHECKPOINT = os.environ.get("TE_SWITCH_WEBUI_FLUX_CHECKPOINT", "")
FILES = [f for f in os.environ.get("TE_SWITCH_WEBUI_T5_FILES", "").split(",") if f]
HOST_FAILS = {f for f in os.environ.get("TE_SWITCH_WEBUI_T5_HOST_FAILS", "").split(",") if f}
# Flux's own settings (cfg 1, distilled guidance), smallest image this host renders
FLUX = {"steps": 3, "scheduler": "Simple", "cfg_scale": 1, "distilled_cfg_scale": 3.5}

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not URL, reason="TE_SWITCH_WEBUI_URL is not set (no WebUI to talk to)"),
    pytest.mark.skipif(not CHECKPOINT, reason="TE_SWITCH_WEBUI_FLUX_CHECKPOINT is not set"),
    pytest.mark.skipif(not FILES, reason="TE_SWITCH_WEBUI_T5_FILES is not set"),
]


def _rgb(result: Result) -> list[int]:
    from PIL import Image

    return list(Image.open(io.BytesIO(base64.b64decode(result.images[0]))).convert("RGB").tobytes())


def _difference(a: Result, b: Result) -> str:
    pa, pb = _rgb(a), _rgb(b)
    diffs = [abs(x - y) for x, y in zip(pa, pb, strict=True)]
    return f"max {max(diffs)} levels, {sum(d > 0 for d in diffs)} of {len(diffs)} channel values differ"


@pytest.fixture(scope="module")
def builtin() -> Iterator[Result]:
    with checkpoint_selected(CHECKPOINT, forge_additional_modules=[]):
        yield txt2img([True], **FLUX)


@pytest.mark.parametrize("name", FILES)
def test_t5_swap_at_auto_equals_forge_loading_the_file(builtin: Result, name: str) -> None:
    ours = txt2img([{"t5xxl": name}], **FLUX)
    assert ours.hash != builtin.hash, "the swap changed nothing"
    assert f"TE T5-XXL: {name}" in ours.infotext
    if name in HOST_FAILS:
        with pytest.raises(HTTPError) as info:
            txt2img(None, override_settings={"forge_additional_modules": [name]}, **FLUX)
        assert info.value.status >= 500, f"stock Forge loads {name} now: move it out of TE_SWITCH_WEBUI_T5_HOST_FAILS"
    else:
        stock = txt2img(None, override_settings={"forge_additional_modules": [name]}, **FLUX)
        assert stock.hash != builtin.hash, "Forge's menu did not load the file"
        assert ours.hash == stock.hash, f"{name}: TE Switch vs Forge's menu: {_difference(ours, stock)}"
    again = txt2img([True], **FLUX)
    assert again.hash == builtin.hash, f"Built-in after {name}: {_difference(again, builtin)}"


CLIP_L = os.environ.get("TE_SWITCH_WEBUI_CLIP_L_FILE", "")  # e.g. rig/longclip-l-hf.safetensors


@pytest.mark.skipif(not CLIP_L, reason="TE_SWITCH_WEBUI_CLIP_L_FILE is not set")
def test_both_slots_paste_refusals_and_restore(builtin: Result) -> None:
    """T5 and CLIP-L swapped together: infotext names both and pastes back to the same image; missing,
    truncated and wrong-kind T5 files are refused with 4xx and change nothing; Built-in restores both."""
    from pathlib import Path

    state = call("/te-switch/v1/state")
    assert state["host"]["family"] in ("flux", "chroma")
    assert "clip skip has no effect" in state["layers"]
    t5 = FILES[0]
    both = txt2img([{"t5xxl": t5, "clip_l": CLIP_L}], **FLUX)
    assert both.hash != builtin.hash
    assert f"TE T5-XXL: {t5} [" in both.infotext
    assert f"TE CLIP-L: {CLIP_L} [" in both.infotext
    slots = call("/te-switch/v1/state")["host"]["slots"]
    assert (slots["t5xxl"]["encoder"], slots["clip_l"]["encoder"]) == (t5, CLIP_L)
    pasted = Result(call("/sdapi/v1/txt2img", {"infotext": both.infotext}))
    assert pasted.hash == both.hash
    assert txt2img([True], **FLUX).hash == builtin.hash  # both back, bit for bit

    folder = Path(os.environ["TE_SWITCH_WEBUI_MODELS"]) / "text_encoder" / "te-switch-it"
    folder.mkdir(exist_ok=True)
    source = Path(os.environ["TE_SWITCH_WEBUI_MODELS"]) / "text_encoder" / t5
    truncated = folder / "t5-truncated.safetensors"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    call("/te-switch/v1/refresh", {}, method="POST")
    try:
        for value in ("te-switch-it/nope.safetensors", f"te-switch-it/{truncated.name}", CLIP_L):
            with pytest.raises(HTTPError) as info:
                txt2img([{"t5xxl": value}], **FLUX)
            assert 400 <= info.value.status < 500, (value, info.value.status, info.value.body)
        assert txt2img([True], **FLUX).hash == builtin.hash
    finally:
        truncated.unlink(missing_ok=True)
        folder.rmdir()
        call("/te-switch/v1/refresh", {}, method="POST")


GGUF_HELD = os.environ.get("TE_SWITCH_WEBUI_T5_GGUF_HELD", "")  # e.g. rig/t5xxl-d2-Q8_0.gguf


@pytest.mark.skipif(not GGUF_HELD, reason="TE_SWITCH_WEBUI_T5_GGUF_HELD is not set")
def test_swap_into_a_t5_forge_holds_as_gguf(builtin: Result) -> None:
    """Forge holding a GGUF T5 from its own menu: a swapped file gives Forge's own image for that file, and
    Built-in gives the GGUF image back bit for bit."""
    call("/sdapi/v1/options", {"forge_additional_modules": [GGUF_HELD]})
    try:
        held = txt2img([True], **FLUX)
        assert held.hash != builtin.hash
        name = next(f for f in FILES if f != GGUF_HELD and f not in HOST_FAILS)
        ours = txt2img([{"t5xxl": name}], **FLUX)
        assert ours.hash != held.hash
        assert txt2img([True], **FLUX).hash == held.hash, "Built-in after a swap into the GGUF-held T5"
        stock = txt2img(None, override_settings={"forge_additional_modules": [name]}, **FLUX)
        assert ours.hash == stock.hash, f"{name} into a GGUF-held T5 vs Forge's menu: {_difference(ours, stock)}"
    finally:
        call("/sdapi/v1/options", {"forge_additional_modules": []})
