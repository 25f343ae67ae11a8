"""HTTP tests against a running A1111 1.10 or Forge 2 with TE Switch installed (``-m integration``).

Environment:

* ``TE_SWITCH_WEBUI_URL`` — e.g. ``http://127.0.0.1:7860`` (the tests are skipped when unset). The
  server must run an SD1 checkpoint (the CPU test hosts use ``sd15-random``) with ``--api``.
* ``TE_SWITCH_WEBUI_MODELS`` — the server's models folder: encoder files are written to its
  ``CLIP`` subfolder and removed afterwards. ``TE_SWITCH_WEBUI_ENCODER_DIR`` names the folder
  directly instead (e.g. one passed to the server with ``--te-switch-dir``).
* ``TE_SWITCH_BASELINE`` — a JSON file of pixel hashes recorded from the *same* server started
  without the extension. Record it once::

      ./start.sh --disable-extra-extensions          # A1111 (Forge: the same flag)
      TE_SWITCH_WEBUI_URL=http://127.0.0.1:7860 TE_SWITCH_BASELINE=/tmp/a1111-baseline.json \\
          TE_SWITCH_RECORD_BASELINE=1 python -m pytest -m integration tests/integration -k baseline
      ./stop.sh && ./start.sh                         # now with the extension

  then run the suite with the same ``TE_SWITCH_BASELINE``: Auto must reproduce those images bit for bit.

Images are compared by the sha256 of their decoded pixels (the PNG also carries the infotext).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from webui_client import (
    BASE,
    TITLE,
    URL,
    Result,
    call,
    encoder_dir,
    rejected,
    short_hash,
    txt2img,
    write_clip,
    xyz_args,
)

BASELINE_REQUESTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "native-clip-skip-2": {"override_settings": {"CLIP_stop_at_last_layers": 2}},
}

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not URL, reason="TE_SWITCH_WEBUI_URL is not set (no WebUI to talk to)"),
]


@pytest.fixture(scope="module")
def encoders() -> Iterator[dict[str, str]]:
    """Three CLIP-L files in the server's encoder folder (good, NaN, truncated); removed afterwards."""
    folder = encoder_dir() / "te-switch-it"
    files = {
        "good": write_clip(folder / "it-clip-l.safetensors", seed=7),
        "nan": write_clip(folder / "it-clip-l-nan.safetensors", seed=8, nan=True),
        "truncated": write_clip(folder / "it-clip-l-cut.safetensors", seed=9, truncate=True),
    }
    call("/te-switch/v1/refresh", {}, method="POST")
    try:
        yield {k: f"te-switch-it/{p.name}" for k, p in files.items()}
    finally:
        for p in files.values():
            p.unlink(missing_ok=True)
        folder.rmdir()
        call("/te-switch/v1/refresh", {}, method="POST")
        call("/sdapi/v1/options", {"te_switch_encoder_clip_l": "Built-in"})


@pytest.fixture(scope="module")
def original() -> Result:
    """The image with the extension on Auto / Built-in."""
    call("/sdapi/v1/options", {"te_switch_clip_skip": "Auto", "te_switch_encoder_clip_l": "Built-in"})
    return txt2img([True])


# ---------------------------------------------------------------------------------------------
# baseline (recorded from the same server without the extension)


def baseline_path() -> Path | None:
    value = os.environ.get("TE_SWITCH_BASELINE")
    return Path(value) if value else None


def test_record_or_compare_baseline() -> None:
    path = baseline_path()
    if path is None:
        pytest.skip("TE_SWITCH_BASELINE not set: record one from a server without the extension (see module doc)")
    if os.environ.get("TE_SWITCH_RECORD_BASELINE"):
        scripts = call("/sdapi/v1/scripts")
        assert TITLE.lower() not in scripts["txt2img"], "record the baseline on a server WITHOUT the extension"
        hashes = {name: txt2img(**extra).hash for name, extra in BASELINE_REQUESTS.items()}
        path.write_text(json.dumps(hashes, indent=1))
        return
    if not path.exists():
        pytest.skip(f"{path} not recorded yet")
    expected = json.loads(path.read_text())
    assert TITLE.lower() in call("/sdapi/v1/scripts")["txt2img"]
    for name, extra in BASELINE_REQUESTS.items():
        assert txt2img(**extra).hash == expected[name], f"{name}: the extension changed a request that does not use it"
        assert txt2img([True], **extra).hash == expected[name], f"{name}: explicit Auto is not the host's own output"


# ---------------------------------------------------------------------------------------------
# clip skip


def test_clip_skip_changes_the_image_and_is_recorded(original: Result) -> None:
    one = txt2img([False, 1])
    two = txt2img([False, 2])
    assert one.hash != two.hash
    assert "Clip skip: 1" in one.infotext  # written for N=1 too (A1111 omits it)
    assert "Clip skip: 2" in two.infotext
    assert "Clip skip" not in original.infotext
    assert one.hash == original.hash  # SD1's own layer is the last one: explicit 1 == Auto


