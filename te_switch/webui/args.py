"""The script's arguments: positional (panel order) or one dict, and how levels combine.

Pure: no gradio, no ``modules``. The same functions serve the panel, the API validation and the
script, so a value means the same thing wherever it comes from.

Positional order (the panel's components, also ``alwayson_scripts`` ``args``)::

    [clip_skip_auto, clip_skip, scope,
     clip_l, clip_l_precision, clip_g, clip_g_precision, clip_h, clip_h_precision, t5xxl, t5xxl_precision]

Dict form (a single dict as the first arg)::

    {"clip_skip": 2, "scope": "both", "clip_l": "name.safetensors", "clip_l_precision": "fp32", ...}

Neutral values (Auto, Built-in, precision Auto) mean "nothing asked here": the next level down
(global options) decides. X/Y/Z values are *forced*: "Auto" on an axis means the host's own
behaviour even when the panel or the options say otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from te_switch.core.selection import (
    ALL_SLOTS,
    BUILT_IN,
    SCOPE_LABELS,
    SCOPES,
    Selection,
    SlotChoice,
    parse_clip_skip,
)
from te_switch.core.tensors import PRECISIONS
from te_switch.webui import labels

AUTO = "Auto"
PRECISION_CHOICES = (AUTO, "fp32", "bf16", "fp16")
SCOPE_CHOICES = tuple(SCOPE_LABELS[s] for s in SCOPES)  # ("both", "CLIP-L only", "CLIP-G only")
ARG_NAMES: tuple[str, ...] = (
    "clip_skip_auto",
    "clip_skip",
    "scope",
    *(name for slot in ALL_SLOTS for name in (slot, f"{slot}_precision")),
)
DICT_KEYS: tuple[str, ...] = ("clip_skip", "scope", *ARG_NAMES[3:])


class ArgsError(ValueError):
    """Arguments that do not describe a selection; ``str()`` is one line for the user."""


def parse_scope(value: object) -> str:
    """'both' | 'clip_l' | 'clip_g' from an id or a label ('CLIP-L only'); None/'' -> 'both'."""
    if value is None or value == "":
        return "both"
    text = str(value).strip()
    for scope in SCOPES:
        if text.lower() in (scope, SCOPE_LABELS[scope].lower()):
            return scope
    raise ArgsError(f"scope must be one of {', '.join(SCOPE_CHOICES)}, not {text!r}")


def parse_precision(value: object) -> str:
    """'auto' | 'fp32' | 'bf16' | 'fp16' from any case; None/'' -> 'auto'."""
    if value is None or value == "":
        return "auto"
    text = str(value).strip().lower()
    if text not in PRECISIONS:
        raise ArgsError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, not {value!r}")
    return text


def parse_encoder(value: object) -> str | None:
    """A panel/API/X/Y/Z encoder value -> the name to look up (the dropdown's decoration stripped), or
    None for Built-in."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ArgsError(f"an encoder must be a file name or {BUILT_IN!r}, not {value!r}")
    text = labels.strip(value.strip())
    return None if text in ("", BUILT_IN) or text.lower() in ("built-in", "builtin", "none") else text


def _clip_skip(value: object) -> int | None:
    try:
        return parse_clip_skip(value)
    except (TypeError, ValueError) as e:
        raise ArgsError(str(e)) from None


def precision_label(precision: str) -> str:
    return AUTO if precision == "auto" else precision


def selection_from_dict(values: Mapping[str, Any]) -> Selection:
    """The API's dict form. Unknown keys are an error (typos must not silently do nothing)."""
    unknown = sorted(set(values) - set(DICT_KEYS))
    if unknown:
        raise ArgsError(f"unknown key {unknown[0]!r} (keys: {', '.join(DICT_KEYS)})")
    slots: dict[str, SlotChoice] = {}
    for slot in ALL_SLOTS:
        choice = SlotChoice(parse_encoder(values.get(slot)), parse_precision(values.get(f"{slot}_precision")))
        if not choice.is_builtin:
            slots[slot] = choice
    return Selection(_clip_skip(values.get("clip_skip")), parse_scope(values.get("scope")), slots)


def selection_from_args(args: Sequence[Any]) -> Selection:
    """Script args (positional in panel order, or one dict) -> the panel-level Selection.

    Missing trailing args are neutral. Raises :class:`ArgsError` with a one-line reason.
    """
    args = list(args or ())
    if args and isinstance(args[0], Mapping):
        return selection_from_dict(args[0])  # the API fills later positions with panel defaults: ignored
    if len(args) > len(ARG_NAMES):
        raise ArgsError(f"too many args: {len(args)} (at most {len(ARG_NAMES)}: {', '.join(ARG_NAMES)})")
    named = dict(zip(ARG_NAMES, args, strict=False))
    auto = named.get("clip_skip_auto", True)
    if auto is None:
        auto = True
    if not isinstance(auto, bool):
        raise ArgsError(f"the first arg is the Auto checkbox (true/false) or a dict, not {auto!r}")
    clip_skip = None if auto else _clip_skip(named.get("clip_skip"))
    if not auto and clip_skip is None:
        raise ArgsError("clip skip is not Auto but no layer (1-12) was given")
    slots: dict[str, SlotChoice] = {}
    for slot in ALL_SLOTS:
        choice = SlotChoice(parse_encoder(named.get(slot)), parse_precision(named.get(f"{slot}_precision")))
        if not choice.is_builtin:
            slots[slot] = choice
    return Selection(clip_skip, parse_scope(named.get("scope")), slots)


def args_from_selection(sel: Selection) -> list[Any]:
    """The positional args (panel values) that reproduce ``sel`` at panel level."""
    out: list[Any] = [sel.clip_skip is None, sel.clip_skip or 1, SCOPE_LABELS[sel.scope]]
    for slot in ALL_SLOTS:
        choice = sel.slot(slot)
        out += [choice.encoder or BUILT_IN, precision_label(choice.precision)]
    return out


def dict_from_selection(sel: Selection) -> dict[str, Any]:
    """The dict form of ``sel`` (only what differs from neutral)."""
    out: dict[str, Any] = {"clip_skip": sel.clip_skip if sel.clip_skip is not None else AUTO}
    if sel.scope != "both":
        out["scope"] = sel.scope
    for slot, choice in sel.slots.items():
        if choice.encoder:
            out[slot] = choice.encoder
        if choice.precision != "auto":
            out[f"{slot}_precision"] = choice.precision
    return out


# ---------------------------------------------------------------------------------------------
# levels


def merge(primary: Selection, fallback: Selection) -> Selection:
    """``primary`` where it asks for something, ``fallback`` elsewhere.

    The scope travels with the clip skip it qualifies: it comes from the level that set the N.
    """
    if primary.clip_skip is not None:
        clip_skip, scope = primary.clip_skip, primary.scope
    else:
        clip_skip, scope = fallback.clip_skip, fallback.scope
    slots: dict[str, SlotChoice] = {}
    for slot in ALL_SLOTS:
        mine, theirs = primary.slot(slot), fallback.slot(slot)
        choice = SlotChoice(
            mine.encoder or theirs.encoder,
            mine.precision if mine.precision != "auto" else theirs.precision,
        )
        if not choice.is_builtin:
            slots[slot] = choice
    return Selection(clip_skip, scope, slots)


def parse_forced(values: Mapping[str, Any]) -> dict[str, Any]:
    """Validate X/Y/Z (forced) values: {'clip_skip': int|None, 'scope': str, 'clip_l': str|None, ...}."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if key == "clip_skip":
            out[key] = _clip_skip(value)
        elif key == "scope":
            out[key] = parse_scope(value)
        elif key.endswith("_precision") and key[: -len("_precision")] in ALL_SLOTS:
            out[key] = parse_precision(value)
        elif key in ALL_SLOTS:
            out[key] = parse_encoder(value)
        else:
            raise ArgsError(f"unknown key {key!r}")
    return out


def force(sel: Selection, forced: Mapping[str, Any]) -> Selection:
    """Apply X/Y/Z values: each present key wins outright (None = Auto / Built-in)."""
    forced = parse_forced(forced)
    clip_skip = forced.get("clip_skip", sel.clip_skip)
    scope = forced.get("scope", sel.scope)
    out = Selection(clip_skip, scope, dict(sel.slots))
    for slot in ALL_SLOTS:
        choice = out.slot(slot)
        if slot in forced:
            choice = replace(choice, encoder=forced[slot])
        if f"{slot}_precision" in forced:
            choice = replace(choice, precision=forced[f"{slot}_precision"])
        out = _with_choice(out, slot, choice)
    return out


def _with_choice(sel: Selection, slot: str, choice: SlotChoice) -> Selection:
    slots = {k: v for k, v in sel.slots.items() if k != slot}
    if not choice.is_builtin:
        slots[slot] = choice
    return Selection(sel.clip_skip, sel.scope, slots)
