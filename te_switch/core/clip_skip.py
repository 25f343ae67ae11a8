"""CLIP skip semantics (DESIGN.md) and the truncated forward that serves them.

Clip skip N on a tower means: condition on HF ``hidden_states[-N]`` — the output of block
``layers - N + 1`` (1-based). SD1/SD2 then apply the final layer norm, SDXL/SD3 do not. Pooled
vectors always come from the last layer; T5 is never skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType

import torch

from te_switch.core.selection import FAMILY_LABELS, SLOT_LABELS, SLOTS_BY_FAMILY

TOWER_LAYERS = {"clip_l": 12, "clip_g": 32, "clip_h": 24}
# the layer each family conditions on without any clip skip setting (as N)
NATIVE_SKIP: dict[str, dict[str, int]] = {
    "sd1": {"clip_l": 1},
    "sd2": {"clip_h": 2},
    "sdxl": {"clip_l": 2, "clip_g": 2},
    "sdxl-refiner": {"clip_g": 2},
    "sd3": {"clip_l": 2, "clip_g": 2},
    "flux": {"clip_l": 1},
}
FINAL_LAYER_NORM = {"sd1": True, "sd2": True, "sdxl": False, "sdxl-refiner": False, "sd3": False, "flux": True}
POOLED_ONLY_FAMILIES = ("flux",)  # CLIP hidden states are discarded; only the pooled vector is used


@dataclass(frozen=True)
class TowerPlan:
    """Which layer one CLIP tower conditions on."""

    tower: str
    skip: int  # N: hidden_states[-N]
    layers: int  # depth the layer numbering refers to (the original model's, e.g. 24 for SD2's H)
    final_ln: bool
    native: bool

    @property
    def layer(self) -> int:
        """1-based number of the block whose output is used."""
        return self.layers - self.skip + 1


def clip_towers(family: str) -> tuple[str, ...]:
    return tuple(t for t in SLOTS_BY_FAMILY[family] if t in TOWER_LAYERS)


def tower_skip(family: str, tower: str, clip_skip: int | None, scope: str = "both") -> int:
    """The N applied to ``tower``: the family's native value unless the user's N reaches it."""
    native = NATIVE_SKIP[family][tower]
    if clip_skip is None:
        return native
    two_towers = len(clip_towers(family)) > 1
    if two_towers and scope != "both" and scope != tower:
        return native
    return max(1, min(int(clip_skip), TOWER_LAYERS[tower]))


def plan(family: str, clip_skip: int | None, scope: str = "both") -> list[TowerPlan]:
    """The layer every CLIP tower of ``family`` uses for this clip skip (DESIGN semantics)."""
    out = []
    for tower in clip_towers(family):
        n = tower_skip(family, tower, clip_skip, scope)
        out.append(TowerPlan(tower, n, TOWER_LAYERS[tower], FINAL_LAYER_NORM[family], n == NATIVE_SKIP[family][tower]))
    return out


def describe(family: str, plans: list[TowerPlan], *, note: str | None = None) -> str:
    """One line for the UI, e.g. ``SDXL · CLIP-L layer 11/12 · CLIP-G layer 31/32 · native``."""
    label = FAMILY_LABELS.get(family, family)
    if family in POOLED_ONLY_FAMILIES:
        return f"{label} uses only CLIP-L's pooled output: clip skip has no effect"
    parts = [label]
    parts += [f"{SLOT_LABELS[p.tower]} layer {p.layer}/{p.layers}" for p in plans]
    if plans and all(p.native for p in plans):
        parts.append("native")
    if note:
        parts.append(note)
    return " · ".join(parts)


# ---------------------------------------------------------------------------------------------
# truncated forward


class _StopForward(Exception):
    pass


class LayerTap:
    """Capture the output of one block during a forward, and optionally stop the forward there.

    Works with any module stack that calls its blocks as submodules (HF CLIP, OpenCLIP
    resblocks, the WebUIs' own CLIP/T5 implementations), whatever their forward signatures::

        with LayerTap(blocks[i], stop=True) as tap:
            model(tokens)          # returns early, blocks after i never run
        hidden = tap.output
    """

    def __init__(self, block: torch.nn.Module, *, stop: bool) -> None:
        self.block = block
        self.stop = stop
        self.output: torch.Tensor | None = None
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def _hook(self, module: torch.nn.Module, args: object, output: object) -> None:
        self.output = output[0] if isinstance(output, tuple | list) else output  # type: ignore[assignment]
        if self.stop:
            raise _StopForward(self)

    def __enter__(self) -> LayerTap:
        self._handle = self.block.register_forward_hook(self._hook)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        # swallow only our own stop signal; a nested tap's belongs to its own `with`
        return isinstance(exc, _StopForward) and exc.args[0] is self


def block_for_skip(num_blocks: int, skip: int, *, layer_offset: int = 0) -> int:
    """0-based index of the block whose output is ``hidden_states[-skip]``.

    ``layer_offset`` is the number of final blocks the host's copy of the tower lacks (Forge's SD2
    text encoder has 23 of OpenCLIP-H's 24 layers), so ``skip`` always counts in the original model.
    """
    index = num_blocks + layer_offset - skip
    if not 0 <= index < num_blocks:
        raise ValueError(f"clip skip {skip} is out of range for a tower of {num_blocks + layer_offset} layers")
    return index
