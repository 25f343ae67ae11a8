"""The swap engine every host adapter shares: atomic, in place, restorable.

A host adapter describes each encoder slot of its live model as a :class:`LiveSlot` (the module
to load into, how canonical names map to its own, how to resize its position table). The engine
then does the rest the same way everywhere:

1. **prepare** — read and convert the file, map it to the slot's names, check every key, shape
   and value against the live module. Nothing in the model is touched; any problem is a
   one-line :class:`IncompatibleError`/:class:`BadFileError`.
2. **commit** — snapshot the slot's own tensors to CPU (first swap only), resize positions if a
   Long-CLIP needs it, set the precision, ``load_state_dict`` in place (so host hooks, LoRA
   bookkeeping and offloading keep working), or keep compressed weights packed.
3. **restore** — put the snapshot back bit for bit and free it.

Several slots go through prepare together before any commit, so a bad second file leaves the first
slot untouched too.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from te_switch.core.convert import load_tower
from te_switch.core.detect import TowerInfo
from te_switch.core.errors import BadFileError, IncompatibleError, TESwitchError
from te_switch.core.library import file_identity
from te_switch.core.longclip import stretch_positions
from te_switch.core.readers import open_file
from te_switch.core.selection import KINDS_BY_SLOT, SLOT_LABELS, SlotChoice
from te_switch.core.tensors import PRECISIONS, PackedTensor, Weight, all_finite, dense, is_compressed

Resize = Callable[[int], None]


@dataclass
class LiveSlot:
    """One encoder slot of the live model, as its host adapter sees it."""

    name: str  # 'clip_l' | 'clip_g' | 'clip_h' | 't5xxl'
    module: torch.nn.Module  # root of the host-layout names
    to_host: Callable[[Mapping[str, Weight]], dict[str, Weight]]  # canonical -> host names (drops what the host lacks)
    kinds: tuple[str, ...] = ()  # accepted kinds; default: KINDS_BY_SLOT[name]
    optional: frozenset[str] = frozenset()  # live keys a file may omit: the checkpoint's own stay
    derived: frozenset[str] = frozenset()  # live keys the engine never takes from files (position_ids...)
    position_keys: frozenset[str] = frozenset()  # host keys whose first dim is the position count
    resize: Resize | None = None  # change the position count (77 <-> 248); None: fixed
    label: str = ""
    # 'linear' / 'embedding' for layers that can keep a compressed weight and expand it per forward;
    # None = the default (torch Linear/Embedding). Hosts with their own layer classes say which qualify.
    pack_kind: Callable[[torch.nn.Module], str | None] | None = None
    # live keys that stay fp32 when fp16 is asked for (T5's feed-forward output overflows fp16)
    keep_fp32: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not self.kinds:
            self.kinds = KINDS_BY_SLOT[self.name]
        if not self.label:
            self.label = SLOT_LABELS.get(self.name, self.name)

    def live_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors ``state_dict()`` would name, without running its hooks: a compressed
        (lowbit) layer reports its placeholder instead of expanding its weight."""
        out: dict[str, torch.Tensor] = {}
        for name, module in self.module.named_modules(remove_duplicate=False):
            prefix = f"{name}." if name else ""
            for key, param in module._parameters.items():
                if param is not None:
                    out[prefix + key] = param
            for key, buf in module._buffers.items():
                if buf is not None and key not in module._non_persistent_buffers_set:
                    out[prefix + key] = buf
        return out

    def positions(self) -> int | None:
        for key in self.position_keys:
            owner = _owner(self.module, key)
            tensor = getattr(owner, key.rsplit(".", 1)[-1], None) if owner is not None else None
            if isinstance(tensor, torch.Tensor):
                return int(tensor.shape[0])
        return None


@dataclass(frozen=True)
class EncoderSource:
    """A resolved encoder choice: which file, which tower of it, and how users name it."""

    path: str
    tower: TowerInfo
    label: str
    short_hash: str = ""


@dataclass(frozen=True)
class SlotRequest:
    """What one slot should hold: an encoder (None = Built-in), a precision, optionally a position count.

    ``positions`` asks for a stretched position table (Long-CLIP's knowledge-preserving stretch of
    a 77-row table to 248) — how SDXL's CLIP-G follows a Long-CLIP-L.
    """

    slot: LiveSlot
    choice: SlotChoice
    source: EncoderSource | None = None
    positions: int | None = None


