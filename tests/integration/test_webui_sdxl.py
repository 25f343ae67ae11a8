"""SDXL over HTTP: clip skip on both towers and per tower, a CLIP-G swap (A1111 holds CLIP-G in
OpenCLIP layout, Forge in HF layout) and a Long-CLIP-L swap with CLIP-G stretched to 248 positions.

Needs, besides ``TE_SWITCH_WEBUI_URL`` and ``TE_SWITCH_WEBUI_MODELS`` (see test_webui_http.py),
``TE_SWITCH_WEBUI_SDXL_CHECKPOINT``: an SDXL checkpoint the server has (e.g. ``sdxl-random.safetensors``).
The module switches to it and back. The CLIP-G file written here is real size (1.4 GB, 32×1280).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from webui_client import URL, Result, call, checkpoint_selected, encoder_dir, txt2img, write_clip

SDXL = os.environ.get("TE_SWITCH_WEBUI_SDXL_CHECKPOINT", "")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not URL, reason="TE_SWITCH_WEBUI_URL is not set (no WebUI to talk to)"),
    pytest.mark.skipif(not SDXL, reason="TE_SWITCH_WEBUI_SDXL_CHECKPOINT is not set"),
]


@pytest.fixture(scope="module", autouse=True)
def sdxl_checkpoint() -> Iterator[None]:
    with checkpoint_selected(SDXL, te_switch_clip_skip="Auto"):
        yield


@pytest.fixture(scope="module")
def native() -> Result:
    result = txt2img([True])
    assert call("/te-switch/v1/state")["host"]["family"] == "sdxl"
    return result


@pytest.fixture(scope="module")
def encoders() -> Iterator[dict[str, str]]:
    folder = encoder_dir() / "te-switch-it-sdxl"
    files = {
        "clip_g": write_clip(folder / "it-clip-g.safetensors", seed=11, width=1280, layers=32, projection=True),
        "long_l": write_clip(folder / "it-long-clip-l.safetensors", seed=12, positions=248),
    }
    call("/te-switch/v1/refresh", {}, method="POST")
    try:
        yield {k: f"te-switch-it-sdxl/{p.name}" for k, p in files.items()}
    finally:
        for p in files.values():
            p.unlink(missing_ok=True)
        folder.rmdir()
        call("/te-switch/v1/refresh", {}, method="POST")


def test_the_effective_layer_line_is_sdxl(native: Result) -> None:
    assert call("/te-switch/v1/state")["layers"].startswith("SDXL · CLIP-L layer 11/12 · CLIP-G layer 31/32")


def test_clip_skip_two_is_native_and_three_is_not(native: Result) -> None:
    assert txt2img([False, 2]).hash == native.hash  # SDXL conditions on the penultimate layers already
    three = txt2img([False, 3])
    assert three.hash != native.hash  # stock A1111 ignores Clip skip on SDXL; here it reaches both towers
    assert "Clip skip: 3" in three.infotext
    again = Result(call("/sdapi/v1/txt2img", {"infotext": three.infotext}))
    assert again.hash == three.hash


def test_scope_limits_clip_skip_to_one_tower(native: Result) -> None:
    both = txt2img([False, 4, "both"])
    only_l = txt2img([False, 4, "CLIP-L only"])
    only_g = txt2img([False, 4, "CLIP-G only"])
    assert len({both.hash, only_l.hash, only_g.hash, native.hash}) == 4
    assert "Clip skip scope: CLIP-L only" in only_l.infotext
    assert "Clip skip scope" not in both.infotext


def test_clip_g_swap_and_back(native: Result, encoders: dict[str, str]) -> None:
    swapped = txt2img([{"clip_g": encoders["clip_g"]}])
    assert swapped.hash != native.hash
    assert f"TE CLIP-G: {encoders['clip_g']} [" in swapped.infotext
    assert call("/te-switch/v1/state")["host"]["slots"]["clip_g"]["encoder"] == encoders["clip_g"]
    assert txt2img([True]).hash == native.hash  # Built-in: bit-identical again


def test_long_clip_l_aligns_clip_g(native: Result, encoders: dict[str, str]) -> None:
    long_prompt = ", ".join(["a red cat on a blue chair in a sunny garden"] * 12)  # ~130 tokens: one Long-CLIP chunk
    swapped = txt2img([{"clip_l": encoders["long_l"]}], prompt=long_prompt)
    slots = call("/te-switch/v1/state")["host"]["slots"]
    assert slots["clip_l"]["positions"] == 248
    assert slots["clip_g"]["positions"] == 248  # stretched to follow CLIP-L's chunks
    assert txt2img([True], prompt=long_prompt).hash != swapped.hash
    slots = call("/te-switch/v1/state")["host"]["slots"]
    assert slots["clip_l"]["positions"] == 77
    assert slots["clip_g"]["positions"] == 77
    assert txt2img([True]).hash == native.hash
