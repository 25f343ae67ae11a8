"""Where the standalone tools keep what they make: ``$TE_SWITCH_CACHE`` or ``~/.cache/te_switch``."""

from __future__ import annotations

import os


def cache_root() -> str:
    """``$TE_SWITCH_CACHE`` or ``~/.cache/te_switch``."""
    return os.path.abspath(os.path.expanduser(os.environ.get("TE_SWITCH_CACHE") or "~/.cache/te_switch"))
