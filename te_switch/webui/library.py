"""The WebUI's encoder library: which folders, one shared :class:`EncoderLibrary`, and turning
what users type (labels, ``name [hash]`` from infotext, paths) into a checked encoder.

Folders: ``<models>/CLIP`` (A1111's SD3 convention), ``<models>/text_encoder`` (Forge),
``<models>/text_encoders`` (ComfyUI, reForge), Forge's ``--text-encoder-dir``, and the folders in
the ``te_switch_extra_dirs`` setting (``--te-switch-dir`` adds to that setting at start-up). The header/hash cache
lives in the WebUI's cache folder (``SD_WEBUI_CACHE_DIR``, default ``<data>/cache``), never in
the extension's own tree.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from te_switch.core.detect import TowerInfo
from te_switch.core.errors import TESwitchError, one_line
from te_switch.core.infotext import encoder_value
from te_switch.core.library import SHORT_HASH_LEN, EncoderChoice, EncoderFile, EncoderLibrary
from te_switch.core.selection import KINDS_BY_SLOT, SLOT_LABELS
from te_switch.hosts.engine import EncoderSource

MODEL_SUBFOLDERS = ("CLIP", "text_encoder", "text_encoders")
CACHE_SUBFOLDER = "te_switch"
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
_WITH_HASH = re.compile(rf"^(?P<name>.*\S)\s*\[(?P<hash>[0-9a-fA-F]{{{SHORT_HASH_LEN}}})\]$")


class EncoderLookupError(TESwitchError):
    """A user-given encoder that cannot be used; ``http_status`` is what the API answers."""

    http_status = 422


class EncoderNotFound(EncoderLookupError):
    http_status = 404


# ---------------------------------------------------------------------------------------------
# where things are


def _webui_paths() -> tuple[str | None, str | None]:
    """(models folder, data folder) of the running WebUI, or (None, None) outside one."""
    try:
        from modules import paths
    except ImportError:
        return None, None
    return getattr(paths, "models_path", None), getattr(paths, "data_path", None)


def _cmd_opts() -> object | None:
    try:
        from modules import shared
    except ImportError:
        return None
    return getattr(shared, "cmd_opts", None)


def _opts() -> object | None:
    try:
        from modules import shared
    except ImportError:
        return None
    return getattr(shared, "opts", None)


def split_folders(text: str | None) -> list[str]:
    """The setting's text: one folder per line (``;`` or the OS path separator also split)."""
    if not text:
        return []
    parts = re.split(r"[\n;" + re.escape(os.pathsep) + r"]", str(text))
    return [os.path.expanduser(p.strip()) for p in parts if p.strip()]


def encoder_folders() -> list[str]:
    """Every folder the library scans, in priority order, without duplicates."""
    models, _ = _webui_paths()
    folders: list[str] = [os.path.join(models, sub) for sub in MODEL_SUBFOLDERS] if models else []
    cmd = _cmd_opts()
    forge_dir = getattr(cmd, "text_encoder_dir", None) if cmd is not None else None
    if isinstance(forge_dir, str) and forge_dir:
        folders.append(forge_dir)
    opts = _opts()
    if opts is not None:
        folders += split_folders(getattr(opts, "te_switch_extra_dirs", ""))
    out: list[str] = []
    for folder in folders:
        real = os.path.abspath(folder)
        if real not in out:
            out.append(real)
    return out


def cache_dir() -> str:
    """``<WebUI cache>/te_switch`` (the WebUI's own ``modules.cache.cache_dir`` where it has one)."""
    base = os.environ.get("SD_WEBUI_CACHE_DIR")
    if not base:
        _, data = _webui_paths()
        base = os.path.join(data, "cache") if data else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, CACHE_SUBFOLDER)


# ---------------------------------------------------------------------------------------------
# the one library

_lock = threading.RLock()
_library: EncoderLibrary | None = None


def get_library() -> EncoderLibrary:
    """The shared library; rebuilt when the folder list changed (a setting or a flag)."""
    global _library
    folders = encoder_folders()
    with _lock:
        if _library is None or _library.folders != folders:
            _library = EncoderLibrary(folders, os.path.join(cache_dir(), "library.json"))
        return _library


def refresh() -> list[EncoderFile]:
    """Rescan the folders (unchanged files are not reopened)."""
    return get_library().scan()


