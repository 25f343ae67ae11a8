"""Translations of the extension's own texts, from ``localizations/<name>.json``.

A1111 1.10 and Forge 2 load every extension's ``localizations/<name>.json`` into one
``window.localization`` (``modules/localization.py``: the WebUI's own file first, then each
extension's, merged with ``dict.update``) and translate text nodes whose whole text is a key. That
covers static labels and settings. Texts the server builds (the recommendation line, the status line)
change after the page is translated, so they are translated here, from the same file, in the
language the user picked (``opts.localization``). Keys are the English texts; ``{name}`` fields are
filled after translation.
"""

from __future__ import annotations

import json
import os
import re
import threading
from typing import Any

LOCALIZATIONS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "localizations"
)

_lock = threading.Lock()
_loaded: dict[str, dict[str, str]] = {}


def current() -> str | None:
    """The WebUI's chosen localization ("ja_JP"), None for English or outside a WebUI."""
    try:
        from modules import shared
    except ImportError:
        return None
    name = getattr(getattr(shared, "opts", None), "localization", None)
    return name if isinstance(name, str) and name and name != "None" else None


def table(name: str) -> dict[str, str]:
    with _lock:
        if name not in _loaded:
            path = os.path.join(LOCALIZATIONS, f"{name}.json")
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
            except (OSError, ValueError):
                data = {}
            _loaded[name] = {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}
        return _loaded[name]


def tr(text: str, /, **fields: Any) -> str:
    """``text`` in the user's language (English when there is no translation), fields filled in."""
    name = current()
    template = table(name).get(text, text) if name else text
    try:
        return template.format(**fields) if fields else template
    except (KeyError, IndexError, ValueError):  # a broken translation must not hide the message
        return text.format(**fields) if fields else text


# the pieces of lines other layers build (the effective-layer line, host notes): pattern -> key
PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(?P<tower>CLIP-[LGH]) layer (?P<n>\d+)/(?P<total>\d+)$"), "{tower} layer {n}/{total}"),
    (re.compile(r"^Long-CLIP: (?P<n>\d+)-token chunks after the next generation$"),
     "Long-CLIP: {n}-token chunks after the next generation"),
    (re.compile(r"^(?P<model>\w+) uses only T5: clip skip has no effect$"), "{model} uses only T5: clip skip has no effect"),
)  # fmt: skip


def tr_line(line: str) -> str:
    """Translate a line made of " · "-separated parts (and "; "-separated notes), piece by piece."""
    if not current() or not line:
        return line

    def piece(text: str) -> str:
        for pattern, key in PATTERNS:
            match = pattern.match(text)
            if match:
                return tr(key, **match.groupdict())
        return tr(text)

    return " · ".join("; ".join(piece(note) for note in part.split("; ")) for part in line.split(" · "))
