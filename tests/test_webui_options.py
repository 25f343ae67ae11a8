"""Settings: registered at import time with the right defaults; the quicksettings switch; the
global level of the Selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_webui_support import webui, write_clip  # noqa: F401 - fixtures

from te_switch.core.selection import Selection, SlotChoice


def test_options_registered_with_defaults(webui: dict[str, Path]) -> None:  # noqa: F811
    from modules import shared

    from te_switch.webui import options

    options.register()
    expected = {
        "te_switch_clip_skip": 0,
        "te_switch_scope": "both",
        "te_switch_quicksettings": False,
        "te_switch_per_checkpoint": False,
        "te_switch_auto_recommended": False,
        "te_switch_extra_dirs": "",
        **{f"te_switch_encoder_{s}": "Built-in" for s in ("clip_l", "clip_g", "clip_h", "t5xxl")},
        **{f"te_switch_precision_{s}": "Auto" for s in ("clip_l", "clip_g", "clip_h", "t5xxl")},
    }
    for key, default in expected.items():
        assert shared.opts.data[key] == default, key  # in opts.data: override_settings get restored
        assert key in shared.options_templates
        assert shared.opts.data_labels[key].section == ("te_switch", "CLIP Skip & Text Encoders")
        assert shared.opts.data_labels[key].category_id == "sd"
    assert set(expected) == set(options.all_keys())
    assert shared.opts.data_labels["te_switch_clip_skip"].infotext is None  # never "Clip skip"
    # one slider everywhere (the quicksettings bar renders the same component): 0 is Auto
    assert shared.opts.data_labels["te_switch_clip_skip"].component_args == {"minimum": 0, "maximum": 12, "step": 1}
    assert shared.opts.data_labels["te_switch_clip_skip"].component.__name__ == "Slider"
    assert "Reload UI" in shared.opts.data_labels["te_switch_quicksettings"].comment_after
    options.register()  # a UI reload registers again: nothing doubles, values stay
    assert shared.opts.data["te_switch_clip_skip"] == 0


@pytest.mark.parametrize(("saved", "now"), [("Auto", 0), ("2", 2), (3, 3), ("junk", 0)])
def test_older_dropdown_values_become_slider_values(webui: dict[str, Path], saved: object, now: int) -> None:  # noqa: F811
    """Up to 0.1 the option was a dropdown of "Auto", "1" … "12" (kept in config.json)."""
    from modules import shared

    from te_switch.core.selection import Selection
    from te_switch.webui import options

    shared.opts.data["te_switch_clip_skip"] = saved
    options.register()
    assert shared.opts.data["te_switch_clip_skip"] == now
    assert options.global_selection() == Selection(now or None)


def test_bar_slider_takes_the_place_of_the_native_one(webui: dict[str, Path]) -> None:  # noqa: F811
    """A1111 users often have its own Clip skip in the bar: ours replaces it (same place, its value)."""
    from modules import shared

    from te_switch.webui import options

    options.register()
    shared.opts.set("quicksettings_list", ["sd_model_checkpoint", "CLIP_stop_at_last_layers", "sd_vae"])
    shared.opts.set("CLIP_stop_at_last_layers", 2)
    assert shared.opts.set("te_switch_quicksettings", True)
    assert shared.opts.quicksettings_list == ["sd_model_checkpoint", "te_switch_clip_skip", "sd_vae"]
    assert shared.opts.te_switch_clip_skip == 2  # it was on Auto: the bar keeps showing 2
    assert shared.opts.set("te_switch_quicksettings", False)
    assert shared.opts.quicksettings_list == ["sd_model_checkpoint", "sd_vae"]
    shared.opts.set("te_switch_clip_skip", 4)
    shared.opts.set("quicksettings_list", ["CLIP_stop_at_last_layers"])
    assert shared.opts.set("te_switch_quicksettings", True)
    assert shared.opts.te_switch_clip_skip == 4  # a value of its own is kept


def test_encoder_option_lists_library_files(webui: dict[str, Path]) -> None:  # noqa: F811
    from modules import shared

    from te_switch.webui import options

    options.register()
    write_clip(webui["clip"] / "mine.safetensors")
    args = shared.opts.data_labels["te_switch_encoder_clip_l"].component_args()
    assert args["choices"] == ["Built-in", "mine.safetensors"]
    assert shared.opts.data_labels["te_switch_encoder_clip_g"].component_args()["choices"] == ["Built-in"]
    assert shared.opts.data_labels["te_switch_encoder_clip_l"].refresh is not None


@pytest.mark.parametrize("list_key", ["quicksettings_list", "quick_setting_list"])
def test_quicksettings_switch_edits_the_list_and_saves(webui: dict[str, Path], list_key: str) -> None:  # noqa: F811
    from modules import shared

    from te_switch.webui import options

    if list_key == "quick_setting_list":  # Forge 2 renamed A1111's quicksettings_list
        del shared.opts.data_labels["quicksettings_list"]
        shared.opts.data.pop("quicksettings_list")
        shared.opts.add_option(list_key, shared.OptionInfo([], "Quicksettings list"))
    options.register()
    assert shared.opts.set("te_switch_quicksettings", True)
    assert "te_switch_clip_skip" in getattr(shared.opts, list_key)
    saved = json.loads((webui["data"] / "config.json").read_text())
    assert "te_switch_clip_skip" in saved[list_key]
    assert shared.opts.set("te_switch_quicksettings", False)
    assert "te_switch_clip_skip" not in getattr(shared.opts, list_key)


def test_quicksettings_checkbox_reflects_a_hand_edited_list(webui: dict[str, Path]) -> None:  # noqa: F811
    from modules import shared

    from te_switch.webui import options

    shared.opts.data["quicksettings_list"] = ["sd_model_checkpoint", "te_switch_clip_skip"]
    options.register()
    assert shared.opts.data["te_switch_quicksettings"] is True


def test_global_selection(webui: dict[str, Path]) -> None:  # noqa: F811
    from modules import shared

    from te_switch.webui import options

    options.register()
    assert options.global_selection() == Selection()
    shared.opts.data.update(
        te_switch_clip_skip="3", te_switch_scope="CLIP-G only", te_switch_encoder_clip_l="x.safetensors",
        te_switch_precision_t5xxl="bf16",
    )  # fmt: skip
    assert options.global_selection() == Selection(
        3, "clip_g", {"clip_l": SlotChoice("x.safetensors"), "t5xxl": SlotChoice(None, "bf16")}
    )


def test_flags_and_removed_settings_migrate(
    webui: dict[str, Path],  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    """--te-switch-dir joins the Extra encoder folders setting (one mechanism, shown to the user); a saved
    te_switch_tab_from_global is dropped; --te-switch-precision is ignored with one line."""
    from modules import shared

    from te_switch.webui import library, options

    flag_dir, typed_dir = tmp_path / "flag", tmp_path / "typed"
    shared.opts.data["te_switch_extra_dirs"] = str(typed_dir)
    shared.opts.data["te_switch_tab_from_global"] = False  # saved by an earlier version
    shared.cmd_opts.te_switch_dir = [str(flag_dir)]
    shared.cmd_opts.te_switch_precision = "fp32"
    try:
        options.register()
        assert shared.opts.data["te_switch_extra_dirs"].splitlines() == [str(typed_dir), str(flag_dir)]
        assert "te_switch_tab_from_global" not in shared.opts.data
        assert "--te-switch-precision is no longer supported" in capsys.readouterr().out
        options.register()  # again (a UI reload): the folder is not added twice
        assert shared.opts.data["te_switch_extra_dirs"].splitlines() == [str(typed_dir), str(flag_dir)]
        folders = library.encoder_folders()
        assert folders[-2:] == [str(typed_dir), str(flag_dir)]
        shared.cmd_opts.te_switch_dir = []
        assert library.encoder_folders()[-2:] == [str(typed_dir), str(flag_dir)]  # the setting holds it now
    finally:
        shared.cmd_opts.te_switch_dir = []
        shared.cmd_opts.te_switch_precision = None