@dataclass
class Applied:
    """What a slot holds now (absent from the engine = Built-in)."""

    source: EncoderSource | None
    precision: str
    identity: tuple
    positions: int | None
    # what was asked (positions: the stretch request), to return to it when a later swap fails;
    # never the slot itself: the engine's memory is weakly keyed by the slot's module
    choice: SlotChoice | None = None
    wanted_positions: int | None = None


@dataclass
class _Memory:
    original: dict[str, torch.Tensor] = field(default_factory=dict)  # CPU copies of the checkpoint's own tensors
    original_positions: int | None = None
    packed: list[torch.nn.Module] = field(default_factory=list)  # modules holding a lowbit-attached weight
    applied: Applied | None = None


@dataclass
class Prepared:
    request: SlotRequest
    tensors: dict[str, Weight]
    identity: tuple

    @property
    def slot(self) -> LiveSlot:
        return self.request.slot


def _identity(request: SlotRequest) -> tuple:
    source, extra = request.source, (request.choice.precision, request.positions)
    if source is None:
        return ("builtin", *extra)
    size, mtime = file_identity(source.path)  # a sharded index counts its shards
    return (os.path.realpath(source.path), size, mtime, source.tower.prefix, *extra)


class SwapEngine:
    """Makes live slots hold what a Selection asks for. Thread-safe; one instance per process."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._memory: weakref.WeakKeyDictionary[torch.nn.Module, _Memory] = weakref.WeakKeyDictionary()
        self.epoch = 0  # bumped on every change: part of cond-cache keys

    # -- queries ------------------------------------------------------------------------------

    def applied(self, slot: LiveSlot) -> Applied | None:
        mem = self._memory.get(slot.module)
        return mem.applied if mem else None

    def would_change(self, request: SlotRequest) -> bool:
        """Whether applying ``request`` would touch the slot (hosts skip costly preparations if not)."""
        applied = self.applied(request.slot)
        wants_builtin = request.source is None and request.choice.precision == "auto"
        if wants_builtin and (request.positions is None or request.positions == self._original_positions(request.slot)):
            return applied is not None
        return applied is None or applied.identity != _identity(request)

    def compute_dtype(self, slot: LiveSlot) -> torch.dtype | None:
        """The dtype the user asked this slot to compute in (None: the host's choice)."""
        applied = self.applied(slot)
        return PRECISIONS[applied.precision] if applied else None

    # -- prepare (reads, never touches the model) ---------------------------------------------

    def prepare(self, request: SlotRequest) -> Prepared:
        slot, source = request.slot, request.source
        identity = _identity(request)
        if source is None:
            return Prepared(request, {}, identity)
        tower = source.tower
        if tower.kind not in slot.kinds:
            accepted = ", ".join(slot.kinds)
            raise IncompatibleError(
                f"{source.label}: a {tower.kind} file cannot go into the {slot.label} slot ({accepted})"
            )
        applied = self.applied(slot)
        if applied is not None and applied.identity == identity:
            return Prepared(request, {}, identity)  # already there
        with open_file(source.path) as src:
            canonical = load_tower(src, tower)
            host = slot.to_host(canonical)
            self._validate(slot, source, host)
        return Prepared(request, host, identity)

    def _positions_of(self, slot: LiveSlot, host: Mapping[str, Weight]) -> int | None:
        for key in slot.position_keys:
            if key in host:
                return int(host[key].shape[0])
        return None

    def _validate(self, slot: LiveSlot, source: EncoderSource, host: Mapping[str, Weight]) -> None:
        name = source.label
        live = slot.live_tensors()
        unexpected = sorted(set(host) - set(live))
        if unexpected:
            raise IncompatibleError(f"{name}: {unexpected[0]} has no place in the {slot.label} slot")
        derived = set(slot.derived) & set(host)
        if derived:
            raise IncompatibleError(f"{name}: {sorted(derived)[0]} is derived, not loaded")
        missing = sorted(set(live) - set(host) - slot.optional - slot.derived)
        if missing:
            raise IncompatibleError(f"{name}: lacks {missing[0]} that the {slot.label} slot needs")
        new_positions = self._positions_of(slot, host)
        for key, value in host.items():
            want = tuple(live[key].shape)
            got = tuple(value.shape)
            if key in slot.position_keys and slot.resize is not None and got[1:] == want[1:]:
                continue  # position count changes are what resize() is for
            if got != want:
                raise IncompatibleError(f"{name}: {key} is {list(got)} but the {slot.label} slot needs {list(want)}")
        if new_positions is not None and slot.resize is None and new_positions != slot.positions():
            raise IncompatibleError(f"{name}: {new_positions} positions; this host's {slot.label} is fixed")
        for key, value in host.items():
            if isinstance(value, torch.Tensor) and not value.is_floating_point():
                continue
            if not all_finite(dense(value)):
                raise BadFileError(source.path, f"tensor {key} holds NaN or Inf values")

    # -- commit / restore ---------------------------------------------------------------------

    def apply(self, requests: Iterable[SlotRequest]) -> list[str]:
        """Prepare every request, then commit them all. Returns the names of slots that changed.

        If a commit fails, every slot of this call goes back to what it held before the call.
        """
        with self._lock:
            prepared = [self.prepare(r) for r in requests]
            before = [(p.slot, self.applied(p.slot)) for p in prepared]
            try:
                changed = [p.slot.name for p in prepared if self._commit(p)]
            except Exception:
                for slot, previous in before:
                    self._return_to(slot, previous)
                self.epoch += 1
                raise
            if changed:
                self.epoch += 1
            return changed

    def _return_to(self, slot: LiveSlot, previous: Applied | None) -> None:
        """Best effort: put ``slot`` back to ``previous`` (Built-in when that cannot be re-read)."""
        current = self.applied(slot)
        if previous is None or previous.choice is None:
            if current is not None:
                self.restore(slot)
            return
        if current is not None and current.identity == previous.identity:
            return
        try:
            self._commit(self.prepare(SlotRequest(slot, previous.choice, previous.source, previous.wanted_positions)))
        except Exception:
            self.restore(slot)

    def _commit(self, p: Prepared) -> bool:
        request, slot = p.request, p.slot
        mem = self._memory.get(slot.module)
        wants_builtin = request.source is None and request.choice.precision == "auto"
        if wants_builtin and (request.positions is None or request.positions == self._original_positions(slot)):
            return self.restore(slot)
        if mem is not None and mem.applied is not None and mem.applied.identity == p.identity:
            return False
        if mem is None:
            mem = self._memory.setdefault(slot.module, _Memory())
        try:
            self._snapshot(slot, mem)
            self._unpack(mem)
            if request.source is None:
                # the checkpoint's own weights, at another precision or position count
                tensors: dict[str, Weight] = {k: v for k, v in mem.original.items() if k not in slot.derived}
            else:
                tensors = p.tensors
                self._restore_untouched(slot, mem, tensors)
            positions = self._positions_of(slot, tensors) or mem.original_positions
            if request.positions is not None and positions != request.positions:
                tensors = self._stretched(slot, tensors, request.positions)
                positions = request.positions
            if positions is not None and slot.resize is not None and positions != slot.positions():
                slot.resize(positions)
            self._load(slot, mem, tensors, PRECISIONS[request.choice.precision])
        except Exception as e:
            self._rollback(slot, mem)
            raise TESwitchError(f"{slot.label}: swap failed and was undone ({type(e).__name__}: {e})") from e
        mem.applied = Applied(
            request.source, request.choice.precision, p.identity, slot.positions(), request.choice, request.positions
        )
        return True

    def _original_positions(self, slot: LiveSlot) -> int | None:
        mem = self._memory.get(slot.module)
        return mem.original_positions if mem and mem.original else slot.positions()

    def _stretched(self, slot: LiveSlot, tensors: dict[str, Weight], positions: int) -> dict[str, Weight]:
        out = dict(tensors)
        for key in slot.position_keys:
            if key in out:
                table = dense(out[key])
                if (table.shape[0], positions) != (77, 248):
                    raise IncompatibleError(f"{slot.label}: cannot stretch {table.shape[0]} positions to {positions}")
                out[key] = stretch_positions(table)
        return out

    def _snapshot(self, slot: LiveSlot, mem: _Memory) -> None:
        """CPU copies of every live tensor this or any later swap may replace (taken once)."""
        if mem.original:
            return
        mem.original_positions = slot.positions()
        for key, tensor in slot.live_tensors().items():
            mem.original[key] = tensor.detach().to("cpu", copy=True)

    def _restore_untouched(self, slot: LiveSlot, mem: _Memory, tensors: dict[str, Weight]) -> None:
        """Optional keys a file omits keep the checkpoint's values (not an earlier file's)."""
        for key in slot.optional:
            if key not in tensors and key in mem.original:
                tensors[key] = mem.original[key]

    def _load(self, slot: LiveSlot, mem: _Memory, tensors: Mapping[str, Weight], dtype: torch.dtype | None) -> None:
        live = slot.live_tensors()
        keep_packed = dtype is None and any(is_compressed(v) for v in tensors.values())
        if keep_packed:
            from te_switch.core import lowbit
        dense_part: dict[str, torch.Tensor] = {}
        for key, value in tensors.items():
            owner = _owner(slot.module, key) if keep_packed else None
            kind = (slot.pack_kind or default_pack_kind)(owner) if owner is not None else None
            if kind is not None and is_compressed(value) and key.endswith(".weight"):
                # the snapshot already holds the original on CPU: park it there instead of the GPU
                lowbit.attach(owner, value, kind=kind, offload="cpu")
                mem.packed.append(owner)
            else:
                dense_part[key] = dense(value) if isinstance(value, PackedTensor) else value  # type: ignore[assignment]
        with torch.no_grad():
            if dtype is not None:
                for key, tensor in live.items():
                    want = torch.float32 if dtype == torch.float16 and key in slot.keep_fp32 else dtype
                    if tensor.is_floating_point() and tensor.dtype != want and key not in slot.derived:
                        tensor.data = tensor.data.to(want)
            elif mem.original:
                # back to the checkpoint's dtypes (an earlier swap may have changed them)
                for key, tensor in live.items():
                    orig = mem.original.get(key)
                    if orig is not None and tensor.dtype != orig.dtype:
                        tensor.data = tensor.data.to(orig.dtype)
            result = slot.module.load_state_dict(dense_part, strict=False)
        if result.unexpected_keys:
            raise RuntimeError(f"the module did not take {result.unexpected_keys[0]}")

    def _unpack(self, mem: _Memory) -> None:
        if not mem.packed:
            return
        from te_switch.core import lowbit

        for module in mem.packed:
            lowbit.detach(module)
        mem.packed.clear()

    def _rollback(self, slot: LiveSlot, mem: _Memory) -> None:
        try:
            if mem.original:
                self._put_back(slot, mem)
        finally:
            self._memory.pop(slot.module, None)

    def _put_back(self, slot: LiveSlot, mem: _Memory) -> None:
        self._unpack(mem)
        if (
            mem.original_positions is not None
            and slot.resize is not None
            and slot.positions() != mem.original_positions
        ):
            slot.resize(mem.original_positions)
        live = slot.live_tensors()
        with torch.no_grad():
            for key, orig in mem.original.items():
                tensor = live.get(key)
                if tensor is not None and tensor.dtype != orig.dtype:
                    tensor.data = tensor.data.to(orig.dtype)
            slot.module.load_state_dict(mem.original, strict=False)

    def restore(self, slot: LiveSlot) -> bool:
        """Back to the checkpoint's own weights, bit for bit; frees the snapshot."""
        with self._lock:
            mem = self._memory.get(slot.module)
            if mem is None or mem.applied is None:
                return False
            self._put_back(slot, mem)
            del self._memory[slot.module]
            self.epoch += 1
            return True


def default_pack_kind(module: torch.nn.Module) -> str | None:
    """torch Linear/Embedding layers (and subclasses) can expand a compressed weight per forward."""
    if isinstance(module, torch.nn.Embedding):
        return "embedding" if module.max_norm is None else None
    return "linear" if isinstance(module, torch.nn.Linear) else None


def _owner(root: torch.nn.Module, key: str) -> torch.nn.Module | None:
    path = key.rsplit(".", 1)[0] if "." in key else ""
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        return None
