"""A1111 SD3 with its T5 on, over HTTP: T5-XXL swaps in every file format against stock A1111 loading
the same file itself, restore, bad files, infotext/paste/X/Y/Z, the layer line.

Needs, besides ``TE_SWITCH_WEBUI_URL`` and ``TE_SWITCH_WEBUI_MODELS`` (see test_webui_http.py):

* ``TE_SWITCH_WEBUI_SD3_CHECKPOINT``: an SD3 checkpoint without T5 inside, on a server with
  *Enable T5* (``sd3_enable_t5``) on, so A1111 reads its T5 from ``models/CLIP/t5xxl_fp16.safetensors``;
* ``TE_SWITCH_SD3_T5_BASELINE``: a JSON file of images recorded from the same server **without** the
  extension, with ``TE_SWITCH_RECORD_BASELINE=1`` and ``TE_SWITCH_WEBUI_CHECKPOINT`` (any other checkpoint:
  A1111 rebuilds SD3, T5 included, only when it loads SD3 anew, so recording switches there and back)::

      TE_SWITCH_RECORD_BASELINE=1 python -m pytest -m integration tests/integration/test_webui_sd3_t5.py -k baseline

  Recording puts each file's values in place of ``models/CLIP/t5xxl_fp16.safetensors`` (the original is
  renamed aside and put back) and lets stock A1111 load it: *the host loading that file itself*. A1111
  reads only safetensors and only the key ``encoder.embed_tokens.weight``, so the file it is given holds
  the same tensors plus that key (T5 files name the table ``shared.weight``); GGUF blocks dequantised by
  gguf-py; scaled fp8 as ``fp8 · scale``; shards merged. Stock A1111 on two files as they are is recorded
  too (``*-as-is``): the differences by design are printed.

The T5 files are written here at real width (4096 / 10240 / 64 heads / 32128 tokens) with as many blocks
as the host's own T5 file, random weights of one seed in every format (``TE_SWITCH_SD3_T5_FORMATS``:
a comma-separated subset of ``ALL_FORMATS``).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from webui_client import (
    URL,
    Result,
    call,
    checkpoint_selected,
    encoder_dir,
    rejected,
    short_hash,
    txt2img,
    write_clip,
    xyz_args,
)

SD3 = os.environ.get("TE_SWITCH_WEBUI_SD3_CHECKPOINT", "")
AWAY = os.environ.get("TE_SWITCH_WEBUI_CHECKPOINT", "")
BASELINE = os.environ.get("TE_SWITCH_SD3_T5_BASELINE", "")
RECORD = bool(os.environ.get("TE_SWITCH_RECORD_BASELINE"))
MODELS = os.environ.get("TE_SWITCH_WEBUI_MODELS", "")
NO_NORM = {"emphasis": "No norm"}  # see test_webui_families.py: "Original" can be 0/0 on random checkpoints
REQUEST = {"steps": 3, "cfg_scale": 5, "prompt": "a red cat on a blue chair, photo", "seed": 77}
ALL_FORMATS = "fp16,bf16,fp32,fp8_e4m3fn,fp8_e5m2,fp8_scaled,gguf_q8_0,sharded_bf16"
FORMATS = os.environ.get("TE_SWITCH_SD3_T5_FORMATS", ALL_FORMATS).split(",")  # a subset for a quick run
PICK = "fp8_e4m3fn" if "fp8_e4m3fn" in FORMATS else FORMATS[0]  # the file the paste/X/Y/Z/CLIP-L tests use
AS_IS = ["fp16", "fp8_scaled"]  # safetensors stock A1111 can read, but not as T5 files mean them
EMBED = "encoder.embed_tokens.weight"
FOLDER = "te-switch-it-sd3"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not URL, reason="TE_SWITCH_WEBUI_URL is not set (no WebUI to talk to)"),
    pytest.mark.skipif(not SD3, reason="TE_SWITCH_WEBUI_SD3_CHECKPOINT is not set"),
    pytest.mark.skipif(not BASELINE, reason="TE_SWITCH_SD3_T5_BASELINE is not set"),
    pytest.mark.skipif(not MODELS, reason="TE_SWITCH_WEBUI_MODELS is not set"),
]


def generate(args: list[Any] | None = None, **extra: Any) -> Result:
    return txt2img(args, **REQUEST, **{"override_settings": NO_NORM, **extra})


def host_t5() -> Path:
    return Path(MODELS) / "CLIP" / "t5xxl_fp16.safetensors"


def host_depth() -> int:
    with open(host_t5(), "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return 1 + max(int(k.split(".")[2]) for k in header if k.startswith("encoder.block."))


# ---------------------------------------------------------------------------------------------
# the T5 files: one random T5-XXL of real width in every format


def master(depth: int, seed: int = 31) -> dict[str, Any]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    d, ff, heads, vocab = 4096, 10240, 64, 32128

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    sd = {"shared.weight": randn(vocab, d, std=1.0), "encoder.final_layer_norm.weight": 1 + randn(d, std=0.05)}
    for i in range(depth):
        b = f"encoder.block.{i}.layer."
        for n in "qkvo":
            sd[f"{b}0.SelfAttention.{n}.weight"] = randn(d, d, std=0.02)
        if i == 0:
            sd[f"{b}0.SelfAttention.relative_attention_bias.weight"] = randn(32, heads, std=0.5)
        sd[f"{b}0.layer_norm.weight"] = 1 + randn(d, std=0.05)
        sd[f"{b}1.DenseReluDense.wi_0.weight"] = randn(ff, d, std=0.02)
        sd[f"{b}1.DenseReluDense.wi_1.weight"] = randn(ff, d, std=0.02)
        sd[f"{b}1.DenseReluDense.wo.weight"] = randn(d, ff, std=0.01)
        sd[f"{b}1.layer_norm.weight"] = 1 + randn(d, std=0.05)
    return sd


def with_embed(sd: dict[str, Any]) -> dict[str, Any]:
    return {**sd, EMBED: sd["shared.weight"].clone()}  # safetensors refuses tensors that share memory


def write_format(folder: Path, fmt: str, sd: dict[str, Any]) -> tuple[Path, Callable[[], dict[str, Any]]]:
    """(the file a user picks, what stock A1111 must be given to hold the same values)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    casts = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
             "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}  # fmt: skip
    if fmt in casts:
        stored = {k: v.to(casts[fmt]) for k, v in sd.items()}
        path = folder / f"t5xxl-it-{fmt}.safetensors"
        save_file(stored, str(path))
        return path, lambda: with_embed(stored)
    if fmt == "fp8_scaled":  # Comfy-Org layout: fp8 Linear weights, fp32 scale_weight, the scaled_fp8 marker
        stored, dense = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, {}
        for k, v in sd.items():
            if v.dim() == 2 and ("SelfAttention." in k or "DenseReluDense." in k) and "relative" not in k:
                scale = (v.abs().max() / 448.0).reshape(())
                stored[k] = (v / scale).to(torch.float8_e4m3fn)
                stored[k.removesuffix("weight") + "scale_weight"] = scale
                dense[k] = stored[k].float() * scale
            else:
                stored[k] = dense[k] = v.to(torch.float16)
        path = folder / "t5xxl-it-fp8_e4m3fn_scaled.safetensors"
        save_file(stored, str(path))
        return path, lambda: with_embed(dense)
    if fmt == "gguf_q8_0":
        import synth_gguf

        names = synth_gguf.hf_t5_to_llama_names(dict(zip(sd, sd, strict=True)))
        path = folder / "t5xxl-it-Q8_0.gguf"
        held = synth_gguf.write_gguf(path, synth_gguf.hf_t5_to_llama_names(sd), "Q8_0")  # gguf-py's own values
        return path, lambda: with_embed({names[k]: v for k, v in held.items()})
    if fmt == "sharded_bf16":
        import filemakers

        stored = {k: v.to(torch.bfloat16) for k, v in sd.items()}
        keys = sorted(stored)
        shards = [{k: stored[k] for k in keys[: len(keys) // 2]}, {k: stored[k] for k in keys[len(keys) // 2 :]}]
        index = filemakers.write_sharded(folder / "t5xxl-it-sharded", shards)
        return index, lambda: with_embed(stored)
    raise AssertionError(fmt)


def remove(path: Path) -> None:
    if path.name.endswith(".index.json"):
        shutil.rmtree(path.parent, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# the baseline: stock A1111 loading each file itself


def image_png(result: Result) -> str:
    return result.images[0]


def level_diff(a_png: str, b_png: str) -> tuple[int, int]:
    """(largest difference in levels, pixels that differ) between two images."""
    import numpy as np
    from PIL import Image

    a, b = (np.asarray(Image.open(io.BytesIO(base64.b64decode(x))).convert("RGB"), dtype=np.int16)
            for x in (a_png, b_png))  # fmt: skip
    diff = np.abs(a - b)
    return int(diff.max()), int((diff.max(axis=-1) > 0).sum())


def stock_reload() -> None:
    """A1111 builds SD3 (and reads models/CLIP/t5xxl_fp16.safetensors) only when it loads SD3 anew."""
    call("/sdapi/v1/options", {"sd_model_checkpoint": AWAY})
    call("/sdapi/v1/options", {"sd_model_checkpoint": SD3})


def test_record_or_check_baseline() -> None:
    path = Path(BASELINE)
    if not RECORD:
        baseline = json.loads(path.read_text())
        assert set(FORMATS) <= set(baseline), f"{path} lacks formats: record it again"
        return
    scripts = call("/sdapi/v1/scripts")
    assert "clip skip & text encoders" not in scripts["txt2img"], "record the baseline WITHOUT the extension"
    assert AWAY, "set TE_SWITCH_WEBUI_CHECKPOINT to a checkpoint other than the SD3 one"
    assert AWAY != SD3, "TE_SWITCH_WEBUI_CHECKPOINT must not be the SD3 checkpoint"
    host = host_t5()
    aside = host.with_name(host.name + ".te-switch-it-original")
    images: dict[str, Any] = {}
    clip_skip = iter(range(1, 1000))  # stock SD3 ignores Clip skip; it keeps A1111's cond cache from hitting

    def record(name: str) -> None:
        stock_reload()
        result = generate(override_settings={**NO_NORM, "CLIP_stop_at_last_layers": 1 + next(clip_skip) % 12})
        images[name] = {"hash": result.hash, "png": image_png(result)}

    from safetensors.torch import save_file

    call("/sdapi/v1/options", {"sd_model_checkpoint": SD3})
    record("builtin")
    sd = master(host_depth())
    scratch = Path(MODELS) / "CLIP" / FOLDER
    os.rename(host, aside)
    try:
        for fmt in FORMATS:
            user_file, host_loads = write_format(scratch, fmt, sd)
            for name, tensors in [(fmt, host_loads)] + ([(f"{fmt}-as-is", None)] if fmt in AS_IS else []):
                if tensors is None:
                    shutil.copyfile(user_file, host)  # the user's file itself, as stock A1111 reads it
                else:
                    save_file({k: v.contiguous() for k, v in tensors().items()}, str(host))
                record(name)
                host.unlink()
            remove(user_file)
    finally:
        host.unlink(missing_ok=True)
        os.rename(aside, host)
        shutil.rmtree(scratch, ignore_errors=True)
        stock_reload()
    path.write_text(json.dumps(images))


# ---------------------------------------------------------------------------------------------
# the suite (with the extension)


@pytest.fixture(scope="module")
def baseline() -> dict[str, Any]:
    if RECORD:
        pytest.skip("recording the baseline")
    return json.loads(Path(BASELINE).read_text())


@pytest.fixture(scope="module", autouse=True)
def sd3_checkpoint() -> Iterator[None]:
    if RECORD:
        yield
        return
    with checkpoint_selected(SD3, te_switch_clip_skip="Auto"):
        yield


@pytest.fixture(scope="module")
def weights() -> dict[str, Any]:
    return master(host_depth())


@pytest.fixture(scope="module")
def folder() -> Iterator[Path]:
    path = encoder_dir() / FOLDER
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        call("/te-switch/v1/refresh", {}, method="POST")


def listed(path: Path) -> str:
    """The label the server lists ``path`` under (a sharded folder by its index)."""
    call("/te-switch/v1/refresh", {}, method="POST")
    wanted = path.relative_to(encoder_dir()).as_posix()
    names = [r["name"] for r in call("/te-switch/v1/encoders")["encoders"]]
    match = [n for n in names if n == wanted or n == Path(wanted).parent.as_posix() or n.startswith(wanted)]
    assert match, f"{wanted} not listed: {[n for n in names if FOLDER in n]}"
    return match[0]


def test_auto_is_stock_and_the_line_says_t5(baseline: dict[str, Any]) -> None:
    auto = generate([True])
    assert auto.hash == baseline["builtin"]["hash"]
    state = call("/te-switch/v1/state")
    assert state["host"]["family"] == "sd3"
    assert list(state["host"]["slots"]) == ["clip_l", "clip_g", "t5xxl"]
    assert state["layers"].startswith("SD3 · CLIP-L layer 11/12 · CLIP-G layer 31/32")
    assert "T5-XXL: every layer" in state["layers"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_t5_swap_at_auto_is_stock_loading_that_file(
    baseline: dict[str, Any], weights: dict[str, Any], folder: Path, fmt: str
) -> None:
    path, _ = write_format(folder, fmt, weights)
    try:
        label = listed(path)
        swapped = generate([{"t5xxl": label}])
        assert call("/te-switch/v1/state")["host"]["slots"]["t5xxl"]["encoder"] == label
        for by_design in (f"{fmt}-as-is",):
            if by_design in baseline:
                levels, count = level_diff(swapped.images[0], baseline[by_design]["png"])
                print(f"\n{fmt}: stock A1111 reading the file as is differs by up to {levels} levels in {count} pixels")
        assert swapped.hash == baseline[fmt]["hash"], f"{fmt}: {level_diff(swapped.images[0], baseline[fmt]['png'])}"
        assert swapped.hash != baseline["builtin"]["hash"]
        assert generate([True]).hash == baseline["builtin"]["hash"]  # Built-in, bit for bit
        assert call("/te-switch/v1/state")["host"]["slots"]["t5xxl"]["encoder"] == "Built-in"
    finally:
        remove(path)


@pytest.fixture(scope="module")
def files(weights: dict[str, Any], folder: Path) -> dict[str, str]:
    t5, _ = write_format(folder, PICK, weights)
    clip_l = write_clip(folder / "it-clip-l.safetensors", seed=41)
    return {"t5": listed(t5), "clip_l": listed(clip_l)}


def test_infotext_paste_xyz_and_precision(baseline: dict[str, Any], files: dict[str, str]) -> None:
    swapped = generate([{"t5xxl": files["t5"]}])
    assert swapped.hash == baseline[PICK]["hash"]
    assert f"TE T5-XXL: {files['t5']} [{short_hash(files['t5'])}]" in swapped.infotext
    generate([True])
    pasted = Result(call("/sdapi/v1/txt2img", {"infotext": swapped.infotext, "override_settings": NO_NORM}))
    assert pasted.hash == swapped.hash
    # --no-half: A1111 already holds and computes T5 in fp32, so explicit fp32 is Auto here
    fp32 = generate([{"t5xxl": files["t5"], "t5xxl_precision": "fp32"}])
    assert "TE T5-XXL precision: fp32" in fp32.infotext
    assert fp32.hash == swapped.hash
    for precision in ("bf16", "fp16"):
        low = generate([{"t5xxl": files["t5"], "t5xxl_precision": precision}])
        assert f"TE T5-XXL precision: {precision}" in low.infotext
        print(f"\n{precision}: {level_diff(low.images[0], swapped.images[0])} (levels, pixels) from fp32")
    grid = generate(script_name="x/y/z plot", script_args=xyz_args("[TE] T5-XXL", ["Built-in", files["t5"]]))
    assert grid.hashes[1:] == [baseline["builtin"]["hash"], swapped.hash]
    assert generate([True]).hash == baseline["builtin"]["hash"]


def test_clip_l_with_t5_on_and_restore_after_each(baseline: dict[str, Any], files: dict[str, str]) -> None:
    builtin = baseline["builtin"]["hash"]
    seen = {builtin}
    for choice in ({"clip_l": files["clip_l"]}, {"clip_l": files["clip_l"], "t5xxl": files["t5"]}):
        result = generate([choice])
        assert result.hash not in seen
        seen.add(result.hash)
        assert generate([True]).hash == builtin
    slots = call("/te-switch/v1/state")["host"]["slots"]
    assert {s["encoder"] for s in slots.values()} == {"Built-in"}


def test_bad_t5_files_are_refused_and_nothing_changes(
    baseline: dict[str, Any], weights: dict[str, Any], folder: Path, files: dict[str, str]
) -> None:
    truncated, _ = write_format(folder, "fp16", weights)
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size // 2)
    call("/te-switch/v1/refresh", {}, method="POST")
    cases = {
        "missing": (f"{FOLDER}/nope.safetensors", 404),
        "truncated": (truncated.relative_to(encoder_dir()).as_posix(), 422),
        "wrong kind": (files["clip_l"], 422),
    }
    try:
        for name, (value, status) in cases.items():
            error = rejected([{"t5xxl": value}], **REQUEST, override_settings=NO_NORM)
            assert error.status == status, (name, error.body)
            detail = error.body["detail"]
            assert "\n" not in detail, name
            assert generate([True]).hash == baseline["builtin"]["hash"], name
    finally:
        truncated.unlink(missing_ok=True)
