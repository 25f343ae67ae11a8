"""What every host adapter offers the UI/API layer, and the behaviour they share.

An adapter finds the encoder slots of the live model, makes them hold what a :class:`Selection`
asks for (through the shared :class:`SwapEngine`), and patches the host's encode step so clip
skip, precision and Long-CLIP chunks take effect while a generation runs (``begin``/``end``).
With an Auto selection and Built-in slots nothing of the host runs differently.

The toolkit every adapter builds on: :meth:`HostAdapter.plans` (the layers the panel shows and the
encode uses: one plan), ``core.clip_skip.run_to_layer`` (the truncated forward),
``core.compute.autocast_off`` (computing in a slot's dtype), :func:`tower_positions`, :func:`probe`,
and :meth:`HostAdapter.install` over the adapter's :meth:`~HostAdapter.patch_targets`.
"""

from __future__ import annotations

import functools
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from te_switch.core import clip_skip
from te_switch.core.clip_skip import TowerPlan
from te_switch.core.detect import TowerInfo, inspect_path
from te_switch.core.selection import SLOT_LABELS, SLOTS_BY_FAMILY, Selection
from te_switch.hosts import sdwebui
from te_switch.hosts.engine import BuiltinSource, EncoderSource, LiveSlot, SlotRequest, SwapEngine
from te_switch.hosts.slots import text_transformer

# resolve(slot_name, encoder_label) -> the file to load; raises TESwitchError when it is missing
Resolver = Callable[[str, str], EncoderSource]

ENGINE = SwapEngine()  # one per process: every adapter shares the snapshots it holds


