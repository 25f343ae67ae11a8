"""Infotext: what is written, and pasting it back into the panel (PNG Info, "Send to", API)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from test_webui_support import webui, write_clip  # noqa: F401 - fixture

from te_switch.core.selection import Selection, SlotChoice

PROMPT = "a cat\nNegative prompt: dog\n"


def infotext_for(params: dict[str, Any]) -> str:
    from modules import infotext_utils

    base = {"Steps": 20, "Sampler": "Euler a", "Seed": 1, **params}
    return PROMPT + infotext_utils.create_infotext_params_text(base)


def paste(text: str) -> dict[str, Any]:
    """What the WebUI's paste does: parse, then the on_infotext_pasted callbacks."""
    from modules import infotext_utils

    from te_switch.webui import infotext

    params = infotext_utils.parse_generation_parameters(text)
    infotext.on_infotext_pasted(text, params)
    return params


def test_raw_keys_sees_only_what_is_written() -> None:
    from te_switch.webui.infotext import raw_keys

    assert raw_keys("p\nSteps: 20, Sampler: Euler, Clip skip: 2") == {"Steps", "Sampler", "Clip skip"}
    assert raw_keys("p\nSteps: 20, Sampler: Euler, Seed: 3") == {"Steps", "Sampler", "Seed"}
    assert raw_keys("just a prompt") == set()


def test_clip_skip_present_pastes_n_absent_pastes_auto(webui: dict[str, Path]) -> None:  # noqa: F811
    from te_switch.webui import infotext

    params = paste(infotext_for({"Clip skip": 2}))
    assert params[infotext.PASTE_AUTO] is False
    assert params[infotext.PASTE_CLIP_SKIP] == 2
    params = paste(infotext_for({"Clip skip": 1}))  # only we write 1: it must come back as 1, not Auto
    assert (params[infotext.PASTE_AUTO], params[infotext.PASTE_CLIP_SKIP]) == (False, 1)
    params = paste(infotext_for({}))
    assert params["Clip skip"] == "1"  # the WebUI's parser inserts it...
    assert params[infotext.PASTE_AUTO] is True  # ...but the text had none: Auto
    assert infotext.PASTE_CLIP_SKIP not in params
    assert params["Clip skip scope"] == "both"
    assert params["TE CLIP-L"] == "Built-in"
    assert params["TE CLIP-L precision"] == "Auto"


def test_skipped_clip_skip_leaves_the_control_alone(webui: dict[str, Path]) -> None:  # noqa: F811
    from modules import shared

    from te_switch.webui import infotext

    shared.opts.infotext_skip_pasting = ["Clip skip"]
    params = paste(infotext_for({"Clip skip": 3}))
    assert infotext.PASTE_AUTO not in params


def test_written_entries_paste_back(webui: dict[str, Path]) -> None:  # noqa: F811
    from te_switch.webui import infotext, sources

    write_clip(webui["clip"] / "long.safetensors", kind="long-clip-l", positions=248)
    write_clip(webui["clip"] / "g.safetensors", kind="clip-g", seed=3)
    sel = Selection(
        3, "clip_g", {"clip_l": SlotChoice("long.safetensors", "fp32"), "clip_g": SlotChoice("g.safetensors")}
    )
    written = infotext.entries(sources.resolve(sel))
    hash_l = sources.short_hash(sources.source("long.safetensors", "clip_l"))
    assert written == {
        "Clip skip": 3,
        "Clip skip scope": "CLIP-G only",
        "TE CLIP-L": f"long.safetensors [{hash_l}]",
        "TE CLIP-L precision": "fp32",
        "TE CLIP-G": f"g.safetensors [{sources.short_hash(sources.source('g.safetensors', 'clip_g'))}]",
    }
    params = paste(infotext_for(written))
    assert params[infotext.PASTE_CLIP_SKIP] == 3
    assert params["Clip skip scope"] == "CLIP-G only"
    assert params["TE CLIP-L"] == "long.safetensors (Long-CLIP-L · 248)"  # as the dropdown shows it
    assert params["TE CLIP-L precision"] == "fp32"
    assert params["TE CLIP-G"] == "g.safetensors (CLIP-G)"
    assert params["TE T5-XXL"] == "Built-in"
    assert infotext.PASTE_STATUS not in params


def test_hash_wins_over_name_then_name_is_the_fallback(webui: dict[str, Path]) -> None:  # noqa: F811
    from te_switch.webui import infotext, library, sources

    write_clip(webui["clip"] / "original.safetensors", seed=1)
    write_clip(webui["clip"] / "other.safetensors", seed=2)
    digest = sources.short_hash(sources.source("original.safetensors", "clip_l"))
    shutil.move(webui["clip"] / "original.safetensors", webui["clip"] / "renamed.safetensors")
    library.refresh()
    # the file was renamed; "other.safetensors" exists but is not the file the hash names
    params = paste(infotext_for({"TE CLIP-L": f"other.safetensors [{digest}]"}))
    assert params["TE CLIP-L"] == "renamed.safetensors (CLIP-L)"
    params = paste(infotext_for({"TE CLIP-L": "other.safetensors [0000000000]"}))
    assert params["TE CLIP-L"] == "other.safetensors (CLIP-L)"
    assert infotext.PASTE_STATUS not in params