def reset() -> None:
    """Forget the library (tests; a changed WebUI layout)."""
    global _library
    with _lock:
        _library = None


def slot_kinds(slot: str) -> tuple[str, ...]:
    return KINDS_BY_SLOT[slot]


def _sorted(choices: Iterable[EncoderChoice]) -> list[EncoderChoice]:
    def key(c: EncoderChoice) -> tuple:
        kind = c.kind or ""
        return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), c.label.casefold())

    return sorted(choices, key=key)


def choices_for(slot: str) -> list[EncoderChoice]:
    """Compatible encoders for ``slot``, grouped by kind, then by name."""
    return _sorted(get_library().choices(slot_kinds(slot)))


def labels_for(slot: str) -> list[str]:
    return [c.label for c in choices_for(slot)]


def describe_tower(tower: TowerInfo) -> str:
    """'Long-CLIP-L · 248', 'T5-XXL · GGUF', 'CLIP-L · from checkpoint' (the dropdown's decoration)."""
    parts = [KIND_LABELS.get(tower.kind or "", tower.kind or "?")]
    if tower.positions and tower.positions != 77:
        parts.append(str(tower.positions))
    if tower.quant:
        parts.append({"fp8": "fp8", "scaled-fp8": "scaled fp8", "gguf": "GGUF"}.get(tower.quant, tower.quant))
    if tower.prefix:
        parts.append("from checkpoint")
    return " · ".join(parts)


def display_label(label: str) -> str:
    """A library label as the dropdown shows it: 'x.safetensors (Long-CLIP-L · 248)'."""
    choice = get_library().find(label)
    return f"{label} ({describe_tower(choice.tower)})" if choice else label


# ---------------------------------------------------------------------------------------------
# lookup


def _file_at(lib: EncoderLibrary, path: str) -> EncoderFile | None:
    real = os.path.realpath(path)
    return next((f for f in lib.files if os.path.realpath(f.path) == real), None)


def _pick_tower(file: EncoderFile, slot: str | None, shown: str) -> EncoderChoice:
    if file.error and not any(t.usable for t in file.towers):
        raise EncoderLookupError(file.error)
    usable = [t for t in file.towers if t.usable]
    if not usable:
        note = next((t.note for t in file.towers if t.note), None)
        raise EncoderLookupError(f"{shown}: not a text encoder{f' ({note})' if note else ''}")
    fitting = [t for t in usable if slot is None or t.kind in slot_kinds(slot)]
    return EncoderChoice(file, (fitting or usable)[0])


def lookup(value: str, slot: str | None = None) -> EncoderChoice:
    """What a user named -> one encoder tower in the library, checked against ``slot``'s kinds.

    Accepts a library label, a unique file name, ``name [short hash]`` (infotext: the hash wins,
    the name is the fallback) and paths inside the folders. Raises :class:`EncoderLookupError`
    (outside the folders, wrong kind, unreadable) or :class:`EncoderNotFound`, one line each.
    """
    lib = get_library()
    text = value.strip()
    choice: EncoderChoice | None = None
    match = _WITH_HASH.match(text)
    if match:
        choice = lib.find_by_hash(match["hash"].lower(), match["name"]) or lib.find(match["name"])
        text = match["name"] if choice is None else text
    if choice is None:
        choice = lib.find(text)
    if choice is None:
        path = _resolve_path(lib, text) if _looks_like_path(text, lib) else None
        file = _file_at(lib, path) if path else None
        if file is None and path:
            lib.scan()
            file = _file_at(lib, path)
        if file is not None:
            choice = _pick_tower(file, slot, text)
        else:
            bad = _unusable_named(lib, text)
            if bad is not None:
                choice = _pick_tower(bad, slot, text)  # raises with the file's own reason
    if choice is None:
        raise EncoderNotFound(f"{value}: no such encoder in the encoder folders")
    if slot is not None and choice.kind not in slot_kinds(slot):
        accepted = ", ".join(KIND_LABELS.get(k, k) for k in slot_kinds(slot))
        kind = KIND_LABELS.get(choice.kind or "", choice.kind)
        raise EncoderLookupError(
            f"{choice.label}: a {kind} file cannot go into the {SLOT_LABELS[slot]} slot ({accepted})"
        )
    return choice


