"""The ``inspect`` table: one row per tower (the CLI prints it, the local page shows it)."""

from __future__ import annotations

import os

from te_switch.core.detect import TowerInfo

HEAD = ["file", "tower", "kind", "layout", "layers", "pos", "vocab", "dtypes", "params", "quant", "notes"]


def human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def tower_row(t: TowerInfo, name: str | None = None) -> list[str]:
    """One row, in :data:`HEAD`'s order; ``name``: how to show the file (default: its base name)."""
    shape = f"{t.layers}x{t.width}" if t.layers and t.width else ""
    what = t.error or t.note or ", ".join(t.features)
    return [
        name or os.path.basename(t.path),
        t.tower or "",
        t.kind or "error",
        t.layout or "",
        shape,
        str(t.positions or ""),
        str(t.vocab or ""),
        ",".join(t.dtypes),
        human(t.params) if t.params else "",
        t.quant or "",
        what,
    ]


def format_table(rows: list[list[str]]) -> str:
    """The rows under :data:`HEAD`, columns padded (the notes column last, unpadded)."""
    table = [HEAD, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(HEAD) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1] for r in table)