def test_missing_file_falls_back_to_builtin_with_a_warning(
    webui: dict[str, Path],  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    from te_switch.webui import infotext

    params = paste(infotext_for({"Clip skip": 2, "TE CLIP-L": "gone.safetensors [0123456789]"}))
    assert params["TE CLIP-L"] == "Built-in"
    assert params[infotext.PASTE_CLIP_SKIP] == 2  # the rest still pastes
    warning = "CLIP-L stays Built-in: gone.safetensors [0123456789]: no such encoder in the encoder folders"
    assert warning in params[infotext.PASTE_STATUS]
    assert "te-switch-error" in params[infotext.PASTE_STATUS]
    assert warning in capsys.readouterr().out


def test_wrong_kind_in_infotext_is_a_warning_too(webui: dict[str, Path]) -> None:  # noqa: F811
    write_clip(webui["clip"] / "g.safetensors", kind="clip-g")
    params = paste(infotext_for({"TE CLIP-L": "g.safetensors"}))
    assert params["TE CLIP-L"] == "Built-in"


def test_paste_fields_keep_the_native_key_out(webui: dict[str, Path]) -> None:  # noqa: F811
    import gradio as gr

    from te_switch.webui import infotext
    from te_switch.webui import panel as webui_panel
    from te_switch.webui.ui import build_panel

    with gr.Blocks():
        panel = build_panel(webui_panel.panel_backend(), elem_id=lambda item: f"t_{item}")
    fields = infotext.fields(panel)
    keys = [key for _, key in fields]
    assert "Clip skip" not in keys  # the WebUI's override of CLIP_stop_at_last_layers stays in charge
    assert "Clip skip" not in infotext.paste_field_names()
    components = [component for component, _ in fields]
    assert set(panel.inputs()) <= set(components)
    assert set(infotext.paste_field_names()) <= set(keys)


def test_api_dict_from_infotext(webui: dict[str, Path]) -> None:  # noqa: F811
    from modules import infotext_utils

    from te_switch.webui import infotext

    text = infotext_for({"Clip skip": 4, "TE CLIP-L precision": "bf16"})
    pasted = infotext.read(text, infotext_utils.parse_generation_parameters(text))
    assert pasted.as_dict() == {
        "clip_skip": 4, "scope": "both",
        "clip_l": "Built-in", "clip_l_precision": "bf16", "clip_g": "Built-in", "clip_g_precision": "auto",
        "clip_h": "Built-in", "clip_h_precision": "auto", "t5xxl": "Built-in", "t5xxl_precision": "auto",
    }  # fmt: skip
    text = infotext_for({})
    assert infotext.read(text, infotext_utils.parse_generation_parameters(text)).as_dict()["clip_skip"] == "Auto"


def test_t5_entries_paste_back_gguf_and_sharded(webui: dict[str, Path]) -> None:  # noqa: F811
    """SD3/Flux's T5 slot: a GGUF file and a sharded folder are written and pasted like any CLIP file."""
    import filemakers as fm

    from te_switch.webui import infotext, library, sources

    fm.write_sparse_gguf(webui["clip"] / "t5xxl-Q8_0.gguf", fm.gguf_t5_spec(*fm.T5_XXL))
    spec = fm.t5_spec(*fm.T5_XXL, dtype="BF16")
    keys = sorted(spec)
    fm.write_sharded(webui["clip"] / "t5-sharded", [{k: spec[k] for k in keys[:9]}, {k: spec[k] for k in keys[9:]}],
                     sparse=True)  # fmt: skip
    library.refresh()
    sharded = next(label for label in library.labels_for("t5xxl") if "t5-sharded" in label)
    for label in ("t5xxl-Q8_0.gguf", sharded):
        sel = Selection(slots={"t5xxl": SlotChoice(label, "fp32")})
        written = infotext.entries(sources.resolve(sel))
        digest = sources.short_hash(sources.source(label, "t5xxl"))
        assert written == {"TE T5-XXL": f"{label} [{digest}]", "TE T5-XXL precision": "fp32"}
        params = paste(infotext_for(written))
        assert params["TE T5-XXL"].startswith(f"{label} (T5-XXL")
        assert params["TE T5-XXL precision"] == "fp32"
        assert params["TE CLIP-L"] == "Built-in"
        assert infotext.PASTE_STATUS not in params
