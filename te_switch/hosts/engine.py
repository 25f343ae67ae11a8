"""The swap engine every host adapter shares: atomic, in place, restorable without a second copy.

A host adapter describes each encoder slot of its live model as a :class:`LiveSlot` (the module
to load into, how canonical names map to its own, how to resize its position table) and says where
the slot's own weights came from (:class:`BuiltinSource`: the checkpoint, a separate text-encoder
file, a pipeline folder). The engine then does the rest the same way everywhere:

1. **prepare** — map the file to the slot's names and check every key, shape and value against the
   live module, reading the file once (a read that also gives its sha256, ``core.digest``) and keeping
   none of its values. Nothing in
   the model is touched; any problem is a one-line :class:`IncompatibleError`/:class:`BadFileError`.
2. **commit** — before the first swap of a slot, remember how to get its own tensors back (see
   below); then resize positions if a Long-CLIP needs it, and stream the file into the slot tensor by
   tensor: in place through the module's own ``load_state_dict`` (so host hooks, LoRA bookkeeping and
   offloading keep working), or, for a tensor that is a view of a memory-mapped file, by pointing the
   parameter at the new values (writing would copy the page cache into anonymous memory). Compressed
   weights can stay packed (``core.lowbit``).
3. **restore** — Built-in: re-read the host's own file through mmap, convert it as the host did, and
   prove the result against a fingerprint taken before the first swap.

What the engine remembers of a slot's own tensors, per tensor, taken before its first swap:

* a sampled fingerprint (``core.fingerprint``), its dtype and shape — always;
* for a tensor that was a view of a mapped file (Forge's fp8 T5, transformers' weights at the file's
  dtype): that view itself, which costs no memory of its own; restore points the parameter back at it;
* otherwise nothing, when the :class:`BuiltinSource` gives back the same fingerprint (checked then,
  from a few pages of the file), else a copy on CPU in the host's own dtype (a model merged in memory,
  a LoRA baked in, a file changed since it was loaded, a host that does not say where its weights came
  from) — said once on the console.

Several slots go through prepare together before any commit, so a bad second file leaves the first
slot untouched too; a failure during a commit puts every slot back from the same sources.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch

from te_switch.core import digest
from te_switch.core.convert import lazy_load, load_tower
from te_switch.core.dequant import HALF_FIELDS, blocks_finite
from te_switch.core.detect import TowerInfo
from te_switch.core.errors import BadFileError, IncompatibleError, TESwitchError, one_line
from te_switch.core.fingerprint import fingerprint, is_mapped, mapped_ranges, prefault
from te_switch.core.gguf_reader import GGUFSource
from te_switch.core.layouts import layout_of
from te_switch.core.library import file_identity
from te_switch.core.longclip import stretch_positions
from te_switch.core.readers import SafetensorsSource, TensorSource, open_file
from te_switch.core.selection import KINDS_BY_SLOT, SLOT_LABELS, SlotChoice
from te_switch.core.tensors import (
    PRECISIONS,
    SAFETENSORS_DTYPES,
    LazyWeight,
    PackedTensor,
    Value,
    Weight,
    all_finite,
    dense,
    dtype_name,
    is_compressed,
    is_float,
    realize,
)

Resize = Callable[[int], None]
QUIET_BYTES = 4096  # CPU copies up to this size are kept without a console line


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
    # at Auto: live keys whose dense incoming values the host would store in another dtype than the slot
    # holds now (Forge keeps an fp8 file's T5 Linear weights as fp8, a dense file's as fp16)
    store_dtypes: Mapping[str, torch.dtype] = field(default_factory=dict)
    # live Linear weights only the host's own layer class can hold (Forge's GGUF/NF4 Linear weights): never
    # written; every swap keeps their Parameter object aside and attaches the incoming weight packed
    # (``core.lowbit``, dense values in their ``store_dtypes`` or the asked precision); Built-in puts the
    # host's own object back
    held: frozenset[str] = frozenset()

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


@dataclass(eq=False)
class EncoderSource:
    """An encoder choice, resolved: which file, which tower of it, how users name it, the file's
    (size, mtime) when it was resolved, and what is known of it so far.

    The WebUI resolves each chosen encoder once per generation (``webui.sources``); the same object is
    written into the infotext, handed to the engine and, for an API request, checked before the
    generation starts. ``short_hash`` is None until the file is hashed (whoever hashes it sets it
    here); the values check is the per-file-state one the engine and the API share.
    """

    path: str
    tower: TowerInfo
    label: str
    short_hash: str | None = None
    size: int | None = None
    mtime: float | None = None

    @property
    def kind(self) -> str | None:
        return self.tower.kind

    @property
    def layout(self) -> str | None:
        return self.tower.layout

    def is_current(self) -> bool:
        """Whether the file still has the size and mtime it had when this source was resolved."""
        try:
            return self.size is not None and file_identity(self.path) == (self.size, self.mtime)
        except OSError:
            return False

    def checked(self) -> tuple[bool, str | None]:
        """(known, reason) of the values check for this tower as the file is now (reason None: all finite)."""
        return checked_values(self.path, self.tower)


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
    # where the slot's own weights came from (asked once, before the slot's first swap)
    builtin: Callable[[], BuiltinSource | None] | None = None


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


@dataclass(frozen=True)
class BuiltinSource:
    """Where a slot's own weights came from, and how the host turned that file into them.

    The engine reads ``tower`` of ``path`` as stored, under canonical names (or, ``stored_names``, under
    the file's own names less the tower's prefix: a host that loads the checkpoint's keys into its modules
    as they are, like A1111), maps it with ``to_host`` (default: the slot's own mapping) and casts every
    tensor to the dtype the slot holds, through ``cast_via`` first when the host did that (A1111 casts a
    checkpoint to fp16 before its fp8 storage option casts to fp8).
    """

    path: str
    tower: TowerInfo
    cast_via: torch.dtype | None = None
    to_host: Callable[[Mapping[str, Weight]], dict[str, Weight]] | None = None
    stored_names: bool = False


@dataclass
class _Original:
    """One of the slot's own tensors, as it was before the first swap."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    print: bytes  # core.fingerprint of the tensor
    view: torch.Tensor | None = None  # the host's own view of a mapped file (no memory of its own)
    copy: torch.Tensor | None = None  # CPU copy in the host's dtype: the file cannot give it back
    rebuilt: bool = False  # position ids: arange(positions), what resize() writes
    held: bool = False  # the host's own Parameter, kept aside by core.lowbit while swapped

    @property
    def from_file(self) -> bool:
        return self.view is None and self.copy is None and not self.rebuilt and not self.held


@dataclass
class _Memory:
    originals: dict[str, _Original] = field(default_factory=dict)  # one entry per distinct live tensor
    origin: BuiltinSource | None = None
    original_positions: int | None = None
    packed: list[torch.nn.Module] = field(default_factory=list)  # modules holding a lowbit-attached weight
    applied: Applied | None = None


@dataclass
class Prepared:
    request: SlotRequest
    # host key -> a LazyWeight: reads its tensor(s) from ``reader`` and converts them when loaded, so
    # the check and the commit each hold one tensor (a fused in_proj: one per layer) at a time
    tensors: dict[str, Value]
    identity: tuple
    reader: TensorSource | None = None  # open from prepare until the commit is done
    state: tuple | None = None  # the file's inode/size/mtime when it was checked

    @property
    def slot(self) -> LiveSlot:
        return self.request.slot

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()


def _identity(request: SlotRequest) -> tuple:
    source, extra = request.source, (request.choice.precision, request.positions)
    if source is None:
        return ("builtin", *extra)
    size, mtime = file_identity(source.path)  # a sharded index counts its shards
    return (os.path.realpath(source.path), size, mtime, source.tower.prefix, *extra)


def _file_state(path: str) -> tuple:
    """What says a file is the one it was: its inode, size and mtime (shards included)."""
    st = os.stat(path)
    return (os.path.realpath(path), st.st_dev, st.st_ino, *file_identity(path))


def _distinct(live: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One key per tensor: tied tables (T5's ``shared`` = ``encoder.embed_tokens``) are handled once."""
    seen: set[int] = set()
    out = {}
    for key, tensor in live.items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[key] = tensor
    return out


# values already read and found finite, per (file state, tower): the API's check and a swap share it
_CHECKED: dict[tuple, str | None] = {}
_checked_lock = threading.Lock()


def checked_values(path: str, tower: TowerInfo) -> tuple[bool, str | None]:
    """(known, reason) from an earlier read of ``tower`` of ``path`` as it is now: reason None = all finite."""
    try:
        key = (*_file_state(path), tower.prefix)
    except OSError:
        return False, None
    with _checked_lock:
        return key in _CHECKED, _CHECKED.get(key)


def remember_check(path: str, tower: TowerInfo, reason: str | None) -> None:
    try:
        key = (*_file_state(path), tower.prefix)
    except OSError:
        return
    with _checked_lock:
        _CHECKED[key] = reason


def check_values_once(src: TensorSource, tower: TowerInfo, values: Mapping[str, Value]) -> str | None:
    """Why ``tower`` of ``src`` cannot be loaded for its values (NaN/Inf), or None; read once per file state.

    A safetensors file is read once, start to end: the tower's tensors are checked as the bytes pass
    and the file's sha256 (the infotext's short hash, ``core.digest``) is computed from the same read on
    a second thread. Other formats are checked through ``values`` (their reader's tensors) while the
    hash reads the same pages beside.
    """
    known, reason = checked_values(src.path, tower)
    if known:
        return reason
    if isinstance(src, SafetensorsSource):
        bad = _first_bad_stored(src, tower)
    else:
        digest.start(src.path)
        bad = _first_bad_blocks(src, tower) if isinstance(src, GGUFSource) else first_bad_value(values)
    reason = None if bad is None else f"tensor {bad} holds NaN or Inf values"
    remember_check(src.path, tower, reason)
    return reason


def _first_bad_stored(src: SafetensorsSource, tower: TowerInfo) -> str | None:
    """One read of the file: its sha256, and the first float tensor of ``tower`` holding NaN/Inf."""
    keys = layout_of(tower.layout, tower.family).keys(src.keys(), tower.prefix)
    floats = sorted((src.span(k), k) for k in keys if SAFETENSORS_DTYPES[src.info(k).dtype].is_floating_point)
    bad: list[str] = []

    def visit(i: int, piece: memoryview) -> None:
        key = floats[i][1]
        values = torch.frombuffer(piece, dtype=torch.uint8).view(SAFETENSORS_DTYPES[src.info(key).dtype])
        if not all_finite(values):
            bad.append(key[len(tower.prefix) :])
            raise digest.Stop

    try:
        digest.sha256_visiting(src.path, [span for span, _ in floats if span[1] > span[0]], visit)
    except digest.Stop:
        return bad[0]
    return None


def _first_bad_blocks(src: GGUFSource, tower: TowerInfo) -> str | None:
    """The first tensor of ``tower`` in a GGUF file that decodes to NaN/Inf, read 16 MB at a time: block
    formats by their scale fields (``dequant.blocks_finite``), float tensors by their values."""
    for key in layout_of(tower.layout, tower.family).keys(src.keys(), tower.prefix):
        qtype = src.info(key).dtype
        if qtype in SAFETENSORS_DTYPES:
            dtype = SAFETENSORS_DTYPES[qtype]
            ok = not dtype.is_floating_point or all(all_finite(piece.view(dtype)) for piece in src.pieces(key))
        elif qtype in HALF_FIELDS:
            ok = all(blocks_finite(qtype, piece) for piece in src.pieces(key))
        else:  # a block layout without known scale fields: expanded a slice of rows at a time
            ok = first_bad_value({key: src.load(key)}) is None
        if not ok:
            return key[len(tower.prefix) :]
    return None


def first_bad_value(values: Mapping[str, Value]) -> str | None:
    """The first key whose values are not all finite; each distinct tensor is read once, none kept."""
    seen: set[int] = set()
    for key, lazy in values.items():
        if id(lazy) in seen or not is_float(lazy):
            continue
        seen.add(id(lazy))
        value = realize(lazy)
        if isinstance(value, PackedTensor):
            # GGUF blocks: their scale fields say it; other packed weights are expanded a slice at a time
            quick = blocks_finite(value.qtype, value.raw) if value.scale is None else None
            ok = quick if quick is not None else all(all_finite(dense(part)) for part in _row_chunks(value))
        else:
            prefault(value)
            ok = all_finite(value)
        if not ok:
            return key
    return None


ROW_CHUNK = 1024  # rows of a packed weight expanded at a time (T5-XXL's 4096-wide rows: 16 MB in fp32)


def _row_chunks(value: PackedTensor, rows: int | None = None) -> list[PackedTensor]:
    """A packed weight as slices of rows, so checking or writing it never expands it whole."""
    rows = rows or ROW_CHUNK
    if (
        value.raw.dim() < 2
        or value.raw.shape[0] != value.shape[0]
        or (value.scale is not None and value.scale.numel() > 1)
    ):
        return [value]
    return [
        PackedTensor(
            value.qtype,
            value.raw[i : i + rows],
            torch.Size((min(rows, value.shape[0] - i), *value.shape[1:])),
            value.scale,
        )
        for i in range(0, value.shape[0], rows)
    ]


class SwapEngine:
    """Makes live slots hold what a Selection asks for. Thread-safe; one instance per process."""

    def __init__(self, notify: Callable[[str], None] = print) -> None:
        self._lock = threading.RLock()
        self._memory: weakref.WeakKeyDictionary[torch.nn.Module, _Memory] = weakref.WeakKeyDictionary()
        self.epoch = 0  # bumped on every change: part of cond-cache keys
        self.notify = notify  # the console line for a snapshot fallback

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

    def kept_bytes(self, slot: LiveSlot) -> int:
        """Bytes of CPU copies the engine holds for ``slot`` (0 unless it had to fall back)."""
        mem = self._memory.get(slot.module)
        return sum(o.copy.nbytes for o in mem.originals.values() if o.copy is not None) if mem else 0

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
        src = open_file(source.path)
        try:
            state = _file_state(source.path)
            host = slot.to_host(load_tower(src, tower, lazy=True))
            self._validate(slot, source, host)
            reason = check_values_once(src, tower, host)
            if reason is not None:
                raise BadFileError(source.path, reason)
        except BaseException:
            src.close()
            raise
        return Prepared(request, host, identity, src, state)

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

    # -- commit / restore ---------------------------------------------------------------------

    def apply(self, requests: Iterable[SlotRequest]) -> list[str]:
        """Prepare every request, then commit them all. Returns the names of slots that changed.

        If a commit fails, every slot of this call goes back to what it held before the call.
        """
        with self._lock:
            prepared: list[Prepared] = []
            try:
                prepared.extend(self.prepare(r) for r in requests)  # those before a failure are closed too
                before = [(p.slot, self.applied(p.slot)) for p in prepared]
                try:
                    changed = [p.slot.name for p in prepared if self._commit(p)]
                except Exception:
                    for slot, previous in before:
                        self._return_to(slot, previous)
                    self.epoch += 1
                    raise
            finally:
                for p in prepared:
                    p.close()
            if changed:
                self.epoch += 1
            return changed

    def _return_to(self, slot: LiveSlot, previous: Applied | None) -> None:
        """Put ``slot`` back to ``previous``: Built-in from the host's file, a swap from its file."""
        current = self.applied(slot)
        if previous is None or previous.choice is None:
            if current is not None:
                self.restore(slot)
            return
        if current is not None and current.identity == previous.identity:
            return
        p = None
        try:
            p = self.prepare(SlotRequest(slot, previous.choice, previous.source, previous.wanted_positions))
            self._commit(p)
        except Exception:
            self.restore(slot)
        finally:
            if p is not None:
                p.close()

    def _commit(self, p: Prepared) -> bool:
        request, slot = p.request, p.slot
        mem = self._memory.get(slot.module)
        wants_builtin = request.source is None and request.choice.precision == "auto"
        if wants_builtin and (request.positions is None or request.positions == self._original_positions(slot)):
            return self.restore(slot)
        if mem is not None and mem.applied is not None and mem.applied.identity == p.identity:
            return False
        if request.source is not None and p.state is not None and _file_state(request.source.path) != p.state:
            raise BadFileError(request.source.path, "changed on disk while it was being swapped in")
        if mem is None:
            mem = self._remember(slot, request)
            self._memory[slot.module] = mem
        try:
            self._unpack(mem)
            origin = _OriginReader(mem, slot)
            if request.source is None:
                # the checkpoint's own weights, at another precision or position count
                tensors: dict[str, Value] = {k: origin.lazy(k) for k in mem.originals if k not in slot.derived}
            else:
                tensors = dict(p.tensors)
                for key in slot.optional:  # optional keys a file omits keep the checkpoint's values
                    if key not in tensors and key in mem.originals:
                        tensors[key] = origin.lazy(key)
            positions = self._positions_of(slot, tensors) or mem.original_positions
            if request.positions is not None and positions != request.positions:
                tensors = self._stretched(slot, tensors, request.positions)
                positions = request.positions
            if positions is not None and slot.resize is not None and positions != slot.positions():
                slot.resize(positions)
            fresh = p.reader is not None and p.reader.fresh_reads
            self._load(slot, mem, tensors, PRECISIONS[request.choice.precision], fresh=fresh)
            origin.close()
        except Exception as e:
            self._rollback(slot)
            raise TESwitchError(f"{slot.label}: swap failed and was undone ({type(e).__name__}: {e})") from e
        mem.applied = Applied(
            request.source, request.choice.precision, p.identity, slot.positions(), request.choice, request.positions
        )
        return True

    def _original_positions(self, slot: LiveSlot) -> int | None:
        mem = self._memory.get(slot.module)
        return mem.original_positions if mem and mem.originals else slot.positions()

    def _stretched(self, slot: LiveSlot, tensors: dict[str, Value], positions: int) -> dict[str, Value]:
        out = dict(tensors)
        for key in slot.position_keys:
            if key in out:
                table = dense(out[key])
                if (table.shape[0], positions) != (77, 248):
                    raise IncompatibleError(f"{slot.label}: cannot stretch {table.shape[0]} positions to {positions}")
                out[key] = stretch_positions(table)
        return out

    # -- the slot's own tensors ----------------------------------------------------------------

    def _remember(self, slot: LiveSlot, request: SlotRequest) -> _Memory:
        """Before the first swap: fingerprint every tensor and decide how each one comes back."""
        mem = _Memory(original_positions=slot.positions())
        live = _distinct(slot.live_tensors())
        ranges = mapped_ranges()
        origin = request.builtin() if request.builtin is not None else None
        recipe: dict[str, Value] = {}
        reader = None
        if origin is not None:
            try:
                reader = open_file(origin.path)
                recipe = _recipe(reader, origin, slot)
                mem.origin = origin
            except (OSError, TESwitchError, KeyError, ValueError):
                recipe, mem.origin = {}, None
        kept, missed = 0, []
        for key, tensor in live.items():
            if key in slot.held:  # the object itself comes back (core.lowbit keeps it): nothing to fingerprint
                mem.originals[key] = _Original(tensor.dtype, tuple(tensor.shape), b"", held=True)
                continue
            original = _Original(tensor.dtype, tuple(tensor.shape), fingerprint(tensor))
            if is_mapped(tensor, ranges):
                original.view = tensor.detach()  # the host's own view of its file: free to keep
            elif key in slot.derived and _is_arange(tensor):
                original.rebuilt = True  # position ids: resize() writes them
            elif key not in recipe or fingerprint(_as_host(recipe[key], tensor.dtype, origin)) != original.print:
                original.copy = tensor.detach().to("cpu", copy=True)
                kept += original.copy.nbytes
                missed.append(key)
            mem.originals[key] = original
        if reader is not None:
            reader.close()
        if kept > QUIET_BYTES:  # a scalar the host never read from its file is not worth a line
            why = (
                f"its weights differ from {os.path.basename(origin.path)} (merged in memory, a LoRA baked in, "
                "or the file changed since it was loaded)"
                if origin is not None
                else "the host does not say which file its weights came from"
            )
            self.notify(
                f"TE Switch: {slot.label}: {why}; keeping a {kept / 1e6:.0f} MB copy of {len(missed)} of its"
                f" {len(live)} tensors (first: {missed[0]}) on CPU to restore Built-in"
            )
        return mem

    def _unpack(self, mem: _Memory) -> None:
        if not mem.packed:
            return
        from te_switch.core import lowbit

        for module in mem.packed:
            lowbit.detach(module)
        mem.packed.clear()

    def _load(
        self, slot: LiveSlot, mem: _Memory, tensors: Mapping[str, Value], dtype: torch.dtype | None, *, fresh: bool
    ) -> None:
        """Stream ``tensors`` into the slot, one at a time (a lazy one read and converted only here),
        each tied tensor once. ``fresh``: the reader's values are memory of their own (GGUF's plain reads),
        kept as they are where a weight stays packed; views of a mapped file are copied."""
        live = slot.live_tensors()
        ranges = mapped_ranges()
        keep_packed = dtype is None and any(is_compressed(v) for v in tensors.values())
        if keep_packed or slot.held:
            from te_switch.core import lowbit
        written: set[int] = set()  # tied tensors are written once; each module sharing one is packed
        tied: dict[int, torch.nn.Module] = {}  # id of a packed value -> the first module it was attached to
        writes = _Writes(ranges)
        for key, value in _back_to_front(tensors):
            target = live[key]
            owner = _owner(slot.module, key)
            if owner is None:
                raise RuntimeError(f"the module has no place for {key}")
            if key in slot.held:
                if owner not in mem.packed:
                    shown = slot.store_dtypes.get(key, torch.float16) if dtype is None else dtype
                    shown = shown if shown in lowbit.COMPUTE_DTYPES else torch.float16
                    packed = _packable(realize(value), shown, exact=dtype is not None)
                    lowbit.attach(owner, packed, kind="linear", dtype=shown, copy=not fresh)
                    mem.packed.append(owner)
                continue
            kind = (slot.pack_kind or default_pack_kind)(owner) if keep_packed else None
            if kind is not None and is_compressed(value) and key.endswith(".weight"):
                if owner not in mem.packed:
                    # the slot's own weight is written back from its source at Built-in: free it meanwhile
                    # (position tables stay: their row count is how the slot says its position count)
                    shown = slot.store_dtypes.get(key)  # the placeholder's dtype where the live one is fp8
                    shown = (
                        shown
                        if shown in lowbit.COMPUTE_DTYPES and live[key].dtype not in lowbit.COMPUTE_DTYPES
                        else None
                    )
                    release = key not in slot.position_keys
                    first = tied.get(id(value))
                    if first is None:
                        if release:  # before the file's copy exists: the slot's memory never holds both
                            target.data = torch.empty(0, dtype=target.dtype, device=target.device)
                        lowbit.attach(owner, realize(value), kind=kind, dtype=shown, release=release, copy=not fresh)
                        tied[id(value)] = owner
                    else:  # a tied table (T5's shared = embed_tokens): read once, one packed copy for both
                        packed = lowbit.packed_weight(first)
                        lowbit.attach(owner, packed, kind=kind, dtype=shown, release=release, copy=False)
                    mem.packed.append(owner)
                continue
            if id(target) in written:
                continue
            written.add(id(target))
            writes.add(owner, key, target, value, self._target_dtype(slot, mem, key, target, dtype))
        writes.finish()

    def _target_dtype(
        self, slot: LiveSlot, mem: _Memory, key: str, tensor: torch.Tensor, dtype: torch.dtype | None
    ) -> torch.dtype:
        if not tensor.is_floating_point() or key in slot.derived:
            return tensor.dtype
        if dtype is not None:
            return torch.float32 if dtype == torch.float16 and key in slot.keep_fp32 else dtype
        if key in slot.store_dtypes:
            return slot.store_dtypes[key]
        original = mem.originals.get(key)
        return original.dtype if original is not None else tensor.dtype

    def _rollback(self, slot: LiveSlot) -> None:
        """A commit failed half-way: back to Built-in, from the same sources a restore uses."""
        mem = self._memory.get(slot.module)
        if mem is None:
            return
        try:
            self._put_back(slot, mem)
        finally:
            self._memory.pop(slot.module, None)

    def _put_back(self, slot: LiveSlot, mem: _Memory) -> None:
        origin = _OriginReader(mem, slot)
        try:
            origin.check_unchanged()
            self._unpack(mem)
            if (
                mem.original_positions is not None
                and slot.resize is not None
                and slot.positions() != mem.original_positions
            ):
                slot.resize(mem.original_positions)
            live = slot.live_tensors()
            writes = _Writes(mapped_ranges())
            for key, original in mem.originals.items():
                tensor = live.get(key)
                if tensor is None:
                    continue
                if original.view is not None:
                    tensor.data = original.view
                    continue
                if original.rebuilt or original.held:
                    continue
                if is_mapped(tensor, writes.ranges) or tuple(tensor.shape) != original.shape:
                    # the slot held its own memory (A1111 copies a checkpoint in): back to that, not to a view
                    # of the checkpoint's map, whose bytes a rewrite of the file in place would change
                    tensor.data = torch.empty(original.shape, dtype=original.dtype, device=tensor.device)
                writes.add(_owner(slot.module, key), key, tensor, origin.value(key), original.dtype)
            writes.finish()
        finally:
            origin.close()
        live = _distinct(slot.live_tensors())
        wrong = [k for k, o in mem.originals.items() if k in live and not o.held and fingerprint(live[k]) != o.print]
        if wrong:
            raise TESwitchError(f"{slot.label}: Built-in could not be proven bit-identical ({wrong[0]} differs)")

    def restore(self, slot: LiveSlot) -> bool:
        """Back to the checkpoint's own weights, bit for bit, from the host's own file."""
        with self._lock:
            mem = self._memory.get(slot.module)
            if mem is None or mem.applied is None:
                return False
            self._put_back(slot, mem)
            del self._memory[slot.module]
            self.epoch += 1
            return True


class _OriginReader:
    """The slot's own values, one tensor at a time: its mapped views, the host's file, or the copies."""

    def __init__(self, mem: _Memory, slot: LiveSlot) -> None:
        self.mem, self.slot = mem, slot
        self._src = None
        self._recipe: dict[str, Value] | None = None

    def _file(self) -> dict[str, Value]:
        if self._recipe is None:
            origin = self.mem.origin
            if origin is None:
                raise TESwitchError(f"{self.slot.label}: no source for the built-in weights")
            self._src = open_file(origin.path)
            self._recipe = _recipe(self._src, origin, self.slot)
        return self._recipe

    def needs_file(self) -> bool:
        return any(o.from_file for o in self.mem.originals.values())

    def check_unchanged(self) -> None:
        """Before anything changes: the host's file must still give every fingerprinted tensor (a few
        sampled pages each), whatever its size and mtime say — or nothing is restored."""
        mem = self.mem
        if mem.origin is None or not self.needs_file():
            return
        name = os.path.basename(mem.origin.path)
        try:
            recipe = self._file()
        except (OSError, TESwitchError) as e:
            raise TESwitchError(
                f"{self.slot.label}: {name} cannot be read ({one_line(e)}); Built-in cannot be restored from it"
                " (reload the checkpoint)"
            ) from None
        for key, original in mem.originals.items():
            if original.from_file:
                value = recipe.get(key)
                if value is None or fingerprint(_as_host(value, original.dtype, mem.origin)) != original.print:
                    raise TESwitchError(
                        f"{self.slot.label}: {name} changed on disk since it was loaded; Built-in cannot be restored"
                        " from it (reload the checkpoint)"
                    )

    def value(self, key: str) -> Weight:
        original = self.mem.originals[key]
        if original.view is not None:
            return original.view
        if original.copy is not None:
            return original.copy
        if original.held:  # the file's own weight, as stored: the host's layer never held anything else
            return realize(self._file()[key])
        return _as_host(self._file()[key], original.dtype, self.mem.origin)

    def lazy(self, key: str) -> LazyWeight:
        """``value(key)`` when it is loaded (the commit reads one tensor at a time)."""
        original = self.mem.originals[key]
        return LazyWeight(torch.Size(original.shape), dtype_name(original.dtype), functools.partial(self.value, key))

    def close(self) -> None:
        if self._src is not None:
            self._src.close()
        self._src, self._recipe = None, None


def _recipe(src: TensorSource, origin: BuiltinSource, slot: LiveSlot) -> dict[str, Value]:
    """The host's file mapped to the slot's names, lazily: each value read (as stored) when loaded."""
    if origin.stored_names:
        p = origin.tower.prefix
        values: dict[str, Value] = {k[len(p) :]: lazy_load(src, k) for k in src.keys() if k.startswith(p)}  # noqa: SIM118
    else:
        values = load_tower(src, origin.tower, check=False, as_stored=True, lazy=True)
    return (origin.to_host or slot.to_host)(values)


def _as_host(value: Value, dtype: torch.dtype, origin: BuiltinSource | None) -> torch.Tensor:
    """A stored value converted as the host converted it: through ``cast_via``, then to ``dtype``."""
    value = realize(value)
    tensor = dense(value) if isinstance(value, PackedTensor) else value
    if not tensor.is_floating_point() or not dtype.is_floating_point:
        return tensor.to(dtype) if tensor.dtype != dtype else tensor
    via = origin.cast_via if origin is not None else None
    if via is not None and tensor.dtype != via and dtype != tensor.dtype:
        tensor = tensor.to(via)
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _back_to_front(tensors: Mapping[str, Value]) -> list[tuple[str, Value]]:
    """``tensors`` ordered from the end of their file to its start (by address in the file's map, or
    a lazy weight's offset in its file).

    The check has just read the file front to back. Where the file is larger than the page cache can
    hold beside the loaded models, the cache keeps the file's tail and evicts its head: copying the tail
    first uses those pages before anything evicts them, so only the head is read from the disk again
    (front to back, every page would miss). Values converted in RAM are ordered the same way, harmlessly."""

    def address(value: Value) -> int:
        if isinstance(value, LazyWeight):
            return value.at
        tensor = value.raw if isinstance(value, PackedTensor) else value
        return tensor.data_ptr() if isinstance(tensor, torch.Tensor) and tensor.device.type == "cpu" else 0

    return sorted(tensors.items(), key=lambda item: address(item[1]), reverse=True)


def _is_arange(t: torch.Tensor) -> bool:
    flat = t.reshape(-1)
    return not t.is_floating_point() and bool(torch.equal(flat.cpu(), torch.arange(flat.numel(), dtype=t.dtype)))


class _Writes:
    """Streams values into live tensors, one module at a time (a module's own tensors in one load).

    In place through ``owner.load_state_dict`` (host hooks see one load per layer; ``copy_`` converts
    without a temporary). A tensor that is a view of a mapped file, or whose shape changes, is pointed at
    new values instead — the file's own view when it already is what the slot needs; one whose dtype
    changes gets new storage first.
    """

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        self.ranges = ranges
        self.owner: torch.nn.Module | None = None
        self.pending: dict[str, Weight] = {}
        self.staging = _Staging()

    def add(
        self, owner: torch.nn.Module | None, key: str, target: torch.Tensor, value: Value, dtype: torch.dtype
    ) -> None:
        if owner is None:
            raise RuntimeError(f"the module has no place for {key}")
        if owner is not self.owner:
            self.flush()
            self.owner = owner
        value = realize(value)
        in_place = not is_mapped(target, self.ranges) and tuple(target.shape) == tuple(value.shape)
        if isinstance(value, PackedTensor) and not (in_place and value.decode is None):
            value = dense(value)
        if isinstance(value, torch.Tensor):
            prefault(value)
        with torch.no_grad():
            if not in_place:
                new = value.to(device=target.device, dtype=dtype)
                target.data = new if new.is_contiguous() else new.contiguous()
                return
            if target.dtype != dtype:
                target.data = torch.empty(target.shape, dtype=dtype, device=target.device)
            if isinstance(value, PackedTensor):
                _expand_into(target, value)
                value = target  # the load copies it onto itself (a no-op): host hooks still see one
            elif _staged(target, value):
                self.staging.copy_into(target, value)
                value = target
        self.pending[key.rsplit(".", 1)[-1]] = value

    def flush(self) -> None:
        owner, pending = self.owner, self.pending
        self.owner, self.pending = None, {}
        if owner is not None and pending:
            _write(owner, pending)

    def finish(self) -> None:
        """The last module loaded, every staged copy done."""
        self.flush()
        self.staging.wait()


STAGING_BYTES = 32 << 20  # each of the two staging buffers: a T5-XXL fp32 token table goes in 16 slices


def _staged(target: torch.Tensor, value: Weight) -> bool:
    """Whether ``value`` (on the CPU) goes to ``target`` (on an accelerator, same shape: an in-place write)
    through the staging buffers."""
    return (
        isinstance(value, torch.Tensor)
        and value.device.type == "cpu"
        and target.device.type != "cpu"
        and target.is_contiguous()
    )


class _Staging:
    """CPU → accelerator copies through two small reusable buffers (page-locked where CUDA is).

    torch converts a dtype on the CPU before a host-to-device copy, into a temporary the size of the
    tensor (0.5 GB for a T5-XXL token table in fp32); from pageable memory it also copies through the
    driver's own bounce buffer. Here each slice is converted once into a buffer of the target's dtype and
    sent from it asynchronously while the next slice is converted into the other buffer: no temporary
    beyond the two buffers, and the same rounding as a whole-tensor copy."""

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []
        self.events: list[object | None] = [None, None]
        self.turn = 0

    def _buffer(self, device: torch.device) -> torch.Tensor:
        if not self.buffers:
            pinned = device.type == "cuda" and torch.cuda.is_available()
            self.buffers = [torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=pinned) for _ in range(2)]
        buffer = self.buffers[self.turn]
        event = self.events[self.turn]
        if event is not None:
            event.synchronize()  # the copy that last read this buffer is done
            self.events[self.turn] = None
        return buffer

    def copy_into(self, target: torch.Tensor, value: torch.Tensor) -> None:
        src, dst = value.reshape(-1), target.view(-1)
        step = STAGING_BYTES // target.element_size()
        for start in range(0, src.numel(), step):
            n = min(step, src.numel() - start)
            buffer = self._buffer(target.device)
            piece = buffer[: n * target.element_size()].view(target.dtype)
            piece.copy_(src[start : start + n])  # the one conversion, on the CPU
            pinned = piece.is_pinned()
            dst[start : start + n].copy_(piece, non_blocking=pinned)
            if pinned:
                self.events[self.turn] = event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(target.device))
            self.turn ^= 1

    def wait(self) -> None:
        """Every copy sent is done (before the host reads the weights or the buffers go)."""
        for i, event in enumerate(self.events):
            if event is not None:
                event.synchronize()
                self.events[i] = None


def _expand_into(target: torch.Tensor, value: PackedTensor) -> None:
    """A packed weight expanded straight into ``target``, a slice of rows at a time: no temporary the size
    of the tensor (a T5-XXL token table is 0.5 GB in fp32). Each slice is computed in fp32 and rounded
    once to ``target``'s dtype, as a whole-tensor expansion and copy would."""
    start = 0
    for part in _row_chunks(value):
        rows = part.shape[0]
        target[start : start + rows].copy_(part.dequantize(target.dtype, target.device))
        start += rows


def _write(owner: torch.nn.Module, values: Mapping[str, Weight]) -> None:
    """One ``load_state_dict`` of ``owner``'s own tensors (the seam tests fail on purpose)."""
    with torch.no_grad():
        result = owner.load_state_dict(dict(values), strict=False)
    missing = set(values) & set(result.missing_keys)
    if result.unexpected_keys or missing:
        raise RuntimeError(f"the module did not take {sorted(missing or set(result.unexpected_keys))[0]}")


def _packable(value: Weight, dtype: torch.dtype, *, exact: bool) -> Weight:
    """A weight ``core.lowbit`` can attach: compressed as it is (``exact``: our own decoders, not a host's),
    a dense one stored in ``dtype``."""
    if isinstance(value, PackedTensor):
        return replace(value, decode=None) if exact and value.decode is not None else value
    if is_compressed(value):
        return value
    stored = value.to(dtype) if value.dtype != dtype else value
    return PackedTensor(dtype_name(stored.dtype), stored, stored.shape)


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
