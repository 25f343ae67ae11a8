"""How an encoder is shown in a dropdown, and how a shown value is read back: the one place for both.

A dropdown entry is the library label with a decoration of what the file is,
``'sub/long.safetensors (Long-CLIP-L · 248)'``: the panel (its choices and pasted values), the API's
encoder list and the standalone page show it this way. Every value that comes back (a panel arg, an
API field, an X/Y/Z cell, a remembered panel) goes through :func:`strip` before it is resolved. Both
sides are built from :data:`KIND_LABELS`, so they cannot drift apart.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from te_switch.core.detect import TowerInfo

KIND_LABELS = {
    "clip-l": "CLIP-L",
    "long-clip-l": "Long-CLIP-L",
    "clip-g": "CLIP-G",
    "clip-h": "CLIP-H",
    "t5-xxl": "T5-XXL",
    "t5-xl": "T5-XL",
    "t5-base": "T5-base",
    "umt5-xxl": "UMT5-XXL",
}
KIND_ORDER = tuple(KIND_LABELS)
QUANT_LABELS = {"fp8": "fp8", "scaled-fp8": "scaled fp8", "gguf": "GGUF"}
SEPARATOR = " · "
_DECORATION = re.compile(
    r" \((?:" + "|".join(re.escape(w) for w in KIND_LABELS.values()) + rf")(?:{SEPARATOR}[^()]*)?\)$"
)


def kind_label(kind: str | None) -> str:
    """'long-clip-l' -> 'Long-CLIP-L' (unknown kinds as they are)."""
    return KIND_LABELS.get(kind or "", kind or "?")


def describe_tower(tower: TowerInfo) -> str:
    """'Long-CLIP-L · 248', 'T5-XXL · GGUF', 'CLIP-L · from checkpoint' (the decoration's words)."""
    parts = [kind_label(tower.kind)]
    if tower.positions and tower.positions != 77:
        parts.append(str(tower.positions))
    if tower.quant:
        parts.append(QUANT_LABELS.get(tower.quant, tower.quant))
    if tower.prefix:
        parts.append("from checkpoint")
    return SEPARATOR.join(parts)


def decorate(label: str, tower: TowerInfo) -> str:
    """A library label as a dropdown shows it: 'x.safetensors (Long-CLIP-L · 248)'."""
    return f"{label} ({describe_tower(tower)})"


def strip(value: str) -> str:
    """The inverse of :func:`decorate`: 'dir/x.safetensors (Long-CLIP-L · 248)' -> 'dir/x.safetensors'
    (text without our decoration is returned unchanged)."""
    return _DECORATION.sub("", value)