class HostAdapter(ABC):
    name = "base"

    def __init__(self, engine: SwapEngine | None = None) -> None:
        self.engine = engine or ENGINE
        self.active: Selection | None = None  # the selection of the generation running now
        self.requested: Selection | None = None  # the last selection applied: re-applied after reloads
        self.resolver: Resolver | None = None
        self._patched: list[tuple[Any, str]] = []  # what install() patched, for uninstall()

    # -- the live model -----------------------------------------------------------------------

    @abstractmethod
    def live_model(self) -> Any | None:
        """The loaded model without triggering a load (None before the first one)."""

    @abstractmethod
    def family(self, model: Any) -> str | None:
        """'sd1' | 'sd2' | 'sdxl' | 'sdxl-refiner' | 'sd3' | 'flux', from the live objects."""

    @abstractmethod
    def slots(self, model: Any) -> dict[str, LiveSlot]:
        """The model's encoder slots that exist now (e.g. SD3 without T5 has no 't5xxl')."""

    def auto_plans(self, model: Any, family: str) -> list[TowerPlan]:
        """The layers the host itself uses (override where the host departs from DESIGN natives)."""
        return clip_skip.plan(family, None, missing=self.missing_layers(model))

    def missing_layers(self, model: Any) -> dict[str, int]:
        """Per CLIP tower, the final blocks the host's copy lacks (``core.clip_skip.missing_layers``)."""
        return {}

    def layer_note(self, model: Any, family: str, selection: Selection) -> str | None:
        """Extra words for the effective-layer line (host limits, e.g. a missing layer)."""
        return None

    # -- what the UI shows ---------------------------------------------------------------------

    def plans(self, selection: Selection, model: Any = None) -> list[TowerPlan]:
        """The layer each CLIP tower uses for ``selection``: what the panel shows, what the encode runs."""
        model = self.live_model() if model is None else model
        family = self.family(model) if model is not None else None
        if family is None:
            return []
        if selection.clip_skip is None:
            return self.auto_plans(model, family)
        return clip_skip.plan(family, selection.clip_skip, selection.scope, missing=self.missing_layers(model))

    def active_plan(self, tower: str, model: Any = None) -> TowerPlan | None:
        """The plan of ``tower`` for the generation running now; None: the host's own layer (Auto)."""
        selection = self.active
        if selection is None or selection.clip_skip is None:
            return None
        return next((p for p in self.plans(selection, model) if p.tower == tower), None)

    def describe(self, selection: Selection) -> str:
        model = self.live_model()
        family = self.family(model) if model is not None else None
        if family is None:
            return "No model loaded yet: the layers show after the first generation"
        note = self.layer_note(model, family, selection)
        return clip_skip.describe(family, self.plans(selection, model), note=note)

    def slot_names(self) -> tuple[str, ...]:
        model = self.live_model()
        family = self.family(model) if model is not None else None
        return SLOTS_BY_FAMILY.get(family or "", ())

    # -- making the model match -----------------------------------------------------------------

    def requests(self, model: Any, selection: Selection, resolve: Resolver) -> list[SlotRequest]:
        """One request per live slot; CLIP-G follows a Long-CLIP-L's 248 positions (stretched)."""
        slots = self.slots(model)
        sources: dict[str, EncoderSource | None] = {}
        for name in slots:
            choice = selection.slot(name)
            sources[name] = resolve(name, choice.encoder) if choice.encoder else None
        long_l = sources.get("clip_l") is not None and (sources["clip_l"].tower.positions or 77) > 77  # type: ignore[union-attr]
        out = []
        for name, slot in slots.items():
            positions = 248 if (name == "clip_g" and long_l and "clip_l" in slots) else None
            builtin = functools.partial(self.builtin_source, model, name)
            out.append(SlotRequest(slot, selection.slot(name), sources[name], positions, builtin))
        return out

    def builtin_source(self, model: Any, name: str) -> BuiltinSource | None:
        """The file slot ``name``'s own weights came from and how the host converted it (None: unknown,
        so the engine keeps a CPU copy before the first swap)."""
        return None

    def apply(self, selection: Selection, resolve: Resolver | None = None) -> list[str]:
        """Swap/restore every slot to match ``selection`` (atomic across slots)."""
        resolve = resolve or self.resolver
        model = self.live_model()
        if model is None or self.family(model) is None:
            return []
        if resolve is None:
            raise RuntimeError("no encoder resolver configured")
        changed = self.commit(model, self.requests(model, selection, resolve))
        self.requested = selection
        if changed:
            self.after_swap(model)
        return changed

    def commit(self, model: Any, requests: list[SlotRequest]) -> list[str]:
        """Run the swap engine (hosts override to get the model ready for in-place loads first)."""
        return self.engine.apply(requests)

    @abstractmethod
    def after_swap(self, model: Any) -> None:
        """Host bookkeeping after slots changed (chunk lengths, cached conds...)."""

    def reapply(self) -> list[str]:
        """After the host reloaded weights: make the new weights match the last request again."""
        if self.requested is None or self.resolver is None:
            return []
        return self.apply(self.requested)

    # -- the generation -------------------------------------------------------------------------

    def begin(self, selection: Selection) -> None:
        self.active = selection

    def end(self) -> None:
        self.active = None

    def cond_signature(self) -> tuple:
        """Everything besides the host's own cache key that changes the conds."""
        sel = self.active
        return (self.engine.epoch, sel.signature() if sel is not None else None)

    def slot_dtype(self, name: str, module: torch.nn.Module) -> torch.dtype | None:
        """The dtype the slot over ``module`` was asked to compute in (None: the host's)."""
        return self.engine.compute_dtype(probe(name, module))

    def is_swapped(self, name: str, module: torch.nn.Module) -> bool:
        """Whether the slot over ``module`` holds anything but the checkpoint's own encoder."""
        return self.engine.applied(probe(name, module)) is not None

    # -- patches --------------------------------------------------------------------------------

    @property
    def patch_key(self) -> str:
        """The key this host's patches carry in the WebUI's ``modules.patches`` registry."""
        return f"te_switch.hosts.{self.name}"

    def patch_targets(self) -> list[sdwebui.PatchTarget]:
        """The class-level patches this host needs: ``(owner, attribute, make)``, where
        ``make(original)`` returns the replacement (hosts that patch nothing keep the empty list)."""
        return []

    def install(self) -> None:
        """Install :meth:`patch_targets` (idempotent; a re-imported adapter replaces an earlier one's)."""
        if self._patched:
            return
        targets = self.patch_targets()
        if targets:
            self._patched = sdwebui.install_patches(self.patch_key, targets)

    def uninstall(self) -> None:
        """Undo every patch :meth:`install` made (script unload)."""
        if not self._patched:
            return
        sdwebui.undo_patches(self.patch_key, self._patched)
        self._patched = []

    # -- reporting ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        model = self.live_model()
        family = self.family(model) if model is not None else None
        slots = {}
        if family is not None:
            for name, slot in self.slots(model).items():
                applied = self.engine.applied(slot)
                src = applied.source if applied else None
                slots[name] = {
                    "label": SLOT_LABELS[name],
                    "encoder": src.label if src else "Built-in",
                    "hash": src.short_hash if src else None,
                    "kind": src.tower.kind if src else None,
                    "precision": applied.precision if applied else "auto",
                    "positions": slot.positions(),
                }
        return {"host": self.name, "family": family, "slots": slots, "epoch": self.engine.epoch}


# ---------------------------------------------------------------------------------------------
# reading live towers (shared by every adapter)


def probe(name: str, module: torch.nn.Module) -> LiveSlot:
    """A slot that only identifies ``module`` for engine queries (no key scan, nothing expanded)."""
    return LiveSlot(name, module, dict)


def tower_positions(tower: torch.nn.Module) -> int:
    """Position count of a CLIP text tower (OpenCLIP ``positional_embedding`` or a HF/WebUI CLIP),
    from its table's shape: no state dict, no compressed weight expanded."""
    table = getattr(tower, "positional_embedding", None)
    if isinstance(table, torch.Tensor):
        return int(table.shape[0])
    return int(text_transformer(tower).embeddings.position_embedding.weight.shape[0])


def tower_in(path: str | None, slot: str, *, width: int | None = None) -> TowerInfo | None:
    """The tower of ``path`` that a host put into ``slot``: the one a checkpoint names for it, else the only
    (or the ``width``-wide) tower of the slot's family. None when the file has none or cannot be read."""
    if not path or not os.path.isfile(path):
        return None
    towers = [t for t in inspect_path(path) if t.family is not None and t.error is None]
    named = [t for t in towers if t.tower == slot]
    family = "t5" if slot == "t5xxl" else "clip"
    same = [t for t in towers if t.family == family and (width is None or t.width in (None, width))]
    found = named or same
    return found[0] if len(found) == 1 or named else None
