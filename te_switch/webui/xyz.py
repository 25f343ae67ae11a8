"""X/Y/Z plot axes: "[TE] CLIP Skip", "[TE] CLIP Skip scope", "[TE] CLIP-L" … and their precisions.

Axis values are stored on the cell's ``p`` (``p.te_switch_xyz``, a fresh dict per cell: X/Y/Z
copies ``p`` shallowly) and win over the tab panel and the options. "Auto" / "Built-in" on an
axis are forced too: they mean the host's own behaviour / the checkpoint's own encoder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import ModuleType
from typing import Any

from te_switch.core.errors import TESwitchError, one_line
from te_switch.core.selection import ALL_SLOTS, BUILT_IN, CLIP_SKIP_MAX, SLOT_LABELS
from te_switch.webui import library, sources
from te_switch.webui.args import (
    AUTO,
    PRECISION_CHOICES,
    SCOPE_CHOICES,
    ArgsError,
    parse_encoder,
    parse_forced,
)

log = logging.getLogger(__name__)
ATTR = "te_switch_xyz"
PREFIX = "[TE] "
CLIP_SKIP_LABEL = f"{PREFIX}CLIP Skip"
SCOPE_LABEL = f"{PREFIX}CLIP Skip scope"
ENCODER_COST = 0.8  # encoders change least often (checkpoint 1.0, FP8 0.9, VAE 0.7)


def forced(p: Any) -> dict[str, Any]:
    return dict(getattr(p, ATTR, None) or {})


def setter(key: str) -> Callable[[Any, Any, Any], None]:
    def apply(p: Any, x: Any, xs: Any) -> None:
        setattr(p, ATTR, {**forced(p), key: x})  # a new dict: the parent p is shared by every cell

    return apply


def clip_skip_values(text: str) -> list[str]:
    """CSV mode: 'Auto, 1-3, 5' -> ['Auto', '1', '2', '3', '5'] (ranges like the native axis)."""
    out: list[str] = []
    for part in (t.strip() for t in str(text).split(",")):
        if not part:
            continue
        if "-" in part and part.replace("-", "").replace(" ", "").isdigit():
            start, end = (int(x) for x in part.split("-", 1))
            out += [str(n) for n in range(start, end + 1)]
        else:
            out.append(part)
    return out


def _confirm(key: str) -> Callable[[Any, list[Any]], None]:
    def confirm(p: Any, xs: list[Any]) -> None:
        for x in xs:
            try:
                parse_forced({key: x})
            except ArgsError as e:
                raise RuntimeError(f"{PREFIX.strip()} {e}") from None

    return confirm


def _confirm_encoder(slot: str) -> Callable[[Any, list[Any]], None]:
    def confirm(p: Any, xs: list[Any]) -> None:
        for x in xs:
            try:
                name = parse_encoder(x)
                if name is not None:
                    sources.source(name, slot)  # each cell gets this source back: resolved once
            except (ArgsError, TESwitchError) as e:
                raise RuntimeError(f"{PREFIX}{SLOT_LABELS[slot]}: {one_line(e)}") from None

    return confirm


def _encoder_choices(slot: str) -> Callable[[], list[str]]:
    def choices() -> list[str]:
        try:
            return [BUILT_IN, *library.labels_for(slot)]
        except Exception as e:  # a broken folder must not break the X/Y/Z script's UI
            log.warning("TE Switch: cannot list %s encoders: %s", SLOT_LABELS[slot], e)
            return [BUILT_IN]

    return choices


def axis_options(xyz: ModuleType) -> list[Any]:
    """Our AxisOptions, built with the loaded xyz_grid module's own class."""
    axis = xyz.AxisOption
    options = [
        axis(
            CLIP_SKIP_LABEL,
            str,
            setter("clip_skip"),
            confirm=_confirm("clip_skip"),
            choices=lambda: [AUTO, *(str(n) for n in range(1, CLIP_SKIP_MAX + 1))],
            prepare=clip_skip_values,
        ),
        axis(SCOPE_LABEL, str, setter("scope"), confirm=_confirm("scope"), choices=lambda: list(SCOPE_CHOICES)),
    ]
    for slot in ALL_SLOTS:
        label = SLOT_LABELS[slot]
        options.append(
            axis(
                f"{PREFIX}{label}",
                str,
                setter(slot),
                format_value=_format_encoder,
                confirm=_confirm_encoder(slot),
                cost=ENCODER_COST,
                choices=_encoder_choices(slot),
            )
        )
        options.append(
            axis(
                f"{PREFIX}{label} precision",
                str,
                setter(f"{slot}_precision"),
                confirm=_confirm(f"{slot}_precision"),
                choices=lambda: list(PRECISION_CHOICES),
            )
        )
    return options


def _format_encoder(p: Any, opt: Any, x: Any) -> str:
    return f"{opt.label[len(PREFIX) :]}: {x}"


def find_xyz_module() -> ModuleType | None:
    """The loaded ``xyz_grid.py`` module (scripts load it under its file name)."""
    try:
        from modules import scripts
    except ImportError:
        return None
    for data in getattr(scripts, "scripts_data", []):
        if getattr(data.script_class, "__module__", None) == "xyz_grid.py":
            return data.module
    return None


def add_axes() -> int:
    """``on_before_ui``: append our axes once (a UI reload runs this again). Returns how many."""
    xyz = find_xyz_module()
    if xyz is None:
        return 0
    existing = {getattr(o, "label", None) for o in xyz.axis_options}
    new = [o for o in axis_options(xyz) if o.label not in existing]
    xyz.axis_options.extend(new)
    return len(new)
