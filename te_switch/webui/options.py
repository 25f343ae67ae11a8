"""The extension's settings ("CLIP Skip & Text Encoders" under Stable Diffusion).

Registered at import time (``options_templates`` + ``opts.add_option``), not in
``on_ui_settings``, so they exist with ``--nowebui``, answer ``/sdapi/v1/options`` and take
``override_settings``; ``add_option`` puts the defaults into ``opts.data`` so an override is
restored after the generation (``process_images`` only restores keys present in ``opts.data``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from te_switch.core.selection import ALL_SLOTS, BUILT_IN, CLIP_SKIP_MAX, SLOT_LABELS, Selection, parse_clip_skip
from te_switch.webui import library
from te_switch.webui.args import (
    AUTO,
    PRECISION_CHOICES,
    SCOPE_CHOICES,
    selection_from_dict,
)

log = logging.getLogger(__name__)

SECTION = ("te_switch", "CLIP Skip & Text Encoders", "sd")
CLIP_SKIP = "te_switch_clip_skip"
SCOPE = "te_switch_scope"
QUICKSETTINGS = "te_switch_quicksettings"
PER_CHECKPOINT = "te_switch_per_checkpoint"
AUTOMATIC = "te_switch_auto_recommended"
EXTRA_DIRS = "te_switch_extra_dirs"
# settings and flags of earlier versions: what register() does with a saved value (README "Settings")
REMOVED_SETTINGS = ("te_switch_tab_from_global",)  # the Auto slider now always rests on the global layer
REMOVED_PRECISION_FLAG = "te_switch_precision"  # --te-switch-precision: precision is chosen per slot
NATIVE_CLIP_SKIP = "CLIP_stop_at_last_layers"  # A1111's own option (Forge: "Managed by Forge", a gr.State)
CLIP_SKIP_AUTO = 0  # the slider's Auto end
# A1111 names the quicksettings list `quicksettings_list`; Forge 2 renamed it `quick_setting_list`
QUICKSETTINGS_LISTS = ("quick_setting_list", "quicksettings_list")


def encoder_key(slot: str) -> str:
    return f"te_switch_encoder_{slot}"


def precision_key(slot: str) -> str:
    return f"te_switch_precision_{slot}"


def all_keys() -> tuple[str, ...]:
    per_slot = tuple(k for slot in ALL_SLOTS for k in (encoder_key(slot), precision_key(slot)))
    return (CLIP_SKIP, SCOPE, QUICKSETTINGS, *per_slot, PER_CHECKPOINT, AUTOMATIC, EXTRA_DIRS)


def _shared() -> Any:
    from modules import shared

    return shared


def quicksettings_list_key(opts: Any) -> str:
    return next((k for k in QUICKSETTINGS_LISTS if k in opts.data_labels), QUICKSETTINGS_LISTS[-1])


def stored_clip_skip(value: object) -> int:
    """The option's value as the slider's int (0 = Auto); older versions stored "Auto" / "2"."""
    try:
        n = parse_clip_skip(value)
    except (TypeError, ValueError):
        return CLIP_SKIP_AUTO
    return CLIP_SKIP_AUTO if n is None else n


def toggle_quicksettings() -> None:
    """Put our CLIP Skip slider into the quicksettings bar (or take it out), and save.

    It takes the place of A1111's own Clip skip entry when that one is in the bar, with its value
    when ours is on Auto, so the bar keeps exactly one clip-skip control (the page's script hides
    Forge's built-in slider the same way).
    """
    shared = _shared()
    opts = shared.opts
    key = quicksettings_list_key(opts)
    current = list(getattr(opts, key, None) or [])
    wanted = bool(getattr(opts, QUICKSETTINGS, False))
    if wanted == (CLIP_SKIP in current):
        return
    if not wanted:
        updated = [k for k in current if k != CLIP_SKIP]
    elif NATIVE_CLIP_SKIP in current:
        updated = [CLIP_SKIP if k == NATIVE_CLIP_SKIP else k for k in current]
        native = stored_clip_skip(getattr(opts, NATIVE_CLIP_SKIP, 1))
        if stored_clip_skip(getattr(opts, CLIP_SKIP, CLIP_SKIP_AUTO)) == CLIP_SKIP_AUTO and native > 1:
            opts.set(CLIP_SKIP, native)
    else:
        updated = [*current, CLIP_SKIP]
    opts.set(key, updated)
    config = getattr(shared, "config_filename", None)
    if config:
        opts.save(config)


def _rescan_folders() -> None:
    library.reset()
    library.refresh()


def _encoder_args(slot: str) -> Any:
    def args() -> dict[str, Any]:
        try:
            labels = library.labels_for(slot)
        except Exception as e:  # a broken folder must not break the settings page
            log.warning("TE Switch: cannot list %s encoders: %s", SLOT_LABELS[slot], e)
            labels = []
        return {"choices": [BUILT_IN, *labels]}

    return args


def templates() -> dict[str, Any]:
    """Our OptionInfos (gradio is imported here: only a WebUI calls this)."""
    import gradio as gr

    shared = _shared()
    info = shared.OptionInfo
    items: dict[str, Any] = {
        CLIP_SKIP: info(
            CLIP_SKIP_AUTO, "CLIP Skip (0 = Auto)", gr.Slider, {"minimum": 0, "maximum": CLIP_SKIP_MAX, "step": 1}
        ).info("both tabs' CLIP Skip; 0 = Auto, the model's own layer. Works on SD1, SD2, SDXL, SD3; Flux ignores it"),
        SCOPE: info("both", "CLIP Skip applies to (SDXL, SD3)", gr.Radio, {"choices": list(SCOPE_CHOICES)}),
        QUICKSETTINGS: info(False, "Show CLIP Skip in the quicksettings bar", onchange=toggle_quicksettings)
        .info("one slider in the top bar, in place of the WebUI's own Clip skip")
        .needs_reload_ui(),
    }
    for slot in ALL_SLOTS:
        label = SLOT_LABELS[slot]
        items[encoder_key(slot)] = info(
            BUILT_IN, f"Default {label} encoder", gr.Dropdown, _encoder_args(slot), refresh=library.refresh
        ).info("used when a tab says Built-in")
        items[precision_key(slot)] = info(
            AUTO, f"{label} precision", gr.Dropdown, {"choices": list(PRECISION_CHOICES)}
        ).info("Auto = the WebUI's dtype")
    items[PER_CHECKPOINT] = info(False, "Per model: remember what I generate with").info(
        "a checkpoint brings back its last clip skip and encoders; a LoRA's last clip skip counts before its files"
    )
    items[AUTOMATIC] = info(False, "Per model: Auto follows the recommended clip skip").info(
        "when the checkpoint and the prompt's LoRAs agree on one; otherwise Auto stays the WebUI's own"
    )
    items[EXTRA_DIRS] = info("", "Extra encoder folders", gr.Textbox, {"lines": 2}, onchange=_rescan_folders).info(
        "one per line (--te-switch-dir adds its folders here); models/CLIP and models/text_encoder(s) are always scanned"
    )
    return shared.options_section(SECTION, items)


def register() -> None:
    """Add the options to the WebUI (idempotent) and keep the quicksettings checkbox truthful."""
    shared = _shared()
    items = templates()
    if shared.options_templates is not None:
        shared.options_templates.update(items)
    opts = shared.opts
    if opts is None:
        return
    for key, item in items.items():
        opts.add_option(key, item)
    if not isinstance(opts.data.get(CLIP_SKIP), int) or isinstance(opts.data.get(CLIP_SKIP), bool):
        opts.data[CLIP_SKIP] = stored_clip_skip(opts.data.get(CLIP_SKIP))  # "Auto"/"2" from older versions
    in_bar = CLIP_SKIP in (getattr(opts, quicksettings_list_key(opts), None) or [])
    if bool(opts.data.get(QUICKSETTINGS)) != in_bar:
        opts.data[QUICKSETTINGS] = in_bar  # someone edited the list by hand: reflect it
    migrate(opts, getattr(shared, "cmd_opts", None))


def migrate(opts: Any, cmd_opts: Any) -> None:
    """Earlier versions' settings and flags, and ``--te-switch-dir``, into today's one mechanism each.

    * ``--te-switch-dir DIR``: DIR joins the *Extra encoder folders* setting (shown there; saved with
      the settings like any folder typed in), so the setting lists every extra folder that is scanned.
    * ``te_switch_tab_from_global`` (removed): dropped from the saved settings; the Auto slider rests on
      the global CLIP Skip when one is set, else on the model's native layer (the old default).
    * ``--te-switch-precision`` (removed): ignored, said once; precision is per slot (settings or tab).
    """
    for folder in getattr(cmd_opts, "te_switch_dir", None) or []:
        current = str(opts.data.get(EXTRA_DIRS) or "")
        listed = {os.path.abspath(f) for f in library.split_folders(current)}
        if os.path.abspath(folder) not in listed:
            opts.data[EXTRA_DIRS] = f"{current.rstrip()}\n{folder}".lstrip("\n")
    for key in REMOVED_SETTINGS:
        opts.data.pop(key, None)
    if getattr(cmd_opts, REMOVED_PRECISION_FLAG, None):
        print(
            "TE Switch: --te-switch-precision is no longer supported and is ignored; choose a precision per "
            "encoder slot in Settings → CLIP Skip & Text Encoders, or on the tab's panel"
        )


def global_clip_skip() -> int | None:
    """The page's clip skip (the top-bar slider; None = Auto)."""
    return stored_clip_skip(getattr(_shared().opts, CLIP_SKIP, CLIP_SKIP_AUTO)) or None


def set_global_clip_skip(n: int | None) -> None:
    """Set it from a tab (the tab and the bar show one value), saved like a quicksettings change."""
    shared = _shared()
    if shared.opts.set(CLIP_SKIP, CLIP_SKIP_AUTO if n is None else int(n)):
        config = getattr(shared, "config_filename", None)
        if config:
            shared.opts.save(config)


def global_selection(opts: Any = None) -> Selection:
    """The options as a Selection (the level under the tab panel); bad values raise ArgsError."""
    if opts is None:
        opts = _shared().opts
    values: dict[str, Any] = {
        "clip_skip": getattr(opts, CLIP_SKIP, AUTO),
        "scope": getattr(opts, SCOPE, "both"),
    }
    for slot in ALL_SLOTS:
        values[slot] = getattr(opts, encoder_key(slot), BUILT_IN)
        values[f"{slot}_precision"] = getattr(opts, precision_key(slot), AUTO)
    return selection_from_dict(values)
