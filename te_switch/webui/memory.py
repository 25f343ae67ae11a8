"""Per-checkpoint memory (opt-in): the tab panel's last choices for each checkpoint.

Stored as JSON beside the library cache (``<WebUI cache>/te_switch/checkpoints.json``), keyed by
the checkpoint's name, with its short hash kept for reference. Only the panel level is stored
(not the global options, not X/Y/Z cells), so recalling it puts back exactly what the user set.
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


def _load() -> dict[str, Any]:
    try:
        with open(path(), encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("TE Switch: ignoring unreadable %s: %s", path(), e)
        return {}
    entries = data.get("checkpoints") if isinstance(data, dict) and data.get("version") == VERSION else None
    return entries if isinstance(entries, dict) else {}


def _save(entries: dict[str, Any]) -> None:
    target = path()
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"version": VERSION, "checkpoints": entries}, f, indent=1, sort_keys=True)
    os.replace(tmp, target)


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
