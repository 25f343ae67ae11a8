"""CLIP skip semantics (docs/DESIGN.md) and the truncated forward that serves them.

Clip skip N on a tower means: condition on HF ``hidden_states[-N]`` — the output of block
``layers - N + 1`` (1-based). SD1/SD2 then apply the final layer norm, SDXL/SD3 do not. Pooled
vectors always come from the last layer; T5 is never skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

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
    "chroma": {},
}
FINAL_LAYER_NORM = {
    "sd1": True,
    "sd2": True,
    "sdxl": False,
    "sdxl-refiner": False,
    "sd3": False,
    "flux": True,
    "chroma": False,
}
POOLED_ONLY_FAMILIES = ("flux",)  # CLIP hidden states are discarded; only the pooled vector is used
# towers a host may hold without their last blocks: SD2's CLIP-H is 23 of OpenCLIP-H's 24 layers in
# Forge and diffusers (A1111 keeps all 24)
SHORTENED_TOWERS = ("clip_h",)

T = TypeVar("T")


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


def missing_layers(tower: str, blocks: int) -> int:
    """Final blocks a host's copy of ``tower`` lacks (1 for SD2's 23-layer CLIP-H), so N counts in the original."""
    full = TOWER_LAYERS.get(tower, blocks)
    return full - blocks if tower in SHORTENED_TOWERS and blocks < full else 0


def tower_plan(family: str, tower: str, skip: int, *, final_ln: bool | None = None, missing: int = 0) -> TowerPlan:
    """The one way to build a :class:`TowerPlan`: N=``skip`` on ``tower`` of ``family``.

    ``final_ln`` defaults to the family's convention (a host may report its own); ``missing`` is
    :func:`missing_layers` of the host's copy: an N its copy cannot reach becomes the deepest it can.
    ``native`` is true when the layer and the layer norm are what the family uses without clip skip.
    """
    layers = TOWER_LAYERS[tower]
    skip = min(max(int(skip), missing + 1), layers)
    ln = FINAL_LAYER_NORM[family] if final_ln is None else bool(final_ln)
    native = skip == NATIVE_SKIP[family][tower] and ln == FINAL_LAYER_NORM[family]
    return TowerPlan(tower, skip, layers, ln, native)


def plan(
    family: str, clip_skip: int | None, scope: str = "both", *, missing: Mapping[str, int] | None = None
) -> list[TowerPlan]:
    """The layer every CLIP tower of ``family`` uses for this clip skip (DESIGN semantics).

    ``missing``: per tower, the final blocks the host's copy lacks (see :func:`missing_layers`).
    """
    missing = missing or {}
    return [
        tower_plan(family, tower, tower_skip(family, tower, clip_skip, scope), missing=missing.get(tower, 0))
        for tower in clip_towers(family)
    ]


def describe(family: str, plans: list[TowerPlan], *, note: str | None = None) -> str:
    """One line for the UI, e.g. ``SDXL · CLIP-L layer 11/12 · CLIP-G layer 31/32 · native``."""
    label = FAMILY_LABELS.get(family, family)
    if family in POOLED_ONLY_FAMILIES:
        return f"{label} uses only CLIP-L's pooled output: clip skip has no effect"
    if not clip_towers(family):
        return f"{label} uses only T5: clip skip has no effect"
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


def run_to_layer(
    blocks: Sequence[torch.nn.Module], skip: int, forward: Callable[[], T], *, stop: bool, missing: int = 0
) -> tuple[torch.Tensor, T | None]:
    """The one truncated CLIP forward: run ``forward()`` and return the output of the block that
    ``hidden_states[-skip]`` comes from, with what ``forward`` returned (None when it was stopped).

    ``blocks`` are the tower's blocks as the host holds them (HF ``encoder.layers``, OpenCLIP
    ``transformer.resblocks``); ``missing`` the final blocks that copy lacks. With ``stop`` the blocks
    after the chosen one never run — unless the caller needs the same forward's pooled vector. Call
    the tower itself inside ``forward`` (not its submodules), so the host's hooks still fire.
    """
    index = block_for_skip(len(blocks), skip, layer_offset=missing)
    result = None
    with LayerTap(blocks[index], stop=stop) as tap:
        result = forward()
    if tap.output is None:
        raise RuntimeError(f"layer {index + 1 + missing} of the text encoder never ran")
    return tap.output, result
