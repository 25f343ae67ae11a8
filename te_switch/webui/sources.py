"""What a user chose -> the file a slot loads: one :class:`EncoderSource` per chosen encoder and generation.

Every way of naming an encoder ends in :func:`source`: a panel dropdown value or an API field (its
decoration already stripped by ``args``, see ``webui.labels``), an ``override_settings`` key or a
global option, a pasted infotext value (``name [short hash]``: the hash wins), an X/Y/Z axis value,
a remembered panel (per-model memory). It looks the value up in the library, checks the tower's kind
against the slot and records the file's size and mtime (and its short hash when the library already
knows it).

A generation calls :func:`resolve` once, in ``process``. The :class:`Resolved` it returns is the
generation's one answer: the infotext writes its sources (:func:`short_hash` fills a hash not known
yet), and the host adapter gets it as its resolver, so the engine loads exactly the file the
infotext names.

A source is remembered per (slot, value, and its library label) while its file keeps its size and
mtime and the library is not rescanned. So the API's pre-check (``webui.api``) and the generation it
lets through share one object — the file is looked up, hashed and its values read once — and the
cells of an X/Y/Z grid resolve each axis value once.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from te_switch.core.errors import TESwitchError, one_line
from te_switch.core.library import EncoderLibrary, file_identity
from te_switch.core.selection import ALL_SLOTS, Selection, SlotChoice
from te_switch.hosts.engine import EncoderSource
from te_switch.webui import library

_lock = threading.Lock()
_memo: dict[tuple[str, str], EncoderSource] = {}  # (slot, value or label) -> source
_memo_stamp: list[tuple[EncoderLibrary, int]] = []  # the library and scan the memo belongs to


def _remembered(lib: EncoderLibrary) -> dict[tuple[str, str], EncoderSource]:
    """The memo, emptied when the library was rebuilt or rescanned since (call under ``_lock``)."""
    stamp = (lib, lib.scans)
    if not _memo_stamp or _memo_stamp[0][0] is not lib or _memo_stamp[0][1] != lib.scans:
        _memo.clear()
        _memo_stamp[:] = [stamp]
    return _memo


def source(value: str, slot: str) -> EncoderSource:
    """The one resolution: what a user named for ``slot`` -> its :class:`EncoderSource`.

    Raises ``library.EncoderLookupError``/``EncoderNotFound`` (one line, with the API's status).
    """
    lib = library.get_library()
    text = value.strip()
    with _lock:
        known = _remembered(lib).get((slot, text))
    if known is not None and known.is_current():
        return known
    choice = library.lookup(text, slot)
    path = choice.file.path
    try:
        size, mtime = file_identity(path)
    except OSError:
        raise library.EncoderNotFound(f"{choice.label}: no such file") from None
    with _lock:
        memo = _remembered(lib)
        same = memo.get((slot, choice.label))
        if same is None or not same.is_current() or (same.path, same.tower) != (path, choice.tower):
            same = EncoderSource(path, choice.tower, choice.label, lib.cached_short_hash(path), size, mtime)
        memo[(slot, choice.label)] = memo[(slot, text)] = same
    return same


@dataclass(frozen=True)
class Resolved:
    """A generation's effective selection (library labels) and the source of every chosen encoder.

    Callable as the host adapter's resolver (``hosts.base.Resolver``): ``resolved(slot, label)`` is
    this generation's source for the slot.
    """

    selection: Selection
    sources: Mapping[str, EncoderSource] = field(default_factory=dict)

    def __call__(self, slot: str, label: str) -> EncoderSource:
        found = self.sources.get(slot)
        if found is not None and found.label == label:
            return found
        return source(label, slot)  # an adapter asking for what this generation did not choose

    def with_selection(self, selection: Selection) -> Resolved:
        """The same sources under a selection that differs in clip skip only (the automatic mode)."""
        return replace(self, selection=selection)


def resolve(selection: Selection, slots: tuple[str, ...] | None = None) -> Resolved:
    """Every chosen encoder of ``selection`` -> its source, checked against its slot; slots the model
    does not have (``slots``; None = all) are dropped: an SD1 model has no CLIP-G to swap."""
    kept: dict[str, SlotChoice] = {}
    found: dict[str, EncoderSource] = {}
    for slot in ALL_SLOTS:
        choice = selection.slot(slot)
        if choice.is_builtin or (slots is not None and slot not in slots):
            continue
        if choice.encoder is not None:
            found[slot] = source(choice.encoder, slot)
            choice = SlotChoice(found[slot].label, choice.precision)
        kept[slot] = choice
    return Resolved(Selection(selection.clip_skip, selection.scope, kept), found)


def resolver(slot: str, label: str) -> EncoderSource:
    """A resolver outside a generation (``reapply`` after a weights reload): the remembered source."""
    return source(label, slot)


def short_hash(src: EncoderSource) -> str | None:
    """The file's short hash, filled in from the library's hash cache (hashing the file once) when not
    known yet; None when the file cannot be read any more (it was loaded: the name alone is recorded)."""
    if not src.short_hash:
        try:
            src.short_hash = library.get_library().short_hash(src.path)
        except OSError:
            return None
    return src.short_hash


def check_values(src: EncoderSource) -> None:
    """Every weight of the tower must convert and be finite: read once per file state.

    The API calls this before a generation starts, so a broken file is a 4xx, not a stopped run. The
    result is the swap engine's own (``src.checked()``): a file checked here is not read again for its
    values when the generation swaps it in, and one the engine already loaded is not read here.
    """
    from te_switch.core.convert import load_tower
    from te_switch.core.readers import open_file
    from te_switch.hosts.engine import check_values_once

    if not os.path.exists(src.path):
        raise library.EncoderNotFound(f"{src.label}: no such file")
    known, reason = src.checked()
    if not known:
        try:
            with open_file(src.path) as opened:  # one read: the values and the file's sha256
                reason = check_values_once(opened, src.tower, load_tower(opened, src.tower, lazy=True))
        except (TESwitchError, OSError, RuntimeError, ValueError, KeyError) as e:
            reason = one_line(e)
    if reason is not None:
        raise library.EncoderLookupError(reason if reason.startswith(src.label) else f"{src.label}: {reason}")
