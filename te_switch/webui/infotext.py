"""Infotext in the WebUI: what a generation records, and how pasting it (PNG Info, "Send to", the
API's ``infotext`` field) restores the panel.

The keys and the text format are the core codec's (``core/infotext.py``): ``Clip skip: N`` whenever
our clip skip is explicit (N=1 too: A1111 would omit it, and a missing key pastes back as Auto), its
scope, ``TE CLIP-L: name [short hash]`` per swapped slot and ``TE CLIP-L precision``. What is written
is the generation's :class:`~te_switch.webui.sources.Resolved`: the same sources the host loaded.

Pasting: the native ``Clip skip`` key stays out of our string paste fields (so the WebUI's
override of ``CLIP_stop_at_last_layers`` keeps working); ``on_infotext_pasted`` sees the raw text
(A1111's parser inserts ``Clip skip: 1`` when it is absent) and fills our own keys.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from te_switch.core.errors import TESwitchError, one_line
from te_switch.core.infotext import (
    CLIP_SKIP,
    OUR_KEYS,
    SCOPE,
    clip_skip_entries,
    encoder_key,
    encoder_value,
    precision_key,
    raw_keys,
    slot_entries,
)
from te_switch.core.infotext import unquote as _unquote
from te_switch.core.selection import ALL_SLOTS, BUILT_IN, SCOPE_LABELS, SLOT_LABELS
from te_switch.hosts.engine import EncoderSource
from te_switch.webui import compat, labels, sources
from te_switch.webui.args import AUTO, ArgsError, parse_precision, parse_scope, precision_label
from te_switch.webui.sources import Resolved
from te_switch.webui.ui import Panel, status_html

# our synthetic paste keys: dots never occur in real infotext keys, so these cannot collide
PASTE_AUTO = "te_switch.clip_skip_auto"
PASTE_CLIP_SKIP = "te_switch.clip_skip"
PASTE_STATUS = "te_switch.status"


# ---------------------------------------------------------------------------------------------
# writing


def entries(resolved: Resolved) -> dict[str, Any]:
    """The infotext entries for a generation's resolved selection: its sources, ``name [short hash]``."""
    out = clip_skip_entries(resolved.selection)
    for slot in ALL_SLOTS:
        choice = resolved.selection.slot(slot)
        src = resolved.sources.get(slot)
        encoder = encoder_value(src.label, sources.short_hash(src)) if src is not None else None
        out.update(slot_entries(slot, encoder, choice.precision))
    return out


def write(p: Any, resolved: Resolved) -> None:
    """Record ``resolved`` on ``p``. The dict is copied first: X/Y/Z cells share their parent's."""
    params = {k: v for k, v in (p.extra_generation_params or {}).items() if k not in OUR_KEYS}
    if getattr(p, "te_switch_wrote_clip_skip", False):
        params.pop(CLIP_SKIP, None)
    new = entries(resolved)
    params.update(new)
    p.extra_generation_params = params
    p.te_switch_wrote_clip_skip = CLIP_SKIP in new


# ---------------------------------------------------------------------------------------------
# reading


@dataclass
class Pasted:
    """What an infotext asks of the panel. ``clip_skip``: ``...`` = leave the control alone."""

    clip_skip: Any = ...  # int, None (Auto) or ... (untouched)
    scope: str = "both"
    encoders: dict[str, EncoderSource] = field(default_factory=dict)  # slot -> the file the value names
    precisions: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The API's dict form of the script args."""
        out: dict[str, Any] = {"scope": self.scope}
        if self.clip_skip is not ...:
            out["clip_skip"] = self.clip_skip if self.clip_skip is not None else AUTO
        for slot in ALL_SLOTS:
            src = self.encoders.get(slot)
            out[slot] = src.label if src is not None else BUILT_IN
            out[f"{slot}_precision"] = self.precisions.get(slot, "auto")
        return out


def read(infotext: str, params: Mapping[str, Any]) -> Pasted:
    """Interpret a pasted infotext (``params`` as the WebUI parsed it). Missing files fall back
    to Built-in with a warning; nothing here raises."""
    present = raw_keys(infotext)
    out = Pasted()
    if CLIP_SKIP in params:  # absent from params only when the user told the WebUI to skip it
        if CLIP_SKIP in present:
            try:
                out.clip_skip = int(float(str(params[CLIP_SKIP])))
                if not 1 <= out.clip_skip <= 12:
                    raise ValueError(out.clip_skip)
            except ValueError:
                out.warnings.append(f"Clip skip {params[CLIP_SKIP]!r} is not 1-12; CLIP Skip set to Auto")
                out.clip_skip = None
        else:
            out.clip_skip = None
    try:
        out.scope = parse_scope(_unquote(params.get(SCOPE)))
    except ArgsError as e:
        out.warnings.append(str(e))
    for slot in ALL_SLOTS:
        value = _unquote(params.get(encoder_key(slot)))
        if value:
            try:
                out.encoders[slot] = sources.source(str(value), slot)
            except TESwitchError as e:
                out.warnings.append(f"{SLOT_LABELS[slot]} stays Built-in: {one_line(e)}")
        try:
            out.precisions[slot] = parse_precision(_unquote(params.get(precision_key(slot))))
        except ArgsError as e:
            out.warnings.append(f"{SLOT_LABELS[slot]}: {e}")
    return out


def on_infotext_pasted(infotext: str, params: dict[str, Any]) -> None:
    """``script_callbacks.on_infotext_pasted``: fill our paste keys for the panel's fields."""
    pasted = read(infotext, params)
    if pasted.clip_skip is not ...:
        params[PASTE_AUTO] = pasted.clip_skip is None
        if pasted.clip_skip is not None:
            params[PASTE_CLIP_SKIP] = pasted.clip_skip
    params[SCOPE] = SCOPE_LABELS[pasted.scope]
    for slot in ALL_SLOTS:
        src = pasted.encoders.get(slot)
        params[encoder_key(slot)] = labels.decorate(src.label, src.tower) if src is not None else BUILT_IN
        params[precision_key(slot)] = precision_label(pasted.precisions.get(slot, "auto"))
    if pasted.warnings:
        message = "; ".join(pasted.warnings)
        print(f"TE Switch: pasted infotext: {message}")
        params[PASTE_STATUS] = status_html((f"\u26a0 {message}", True))
        for warning in pasted.warnings:
            compat.warn(sys.modules.get("gradio"), warning)


def fields(panel: Panel) -> list[tuple[Any, str]]:
    """``Script.infotext_fields``: panel component -> the paste key that sets it."""
    out: list[tuple[Any, str]] = [
        (panel.clip_skip_auto, PASTE_AUTO),
        (panel.clip_skip, PASTE_CLIP_SKIP),
        (panel.scope, SCOPE),
    ]
    for slot in ALL_SLOTS:
        out += [(panel.encoders[slot], encoder_key(slot)), (panel.precisions[slot], precision_key(slot))]
    out.append((panel.status, PASTE_STATUS))
    return out


def paste_field_names() -> list[str]:
    """``Script.paste_field_names``: what "Send to txt2img/img2img" carries between tabs."""
    return [PASTE_AUTO, PASTE_CLIP_SKIP, *OUR_KEYS]
