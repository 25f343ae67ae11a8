"""What the user wants from the prompt-encoding stage, independent of any host.

A :class:`Selection` is the whole request: clip skip (or Auto), its scope on two-tower models, and
per slot an encoder (or Built-in) with a precision. The UI and the API only build Selections;
host adapters make the live model match one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

FAMILIES = ("sd1", "sd2", "sdxl", "sdxl-refiner", "sd3", "flux", "chroma")
FAMILY_LABELS = {
    "sd1": "SD1",
    "sd2": "SD2",
    "sdxl": "SDXL",
    "sdxl-refiner": "SDXL refiner",
    "sd3": "SD3",
    "flux": "Flux",
    "chroma": "Chroma",
}
SLOTS_BY_FAMILY: dict[str, tuple[str, ...]] = {
    "sd1": ("clip_l",),
    "sd2": ("clip_h",),
    "sdxl": ("clip_l", "clip_g"),
    "sdxl-refiner": ("clip_g",),
    "sd3": ("clip_l", "clip_g", "t5xxl"),
    "flux": ("clip_l", "t5xxl"),
    "chroma": ("t5xxl",),
}
SLOT_LABELS = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "clip_h": "CLIP-H", "t5xxl": "T5-XXL"}
# which detected kinds may fill a slot (shapes are checked again against the live module)
KINDS_BY_SLOT: dict[str, tuple[str, ...]] = {
    "clip_l": ("clip-l", "long-clip-l"),
    "clip_g": ("clip-g",),
    "clip_h": ("clip-h",),
    "t5xxl": ("t5-xxl",),
}
ALL_SLOTS = tuple(SLOT_LABELS)
SCOPES = ("both", "clip_l", "clip_g")
SCOPE_LABELS = {"both": "both", "clip_l": "CLIP-L only", "clip_g": "CLIP-G only"}
BUILT_IN = "Built-in"
CLIP_SKIP_MAX = 12


@dataclass(frozen=True)
class SlotChoice:
    """One slot's wish: an encoder (a library label) or Built-in, and a precision."""

    encoder: str | None = None  # None = the checkpoint's own encoder
    precision: str = "auto"

    def __post_init__(self) -> None:
        from te_switch.core.tensors import PRECISIONS  # here: torch is not needed to parse arguments

        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.encoder in ("", BUILT_IN):
            object.__setattr__(self, "encoder", None)

    @property
    def is_builtin(self) -> bool:
        return self.encoder is None and self.precision == "auto"


@dataclass(frozen=True)
class Selection:
    clip_skip: int | None = None  # None = Auto: the host's own behaviour, bit for bit
    scope: str = "both"
    slots: dict[str, SlotChoice] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.clip_skip is not None:
            # one spelling per value (so equal selections have equal signatures); Auto is None, not 0
            n = parse_clip_skip(self.clip_skip)
            if n is None:
                raise ValueError(f"clip skip must be 1..{CLIP_SKIP_MAX} (None for Auto), not {self.clip_skip!r}")
            object.__setattr__(self, "clip_skip", n)
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, not {self.scope!r}")
        unknown = set(self.slots) - set(ALL_SLOTS)
        if unknown:
            raise ValueError(f"unknown slot {sorted(unknown)[0]!r} (slots: {', '.join(ALL_SLOTS)})")

    def slot(self, name: str) -> SlotChoice:
        return self.slots.get(name, SlotChoice())

    def with_slot(self, name: str, choice: SlotChoice) -> Selection:
        return replace(self, slots={**self.slots, name: choice})

    @property
    def is_auto(self) -> bool:
        """Nothing to do: the host runs exactly as it would without the extension."""
        return self.clip_skip is None and all(c.is_builtin for c in self.slots.values())

    def signature(self) -> tuple:
        """Hashable identity for cond caches (encoder identities are resolved by the host)."""
        slots = tuple(sorted((k, v.encoder, v.precision) for k, v in self.slots.items() if not v.is_builtin))
        return (self.clip_skip, self.scope if self.clip_skip is not None else None, slots)


def parse_clip_skip(value: object) -> int | None:
    """UI/API/infotext value → 1..12 or None (Auto). Accepts ints, digit strings, 'Auto', 0."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        if text == "" or text.lower() == "auto":
            return None
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"clip skip must be 1..{CLIP_SKIP_MAX} or Auto, not {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"clip skip must be 1..{CLIP_SKIP_MAX} or Auto, not {value!r}")
    n = int(value)  # type: ignore[call-overload]
    if n != value:
        raise ValueError(f"clip skip must be a whole number, not {value!r}")
    if n == 0:
        return None
    if not 1 <= n <= CLIP_SKIP_MAX:
        raise ValueError(f"clip skip must be 1..{CLIP_SKIP_MAX} or Auto, not {n}")
    return n
