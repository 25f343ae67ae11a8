"""What the panel, the script and the routes share: the host adapter, the effective selection, the
status line, and the panel's backend for a WebUI tab."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from te_switch import hosts
from te_switch.core.clip_skip import NATIVE_SKIP, clip_towers
from te_switch.core.errors import one_line
from te_switch.core.selection import SLOT_LABELS, Selection
from te_switch.hosts.base import HostAdapter
from te_switch.webui import memory, options, sources
from te_switch.webui.args import ArgsError, force, merge, parse_clip_skip
from te_switch.webui.i18n import tr, tr_line

log = logging.getLogger(__name__)
PREFIX = "TE Switch: "


# ---------------------------------------------------------------------------------------------
# the host


_adapter_error: list[str] = []  # reported once


def adapter() -> HostAdapter | None:
    """The host adapter (None outside A1111/Forge, or when it cannot be imported: said once)."""
    try:
        return hosts.get_adapter()
    except Exception as e:  # an adapter that fails to import must not take the WebUI down
        if not _adapter_error:
            _adapter_error.append(one_line(e))
            print(f"{PREFIX}text-encoder support is unavailable: {one_line(e)}")
        return None


def live_model() -> Any | None:
    host = adapter()
    if host is None:
        return None
    try:
        return host.live_model()
    except Exception:  # reading the live model is a best-effort query
        return None


def family() -> str | None:
    host, model = adapter(), live_model()
    if host is None or model is None:
        return None
    try:
        return host.family(model)
    except Exception:
        return None


def slot_names() -> tuple[str, ...]:
    host = adapter()
    try:
        return tuple(host.slot_names()) if host is not None else ()
    except Exception:
        return ()


def checkpoint_key(model: Any = None) -> str:
    """The loaded checkpoint's name ('' before one is loaded): the per-checkpoint memory key."""
    model = live_model() if model is None else model
    info = getattr(model, "sd_checkpoint_info", None)
    return str(getattr(info, "name", "") or getattr(info, "title", "") or "") if info is not None else ""


def checkpoint_hash(model: Any = None) -> str | None:
    model = live_model() if model is None else model
    info = getattr(model, "sd_checkpoint_info", None)
    return getattr(info, "shorthash", None) if info is not None else None


# ---------------------------------------------------------------------------------------------
# levels


def effective(panel: Selection, forced: Mapping[str, Any] | None = None) -> Selection:
    """X/Y/Z values > the tab panel > global options (incl. override_settings) > Auto/Built-in."""
    sel = merge(panel, options.global_selection())
    return force(sel, forced) if forced else sel


def effective_for_display(panel: Selection) -> Selection:
    try:
        return effective(panel)
    except (ArgsError, ValueError):
        return panel


# ---------------------------------------------------------------------------------------------
# status line


@dataclass
class _Status:
    error: str | None = None


_status = _Status()
_status_lock = threading.Lock()


def set_error(message: str | None) -> None:
    with _status_lock:
        _status.error = message


def last_error() -> str | None:
    with _status_lock:
        return _status.error


def status_line() -> tuple[str, bool]:
    """One line: the last swap error, else what the model holds now (nothing when all built-in)."""
    error = last_error()
    if error:
        return f"\u26a0 {error}", True
    host = adapter()
    if host is None:
        return "", False
    try:
        slots = host.status().get("slots", {})
    except Exception:
        return "", False
    parts = []
    for slot, info in slots.items():
        if info.get("encoder") not in (None, "Built-in") or info.get("precision", "auto") != "auto":
            what = info.get("encoder") or "Built-in"
            if info.get("hash"):
                what += f" [{info['hash']}]"
            if info.get("precision", "auto") != "auto":
                what += f" · {info['precision']}"
            parts.append(f"{SLOT_LABELS.get(slot, slot)}: {what}")
    return (tr("Loaded: {encoders}", encoders=" · ".join(parts)), False) if parts else ("", False)


# ---------------------------------------------------------------------------------------------
# panel backend


def describe(panel: Selection) -> str:
    host = adapter()
    if host is None:
        return tr("CLIP Skip and encoder swaps need AUTOMATIC1111 1.10, Forge 2, reForge or Forge Classic")
    try:
        return tr_line(host.describe(effective_for_display(panel)))
    except Exception as e:
        return one_line(e)


def resting_clip_skip() -> int:
    """Where the slider rests while Auto is ticked: the global layer, else the model's native one."""
    try:
        from modules import shared

        n = parse_clip_skip(getattr(shared.opts, options.CLIP_SKIP, "Auto"))
        if n is not None:
            return n
    except (ImportError, ValueError, AttributeError):
        pass
    fam = family()
    if fam is not None:
        towers = clip_towers(fam)
        if towers:
            return NATIVE_SKIP[fam][towers[0]]
    return 1


def long_clip_hint(panel: Selection) -> str:
    """A Long-CLIP-L chosen but not loaded yet: say when the 246-token chunks start."""
    sel = effective_for_display(panel)
    wanted = sel.slot("clip_l").encoder
    if not wanted or "clip_l" not in (slot_names() or ("clip_l",)):
        return ""
    try:
        choice = sources.source(wanted, "clip_l")
    except Exception:
        return ""
    if choice.kind != "long-clip-l":
        return ""
    host = adapter()
    loaded = None
    if host is not None:
        try:
            loaded = host.status().get("slots", {}).get("clip_l", {}).get("encoder")
        except Exception:
            loaded = None
    if loaded == choice.label:
        return ""
    chunk = (choice.tower.positions or 248) - 2
    return tr("Long-CLIP: {n}-token chunks after the next generation", n=chunk)


def remembered_panel() -> Selection | None:
    """The panel's memory for the loaded checkpoint, when the option is on."""
    return memory.recall(checkpoint_key()) if memory.enabled() else None
