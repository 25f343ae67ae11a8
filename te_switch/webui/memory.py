"""Per-model memory (opt-in): the tab panel's last choices for each checkpoint, and the clip skip
last chosen with each LoRA.

Stored as JSON beside the library cache (``<WebUI cache>/te_switch/checkpoints.json``), keyed by
the checkpoint's name, with its short hash kept for reference, and LoRAs by their prompt name. Only
the panel level is stored (not the global options, not X/Y/Z cells, not a value Auto picked), so
recalling it puts back exactly what the user set. A remembered clip skip is also the first source of
a model's recommendation (``te_switch.webui.recommend``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import Any

from te_switch.core.selection import Selection
from te_switch.webui import library, options
from te_switch.webui.args import ArgsError, dict_from_selection, selection_from_dict

log = logging.getLogger(__name__)
FILE_NAME = "checkpoints.json"
VERSION = 1

_lock = threading.Lock()


def path() -> str:
    return os.path.join(library.cache_dir(), FILE_NAME)


def enabled() -> bool:
    try:
        from modules import shared
    except ImportError:
        return False
    return bool(getattr(shared.opts, options.PER_CHECKPOINT, False))


def _load_all() -> dict[str, dict[str, Any]]:
    try:
        with open(path(), encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("TE Switch: ignoring unreadable %s: %s", path(), e)
        return {}
    if not isinstance(data, dict) or data.get("version") != VERSION:
        return {}
    return {k: v for k, v in data.items() if k in ("checkpoints", "loras") and isinstance(v, dict)}


def _load() -> dict[str, Any]:
    return _load_all().get("checkpoints", {})


def _save_all(sections: dict[str, dict[str, Any]]) -> None:
    target = path()
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"version": VERSION, **sections}, f, indent=1, sort_keys=True)
    os.replace(tmp, target)


def _save(entries: dict[str, Any]) -> None:
    _save_all({**_load_all(), "checkpoints": entries})


def remember(checkpoint: str, selection: Selection, *, short_hash: str | None = None) -> None:
    """Store ``selection`` (panel level) for ``checkpoint``; a no-op when the value is unchanged."""
    if not checkpoint:
        return
    record = {"selection": dict_from_selection(selection), "hash": short_hash}
    with _lock:
        entries = _load()
        if entries.get(checkpoint) == record:
            return
        entries[checkpoint] = record
        _save(entries)


def recall(checkpoint: str) -> Selection | None:
    if not checkpoint:
        return None
    with _lock:
        record = _load().get(checkpoint)
    if not isinstance(record, dict) or not isinstance(record.get("selection"), dict):
        return None
    try:
        return selection_from_dict(record["selection"])
    except (ArgsError, ValueError) as e:
        log.warning("TE Switch: ignoring the remembered choices for %s: %s", checkpoint, e)
        return None


def remember_loras(names: list[str], clip_skip: int) -> None:
    """The clip skip the user chose for a generation with these LoRAs (no-op when unchanged)."""
    if not names:
        return
    with _lock:
        sections = _load_all()
        loras = dict(sections.get("loras", {}))
        changed = {n: {"clip_skip": clip_skip} for n in names if loras.get(n) != {"clip_skip": clip_skip}}
        if not changed:
            return
        loras.update(changed)
        _save_all({**sections, "loras": loras})


def recall_lora(name: str) -> int | None:
    """The clip skip last chosen with LoRA ``name`` (None when none is remembered or memory is off)."""
    if not enabled():
        return None
    with _lock:
        record = _load_all().get("loras", {}).get(name)
    value = record.get("clip_skip") if isinstance(record, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 12 else None


def recall_checkpoint_clip_skip(checkpoint: str) -> int | None:
    """The clip skip remembered with ``checkpoint`` (None when Auto, none, or memory is off)."""
    if not enabled():
        return None
    remembered = recall(checkpoint)
    return remembered.clip_skip if remembered is not None else None
