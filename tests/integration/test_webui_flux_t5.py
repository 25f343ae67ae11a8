"""Forge 2 Flux over HTTP: a T5 swapped in at precision Auto gives the image stock Forge gives when it
loads that same file itself through its *VAE / Text Encoder* menu (``forge_additional_modules``), pixel
for pixel; Built-in comes back bit for bit.

Needs ``TE_SWITCH_WEBUI_URL`` (a Forge 2 with TE Switch), ``TE_SWITCH_WEBUI_FLUX_CHECKPOINT`` (a Flux or
Chroma checkpoint the server has, selected for the module and put back afterwards) and
``TE_SWITCH_WEBUI_T5_FILES``: comma-separated T5 files as both Forge's menu and TE Switch name them
(relative to ``models/text_encoder``, e.g. ``rig/t5xxl-d2-fp16.safetensors,rig/t5xxl-d2-Q8_0.gguf``).
``TE_SWITCH_WEBUI_T5_HOST_FAILS``: those of them stock Forge cannot load (its menu answers 5xx: Forge
2.0.1 cannot load a GGUF whose ``token_embd`` is F16); for them only the swap and the restore are checked.
Forge logs its own traceback for those: run them without ``TE_SWITCH_WEBUI_LOG``.
``TE_SWITCH_WEBUI_T5_SAME_AS``: ``ours=menu`` pairs, comma-separated, for files Forge's menu does not list
(a sharded HF folder's ``model.safetensors.index.json``): compared with the menu loading ``menu``, a single
file holding the same tensors.
``TE_SWITCH_WEBUI_FLUX_BASELINE``: a JSON file of the checkpoint's image from the same server started
without the extension (``--disable-extra-extensions``), recorded per checkpoint with
``TE_SWITCH_RECORD_BASELINE=1 ... -k baseline``; then Auto must give that image bit for bit.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from webui_client import BASE, TITLE, URL, HTTPError, Result, call, checkpoint_selected, short_hash, txt2img, xyz_args

CHECKPOINT = os.environ.get("TE_SWITCH_WEBUI_FLUX_CHECKPOINT", "")
FILES = [f for f in os.environ.get("TE_SWITCH_WEBUI_T5_FILES", "").split(",") if f]
HOST_FAILS = {f for f in os.environ.get("TE_SWITCH_WEBUI_T5_HOST_FAILS", "").split(",") if f}
SAME_AS = dict(p.split("=", 1) for p in os.environ.get("TE_SWITCH_WEBUI_T5_SAME_AS", "").split(",") if "=" in p)
BASELINE = os.environ.get("TE_SWITCH_WEBUI_FLUX_BASELINE", "")
# Flux's own settings (cfg 1, distilled guidance), smallest image this host renders
FLUX = {"steps": 3, "scheduler": "Simple", "cfg_scale": 1, "distilled_cfg_scale": 3.5}
FLUX_SIZE = BASE["width"]

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


@pytest.mark.skipif(not BASELINE, reason="TE_SWITCH_WEBUI_FLUX_BASELINE is not set")
def test_record_or_compare_baseline() -> None:
    """Auto is stock Forge: the image of a server without the extension, bit for bit."""
    path = Path(BASELINE)
    recorded = json.loads(path.read_text()) if path.exists() else {}
    with checkpoint_selected(CHECKPOINT, forge_additional_modules=[]):
        if os.environ.get("TE_SWITCH_RECORD_BASELINE"):
            assert TITLE.lower() not in call("/sdapi/v1/scripts")["txt2img"], "record WITHOUT the extension"
            path.write_text(json.dumps({**recorded, CHECKPOINT: txt2img(**FLUX).hash}, indent=1))
            return
        if CHECKPOINT not in recorded:
            pytest.skip(f"{CHECKPOINT} not recorded in {path} yet")
        assert txt2img(**FLUX).hash == recorded[CHECKPOINT], "the extension changed a request that does not use it"
        assert txt2img([True], **FLUX).hash == recorded[CHECKPOINT], "explicit Auto is not stock Forge's image"


def _reload_after_failed_menu_load() -> None:
    """Forge 2.0.1 drops its model when a menu file fails to load but keeps the hash of the last good load, so
    the next request with the old modules finds "nothing changed" and has no model (``forge_model_reload``).
    One generation on a file it can load makes it load the checkpoint again."""
    loadable = next((f for f in FILES if f not in HOST_FAILS), None)
    assert loadable, "TE_SWITCH_WEBUI_T5_FILES needs one file stock Forge loads, to recover from a failed load"
    txt2img(
        None, override_settings={"forge_additional_modules": [SAME_AS.get(loadable, loadable)]}, **{**FLUX, "steps": 1}
    )


@pytest.mark.parametrize("name", FILES)
def test_t5_swap_at_auto_equals_forge_loading_the_file(builtin: Result, name: str) -> None:
    ours = txt2img([{"t5xxl": name}], **FLUX)
    assert ours.hash != builtin.hash, "the swap changed nothing"
    assert f"TE T5-XXL: {name}" in ours.infotext
    if name in HOST_FAILS:
        with pytest.raises(HTTPError) as info:
            txt2img(None, override_settings={"forge_additional_modules": [name]}, **FLUX)
        assert info.value.status >= 500, f"stock Forge loads {name} now: move it out of TE_SWITCH_WEBUI_T5_HOST_FAILS"
        _reload_after_failed_menu_load()
    else:
        menu = SAME_AS.get(name, name)
        stock = txt2img(None, override_settings={"forge_additional_modules": [menu]}, **FLUX)
        assert stock.hash != builtin.hash, "Forge's menu did not load the file"
        assert ours.hash == stock.hash, f"{name}: TE Switch vs Forge's menu on {menu}: {_difference(ours, stock)}"
    again = txt2img([True], **FLUX)
    assert again.hash == builtin.hash, f"Built-in after {name}: {_difference(again, builtin)}"


CLIP_L = os.environ.get("TE_SWITCH_WEBUI_CLIP_L_FILE", "")  # e.g. rig/longclip-l-hf.safetensors


def _slots() -> dict:
    return call("/te-switch/v1/state")["host"]["slots"]


@pytest.mark.skipif(not CLIP_L, reason="TE_SWITCH_WEBUI_CLIP_L_FILE is not set")
def test_clip_l_and_both_slots_paste_and_restore(builtin: Result) -> None:
    """CLIP-L alone, then T5 and CLIP-L together: the infotext names both and pastes back to the same image;
    Built-in restores bit for bit after each."""
    state = call("/te-switch/v1/state")
    if "clip_l" not in state["host"]["slots"]:
        pytest.skip(f"{state['host']['family']} has no CLIP-L slot")
    assert state["host"]["family"] == "flux"
    assert "clip skip has no effect" in state["layers"]
    clip = txt2img([{"clip_l": CLIP_L}], **FLUX)
    assert clip.hash != builtin.hash
    assert txt2img([True], **FLUX).hash == builtin.hash, "Built-in after CLIP-L"
    t5 = FILES[0]
    both = txt2img([{"t5xxl": t5, "clip_l": CLIP_L}], **FLUX)
    assert both.hash not in (builtin.hash, clip.hash)
    assert f"TE T5-XXL: {t5} [{short_hash(t5)}]" in both.infotext
    assert f"TE CLIP-L: {CLIP_L} [{short_hash(CLIP_L)}]" in both.infotext
    slots = _slots()
    assert (slots["t5xxl"]["encoder"], slots["clip_l"]["encoder"]) == (t5, CLIP_L)
    pasted = Result(call("/sdapi/v1/txt2img", {"infotext": both.infotext}))
    assert pasted.hash == both.hash
    assert txt2img([True], **FLUX).hash == builtin.hash, "Built-in after T5 + CLIP-L"
    assert {s["encoder"] for s in _slots().values()} == {"Built-in"}


def test_bad_t5_files_are_refused_and_nothing_changes(builtin: Result) -> None:
    """Missing, truncated and wrong-kind (a CLIP-L file, where one is named) T5 files: 4xx, one line, and
    the next image is the one before."""
    models = Path(os.environ["TE_SWITCH_WEBUI_MODELS"]) / "text_encoder"
    folder = models / "te-switch-it"
    folder.mkdir(exist_ok=True)
    source = models / FILES[0]
    truncated = folder / "t5-truncated.safetensors"
    with source.open("rb") as f:
        truncated.write_bytes(f.read(source.stat().st_size // 2))
    call("/te-switch/v1/refresh", {}, method="POST")
    try:
        for value in ("te-switch-it/nope.safetensors", f"te-switch-it/{truncated.name}", *([CLIP_L] if CLIP_L else [])):
            with pytest.raises(HTTPError) as info:
                txt2img([{"t5xxl": value}], **FLUX)
            assert 400 <= info.value.status < 500, (value, info.value.status, info.value.body)
            assert "\n" not in info.value.body["detail"], value
            assert txt2img([True], **FLUX).hash == builtin.hash, value
        assert _slots()["t5xxl"]["encoder"] == "Built-in"
    finally:
        truncated.unlink(missing_ok=True)
        folder.rmdir()
        call("/te-switch/v1/refresh", {}, method="POST")


def test_xyz_over_t5_files(builtin: Result) -> None:
    """A T5 axis on X/Y/Z: each cell is the single-image swap of its file; each cell's infotext names its
    file with its hash, and pasting one cell's infotext gives that cell again."""
    names = FILES[:2] if len(FILES) > 1 else ["Built-in", FILES[0]]
    grid = txt2img(script_name="x/y/z plot", script_args=xyz_args("[TE] T5-XXL", names), **FLUX)
    assert grid.size(0)[0] >= 2 * FLUX_SIZE  # the grid first, then the cells
    cells, infotexts = grid.hashes[1:], grid.info["infotexts"][1:]
    singles = [txt2img([True] if n == "Built-in" else [{"t5xxl": n}], **FLUX).hash for n in names]
    assert cells == singles
    for name, text in zip(names, infotexts, strict=True):
        if name != "Built-in":
            assert f"TE T5-XXL: {name} [{short_hash(name)}]" in text, text
    pasted = Result(call("/sdapi/v1/txt2img", {"infotext": infotexts[-1]}))
    assert pasted.hash == cells[-1]
    assert txt2img([True], **FLUX).hash == builtin.hash
    assert _slots()["t5xxl"]["encoder"] == "Built-in"


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