def _resolve_path(lib: EncoderLibrary, text: str) -> str | None:
    """A path inside the folders (None when it does not exist); outside them is an error."""
    candidates = [text] if os.path.isabs(text) else [os.path.join(root, text) for root in lib.folders]
    if not any(lib.contains(c) for c in candidates):
        raise EncoderLookupError(f"{text}: outside the encoder folders ({', '.join(lib.folders) or 'none configured'})")
    return next((c for c in candidates if lib.contains(c) and os.path.exists(c)), None)


def _looks_like_path(text: str, lib: EncoderLibrary) -> bool:
    if os.path.isabs(text) or os.sep in text or "/" in text or text.startswith("."):
        return True
    return any(os.path.exists(os.path.join(root, text)) for root in lib.folders)


def _unusable_named(lib: EncoderLibrary, text: str) -> EncoderFile | None:
    """A listed file (by name) whose towers are all unusable: its reason beats 'not found'."""
    for f in lib.files:
        if (f.name == text or os.path.basename(f.name) == text) and not any(t.usable for t in f.towers):
            return f
    return None


def canonical(value: str | None, slot: str) -> str | None:
    """The library label for a user value (None stays Built-in); raises like :func:`lookup`."""
    return None if value is None else lookup(value, slot).label


def short_hash(choice: EncoderChoice) -> str:
    return get_library().short_hash(choice.file.path)


def cached_short_hash(path: str) -> str | None:
    """The short hash if the cache already has it for the file as it is now (no hashing here)."""
    return get_library().cached_short_hash(path)


def infotext_value(label: str) -> str:
    """'name [short hash]' for the infotext."""
    choice = lookup(label)
    return encoder_value(choice.label, short_hash(choice))


def source_for(slot: str, label: str) -> EncoderSource:
    """The host adapters' resolver: label -> the file, tower, label and short hash to load."""
    choice = lookup(label, slot)
    return EncoderSource(choice.file.path, choice.tower, choice.label, short_hash(choice))


def check_values(choice: EncoderChoice) -> None:
    """Read the whole tower once: every weight must convert and be finite.

    The API calls this before a generation starts so a broken file is a 4xx, not a stopped run. The
    result is the swap engine's own (per file state): a file checked here is not read again for its
    values when the generation swaps it in, and one the engine already loaded is not read here.
    """
    from te_switch.core.convert import load_tower
    from te_switch.core.readers import open_file
    from te_switch.hosts.engine import check_values_once

    path = choice.file.path
    if not os.path.exists(path):
        raise EncoderNotFound(f"{choice.label}: no such file")
    try:
        with open_file(path) as src:
            reason = check_values_once(src, choice.tower, load_tower(src, choice.tower))
    except TESwitchError as e:
        reason = one_line(e)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        reason = one_line(e)
    if reason is not None:
        raise EncoderLookupError(reason if reason.startswith(choice.label) else f"{choice.label}: {reason}")


@dataclass(frozen=True)
class EncoderRow:
    """One row of ``GET /te-switch/v1/encoders``."""

    name: str
    label: str
    kind: str | None
    slots: list[str]
    short_hash: str | None
    positions: int | None
    size: int
    format: str | None
    quant: str | None
    error: str | None
    path: str


def rows(*, with_hashes: bool = False) -> list[EncoderRow]:
    """Every tower of every file (unusable ones too, with their error)."""
    lib = get_library()
    out: list[EncoderRow] = []
    for file in lib.files:
        many = len(file.towers) > 1
        for tower in file.towers:
            label = f"{file.name} » {tower.tower}" if many and tower.tower else file.name
            slots = [s for s, kinds in KINDS_BY_SLOT.items() if tower.usable and tower.kind in kinds]
            digest = None
            if tower.error is None:
                try:
                    digest = lib.short_hash(file.path) if with_hashes else cached_short_hash(file.path)
                except OSError:
                    digest = None
            shown = f"{label} ({describe_tower(tower)})" if tower.usable else label
            error = tower.error or (None if tower.usable else tower.note or f"not usable ({tower.kind})")
            out.append(
                EncoderRow(
                    label, shown, tower.kind, slots, digest, tower.positions, file.size, tower.format, tower.quant,
                    error, file.path,
                )
            )  # fmt: skip
    return out
