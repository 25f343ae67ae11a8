"""Script arguments: positional (panel order) and the API's dict form, and how levels combine."""

from __future__ import annotations

import pytest

from te_switch.core.selection import Selection, SlotChoice
from te_switch.webui.args import (
    ARG_NAMES,
    DICT_KEYS,
    ArgsError,
    args_from_selection,
    dict_from_selection,
    force,
    merge,
    parse_encoder,
    selection_from_args,
    selection_from_dict,
)


def test_arg_order_is_documented_panel_order() -> None:
    assert ARG_NAMES == (
        "clip_skip_auto", "clip_skip", "scope",
        "clip_l", "clip_l_precision", "clip_g", "clip_g_precision",
        "clip_h", "clip_h_precision", "t5xxl", "t5xxl_precision",
    )  # fmt: skip
    assert set(DICT_KEYS) == {"clip_skip", "scope", *ARG_NAMES[3:]}


def test_panel_defaults_are_neutral() -> None:
    defaults = [True, 1, "both", "Built-in", "Auto", "Built-in", "Auto", "Built-in", "Auto", "Built-in", "Auto"]
    assert selection_from_args(defaults) == Selection()
    assert selection_from_args([]) == Selection()


def test_positional_args() -> None:
    sel = selection_from_args([False, 2.0, "CLIP-G only", "dir/long.safetensors (Long-CLIP-L · 248)", "fp32"])
    assert sel.clip_skip == 2
    assert sel.scope == "clip_g"
    assert sel.slot("clip_l") == SlotChoice("dir/long.safetensors", "fp32")
    # Auto ticked: the slider position is only where it rests
    assert selection_from_args([True, 7]).clip_skip is None


def test_dict_args_and_the_ignored_default_tail() -> None:
    sel = selection_from_args([{"clip_skip": 2, "scope": "clip_l", "t5xxl": "t5.gguf", "t5xxl_precision": "BF16"},
                               True, 1, "both"])  # fmt: skip
    assert sel == Selection(2, "clip_l", {"t5xxl": SlotChoice("t5.gguf", "bf16")})
    assert selection_from_dict({"clip_skip": "Auto"}) == Selection()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([{"clip_skp": 2}], "unknown key 'clip_skp'"),
        ([{"clip_skip": 13}], "clip skip must be 1..12 or Auto"),
        ([False, 0.5], "whole number"),
        ([False, None], "no layer"),
        (["2"], "first arg is the Auto checkbox"),
        ([True, 1, "sideways"], "scope must be one of both, CLIP-L only, CLIP-G only"),
        ([True, 1, "both", "x.safetensors", "fp8"], "precision must be one of Auto, fp32, bf16, fp16"),
        ([True, 1, "both", 5], "an encoder must be a file name"),
        ([True] * 12, "too many args"),
    ],
)
def test_bad_args_are_one_line_errors(args: list, message: str) -> None:
    with pytest.raises(ArgsError, match=message) as info:
        selection_from_args(args)
    assert "\n" not in str(info.value)


def test_decoration_is_stripped_only_when_it_is_ours() -> None:
    from te_switch.core.detect import TowerInfo
    from te_switch.webui.labels import decorate, strip

    assert strip("a/b.safetensors (T5-XXL · GGUF)") == "a/b.safetensors"
    assert strip("x.safetensors (CLIP-L · from checkpoint)") == "x.safetensors"
    assert strip("my model (v2).safetensors") == "my model (v2).safetensors"
    assert strip("weird (CLIP-L)") == "weird"
    for tower in (
        TowerInfo("x", kind="long-clip-l", positions=248),
        TowerInfo("x", kind="t5-xxl", quant="scaled-fp8"),
        TowerInfo("x", tower="clip_g", kind="clip-g", prefix="conditioner.embedders.1.model."),
    ):
        assert strip(decorate("dir/my (v2).safetensors", tower)) == "dir/my (v2).safetensors"  # what it decorated
    assert parse_encoder("g.safetensors (CLIP-G · from checkpoint)") == "g.safetensors"


def test_round_trips() -> None:
    sel = Selection(3, "clip_g", {"clip_g": SlotChoice("g.safetensors", "fp16"), "clip_l": SlotChoice(None, "fp32")})
    assert selection_from_args(args_from_selection(sel)) == sel
    assert selection_from_dict(dict_from_selection(sel)) == sel


def test_merge_panel_over_options() -> None:
    options = Selection(4, "clip_l", {"clip_l": SlotChoice("global.safetensors", "fp16")})
    # neutral panel: the options decide everything
    assert merge(Selection(), options) == options
    # the scope travels with the level that set the clip skip
    assert merge(Selection(2, "both"), options).scope == "both"
    assert merge(Selection(None, "clip_g"), options).scope == "clip_l"
    panel = Selection(None, "both", {"clip_l": SlotChoice("tab.safetensors")})
    merged = merge(panel, options)
    assert merged.clip_skip == 4
    assert merged.slot("clip_l") == SlotChoice("tab.safetensors", "fp16")  # precision falls through


def test_forced_xyz_values_win_including_auto_and_builtin() -> None:
    sel = Selection(2, "clip_l", {"clip_l": SlotChoice("tab.safetensors", "fp32")})
    assert force(sel, {"clip_skip": "Auto"}).clip_skip is None
    assert force(sel, {"clip_l": "Built-in"}).slot("clip_l") == SlotChoice(None, "fp32")
    assert force(sel, {"clip_l": "Built-in", "clip_l_precision": "Auto"}).slots == {}
    assert force(sel, {"scope": "CLIP-G only", "clip_skip": 5}) == Selection(5, "clip_g", sel.slots)
    with pytest.raises(ArgsError, match="unknown key"):
        force(sel, {"vae": "x"})