def test_explicit_two_equals_the_native_setting(original: Result) -> None:
    ours = txt2img([False, 2])
    native = txt2img([True], override_settings={"CLIP_stop_at_last_layers": 2})
    assert ours.hash == native.hash  # DESIGN: N on SD1 is exactly A1111's Clip skip N
    dict_form = txt2img([{"clip_skip": 2}])
    assert dict_form.hash == ours.hash


def test_override_settings_global_clip_skip(original: Result) -> None:
    ours = txt2img([False, 2])
    via_option = txt2img(override_settings={"te_switch_clip_skip": "2"})
    assert via_option.hash == ours.hash
    assert "Clip skip: 2" in via_option.infotext
    # restored after the request (read through our route: Forge's GET /sdapi/v1/options omits extension keys)
    assert call("/te-switch/v1/state")["options"]["te_switch_clip_skip"] == "Auto"
    assert txt2img([True]).hash == original.hash


def test_infotext_reproduces_the_image() -> None:
    first = txt2img([False, 3])
    again = Result(call("/sdapi/v1/txt2img", {"infotext": first.infotext}))
    assert again.hash == first.hash
    assert "Clip skip: 3" in again.infotext


def test_xyz_over_clip_skip(original: Result) -> None:
    result = txt2img(script_name="x/y/z plot", script_args=xyz_args("[TE] CLIP Skip", ["Auto", "2"]))
    assert result.size(0)[0] >= 2 * BASE["width"]  # the grid first
    cells = result.hashes[1:]
    assert cells == [original.hash, txt2img([False, 2]).hash]


# ---------------------------------------------------------------------------------------------
# text-encoder swap


def test_swap_changes_and_builtin_restores(original: Result, encoders: dict[str, str]) -> None:
    swapped = txt2img([True, 1, "both", encoders["good"]])
    assert swapped.hash != original.hash
    assert f"TE CLIP-L: {encoders['good']} [{short_hash(encoders['good'])}]" in swapped.infotext
    state = call("/te-switch/v1/state")
    assert state["host"]["slots"]["clip_l"]["encoder"] == encoders["good"]
    assert txt2img([True]).hash == original.hash  # Built-in: bit-identical again
    assert call("/te-switch/v1/state")["host"]["slots"]["clip_l"]["encoder"] == "Built-in"
    again = Result(call("/sdapi/v1/txt2img", {"infotext": swapped.infotext}))
    assert again.hash == swapped.hash
    dict_form = txt2img([{"clip_l": encoders["good"], "clip_l_precision": "fp32"}])
    assert "TE CLIP-L precision: fp32" in dict_form.infotext


def test_xyz_over_encoders(original: Result, encoders: dict[str, str]) -> None:
    swapped = txt2img([True, 1, "both", encoders["good"]])
    result = txt2img(script_name="x/y/z plot", script_args=xyz_args("[TE] CLIP-L", ["Built-in", encoders["good"]]))
    assert result.hashes[1:] == [original.hash, swapped.hash]


def test_rest_routes(encoders: dict[str, str]) -> None:
    listing = call("/te-switch/v1/encoders")
    rows = {r["name"]: r for r in listing["encoders"]}
    assert rows[encoders["good"]]["kind"] == "clip-l"
    assert rows[encoders["good"]]["slots"] == ["clip_l"]
    assert rows[encoders["truncated"]]["error"]
    state = call("/te-switch/v1/state")
    assert state["host"]["family"] == "sd1"
    assert state["layers"].startswith("SD1")
    assert "te_switch_clip_skip" in state["options"]


@pytest.mark.parametrize(
    ("which", "status", "detail"),
    [
        ("missing", 404, "no such encoder"),
        ("outside", 422, "outside the encoder folders"),
        ("nan", 422, "NaN"),
        ("truncated", 422, "truncated"),
    ],
)
def test_bad_file_is_refused_and_nothing_changes(
    original: Result, encoders: dict[str, str], which: str, status: int, detail: str
) -> None:
    value = {"missing": "te-switch-it/nope.safetensors", "outside": "/etc/hostname"}.get(which) or encoders[which]
    error = rejected([True, 1, "both", value])
    assert error.status == status
    assert detail in error.body["detail"]
    assert txt2img([True]).hash == original.hash


def test_failed_swap_inside_a_generation_leaves_the_model_untouched(original: Result, encoders: dict[str, str]) -> None:
    # /sdapi/v1/options is not checked by the guard: the swap itself must refuse the file atomically
    call("/sdapi/v1/options", {"te_switch_encoder_clip_l": encoders["nan"]})
    try:
        stopped = txt2img()
        assert stopped.images == []  # stopped, not generated with the wrong encoder
        assert "NaN" in call("/te-switch/v1/state")["last_error"]
    finally:
        call("/sdapi/v1/options", {"te_switch_encoder_clip_l": "Built-in"})
    assert txt2img([True]).hash == original.hash
    assert call("/te-switch/v1/state")["last_error"] is None
