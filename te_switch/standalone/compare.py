"""``python -m te_switch compare``: one labelled grid of encoders × clip-skip values (× seeds).

Rows are encoders, columns are clip-skip values repeated per seed. The PNG carries every cell's
settings as WebUI infotext: ``parameters`` holds the first cell's (what PNG Info shows), and
``te_switch.grid`` a JSON document with the layout and, per cell, its infotext and timings
(``core.infotext.parse_infotext`` reads each back).
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from te_switch.core.errors import TESwitchError
from te_switch.core.selection import BUILT_IN, KINDS_BY_SLOT, SLOT_LABELS, Selection, SlotChoice, parse_clip_skip

if TYPE_CHECKING:  # torch and diffusers load only once the arguments are known to be good
    from te_switch.hosts.diffusers import DiffusersAdapter
    from te_switch.standalone.generate import GenerationResult
    from te_switch.standalone.model import Model

GRID_KEY = "te_switch.grid"
GRID_VERSION = 1
LABEL_WIDTH = 260
HEADER_HEIGHT = 46
PAD = 4
# the clip skips compare shows when none are given; the one Auto already is is dropped (1 on SD1, 2 on SDXL)
DEFAULT_CLIP_SKIPS: tuple[int | None, ...] = (None, 1, 2, 3)


# ---------------------------------------------------------------------------------------------
# parsing the axes


def parse_clip_skips(text: str | None) -> list[int | None] | None:
    """'auto,1,2' -> [None, 1, 2]; None -> None (the default columns); one-line ValueError on anything else."""
    if text is None:
        return None
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise ValueError("--clip-skip needs at least one value (Auto or 1-12)")
    return [parse_clip_skip(v) for v in values]


def check_arguments(args: Any) -> None:
    """Every value ``compare`` takes that can be checked without the model (one-line ValueError)."""
    parse_clip_skips(args.clip_skip)
    parse_seeds(args.seeds)
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be 1 or more, not {args.steps}")
    if args.size is not None and (args.size < 64 or args.size % 8):
        raise ValueError(f"--size must be a multiple of 8, at least 64, not {args.size}")
    if args.guidance is not None and not args.guidance >= 0:
        raise ValueError(f"--guidance must be 0 or more, not {args.guidance}")
    folder = os.path.dirname(os.path.abspath(args.out))
    if os.path.isdir(args.out):
        raise ValueError(f"--out {args.out}: is a folder; give the PNG's file name")
    if not os.path.isdir(folder) and os.path.exists(folder):
        raise ValueError(f"--out {args.out}: {folder} is not a folder")


def distinct_clip_skips(adapter: DiffusersAdapter, candidates: Sequence[int | None]) -> list[int | None]:
    """``candidates`` without those that use the same layers as an earlier one (the default columns)."""
    kept: list[int | None] = []
    for n in candidates:
        if _same_as(adapter, n, kept) is None:
            kept.append(n)
    return kept


def _same_as(adapter: DiffusersAdapter, clip_skip: int | None, earlier: Sequence[int | None]) -> int | None:
    """The index in ``earlier`` of a clip skip with the very same plan (layer and final norm per tower), else None."""
    plans = adapter.plans(Selection(clip_skip=clip_skip))
    for i, other in enumerate(earlier):
        if adapter.plans(Selection(clip_skip=other)) == plans:
            return i
    return None


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be whole numbers separated by commas, not {text!r}") from None
    if not seeds:
        raise ValueError("--seeds needs at least one seed")
    return seeds


def parse_encoders(text: str | None, model: Model) -> list[str]:
    """Encoder names ('Built-in', library labels, paths); default: Built-in + every compatible file."""
    if text:
        return [v.strip() for v in text.split(",") if v.strip()]
    names = [BUILT_IN]
    if model.library is not None:
        slots = set(model.adapter.slot_names())
        names += [c.label for c in model.library.choices() if _slot_of_kind(c.kind) in slots]
    return names


def _slot_of_kind(kind: str | None) -> str | None:
    return next((slot for slot, kinds in KINDS_BY_SLOT.items() if kind in kinds), None)


def selections(
    adapter: DiffusersAdapter, encoders: Sequence[str], clip_skips: Sequence[int | None]
) -> list[list[Selection]]:
    """One Selection per (encoder, clip skip); every encoder is checked (header, kind) first."""
    rows = []
    for name in encoders:
        slots: dict[str, SlotChoice] = {}
        if name != BUILT_IN:
            slot = adapter.resolver.slot_of(name)  # type: ignore[attr-defined]
            if slot not in adapter.slot_names():
                raise TESwitchError(f"{name}: a {SLOT_LABELS[slot]} encoder, but this model has no {SLOT_LABELS[slot]}")
            adapter.resolver(slot, name)  # resolves the file, reads its header: fails before any image
            slots[slot] = SlotChoice(name)
        rows.append([Selection(clip_skip=n, slots=slots) for n in clip_skips])
    return rows


# ---------------------------------------------------------------------------------------------
# running


@dataclass
class Cell:
    row: int
    col: int
    encoder: str
    clip_skip: int | None
    seed: int
    result: GenerationResult
    same_as: int | None = None  # the column whose image this cell shows (identical by construction)


@dataclass
class Grid:
    prompt: str
    negative: str
    model: str
    note: str
    rows: list[str]
    columns: list[str]
    cells: list[Cell] = field(default_factory=list)
    seconds: float = 0.0


def _skip_name(clip_skip: int | None) -> str:
    return "Auto" if clip_skip is None else str(clip_skip)


def column_label(
    adapter: DiffusersAdapter, clip_skip: int | None, seed: int, seeds: int, same_as: str | None = None
) -> str:
    """The column's head: its clip skip (and seed), then the layers it uses, or the column it repeats."""
    layers = adapter.describe(Selection(clip_skip=clip_skip))
    head = f"Clip skip {_skip_name(clip_skip)}"
    # the effective layers without the family name: "CLIP-L layer 11/12"
    detail = " · ".join(layers.split(" · ")[1:]) if " · " in layers else layers
    if same_as is not None:
        detail = f"= Clip skip {same_as}: same layers, not rendered again"
    return f"{head}{f' · seed {seed}' if seeds > 1 else ''}\n{detail}"


def run(
    model: Model,
    *,
    prompt: str,
    negative: str = "",
    encoders: Sequence[str],
    clip_skips: Sequence[int | None],
    seeds: Sequence[int],
    steps: int,
    size: int | None = None,
    guidance: float | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> Grid:
    """Generate every cell; encoders are the outer loop so each file is swapped in once.

    A clip skip with the same plan as an earlier column (e.g. 1 beside Auto on SD1) is not rendered
    again: its cells show the earlier column's image, and its label says so.
    """
    from te_switch.standalone.generate import generate

    adapter = model.adapter
    plan = selections(adapter, encoders, clip_skips)
    same = [_same_as(adapter, n, clip_skips[:i]) for i, n in enumerate(clip_skips)]
    twins = [None if j is None else _skip_name(clip_skips[j]) for j in same]
    columns = [column_label(adapter, n, s, len(seeds), twins[i]) for s in seeds for i, n in enumerate(clip_skips)]
    grid = Grid(prompt, negative, model.name, model.note, [_row_label(adapter, e) for e in encoders], columns)
    rendered = sum(j is None for j in same)
    total = len(encoders) * len(seeds) * rendered
    started = time.perf_counter()
    done = 0
    for r, (name, row) in enumerate(zip(encoders, plan, strict=True)):
        for s_index, seed in enumerate(seeds):
            results: list[GenerationResult] = []
            for n_index, (clip_skip, selection) in enumerate(zip(clip_skips, row, strict=True)):
                col = s_index * len(clip_skips) + n_index
                if same[n_index] is not None:
                    results.append(results[same[n_index]])  # identical by construction: shown, not rendered
                    twin_col = s_index * len(clip_skips) + same[n_index]
                    grid.cells.append(Cell(r, col, name, clip_skip, seed, results[-1], same_as=twin_col))
                    continue
                if progress:
                    progress(done, total, f"{name} · {columns[col].splitlines()[0]}")
                result = generate(
                    adapter, selection, prompt, negative, seed=seed, steps=steps, size=size, guidance=guidance,
                    model_name=model.name,
                )  # fmt: skip
                results.append(result)
                grid.cells.append(Cell(r, col, name, clip_skip, seed, result))
                done += 1
    adapter.apply(Selection())  # leave the pipeline as it came
    if progress:
        progress(done, total, "done")
    grid.seconds = time.perf_counter() - started
    return grid


def _row_label(adapter: DiffusersAdapter, name: str) -> str:
    if name == BUILT_IN:
        return f"{BUILT_IN}\n(the model's own)"
    try:
        tower = adapter.resolver(adapter.resolver.slot_of(name), name).tower  # type: ignore[attr-defined]
        detail = f"{tower.kind} · {tower.layout} · {'/'.join(tower.dtypes)}"
    except TESwitchError:
        detail = ""
    return f"{os.path.basename(name)}\n{detail}"


# ---------------------------------------------------------------------------------------------
# the picture


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def render(grid: Grid) -> Any:
    """The grid image with its labels (PIL)."""
    from PIL import Image, ImageDraw

    first = grid.cells[0].result.image
    cell_w, cell_h = first.size
    n_rows, n_cols = len(grid.rows), len(grid.columns)
    small, big = _font(13), _font(15)
    title_lines = [f"TE Switch compare · {grid.model}", f"Prompt: {grid.prompt}"]
    if grid.negative:
        title_lines.append(f"Negative: {grid.negative}")
    width = LABEL_WIDTH + n_cols * (cell_w + PAD) + PAD
    chars = max(40, width // 8)
    wrapped = [w for line in title_lines for w in textwrap.wrap(line, chars)]
    if grid.note:
        wrapped += textwrap.wrap(grid.note, chars)
    title_h = 10 + 19 * len(wrapped)
    height = title_h + HEADER_HEIGHT + n_rows * (cell_h + PAD) + PAD
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = 6
    for i, line in enumerate(wrapped):
        is_note = grid.note and i >= len(wrapped) - len(textwrap.wrap(grid.note, chars))
        draw.text((8, y), line, fill=(160, 40, 20) if is_note else "black", font=big)
        y += 19
    for c, label in enumerate(grid.columns):
        x = LABEL_WIDTH + PAD + c * (cell_w + PAD)
        for j, line in enumerate(label.splitlines()):
            draw.text((x + 2, title_h + 4 + j * 17), _fit(draw, line, cell_w, small), fill="black", font=small)
    for r, label in enumerate(grid.rows):
        y0 = title_h + HEADER_HEIGHT + r * (cell_h + PAD)
        for j, line in enumerate(label.splitlines()):
            draw.text((8, y0 + 4 + j * 17), _fit(draw, line, LABEL_WIDTH - 12, small), fill="black", font=small)
    for cell in grid.cells:
        x, y = _origin(cell, title_h, cell_w, cell_h)
        canvas.paste(cell.result.image, (x, y))
    canvas.info["te_switch_title_height"] = title_h
    return canvas


def _origin(cell: Cell, title_h: int, cell_w: int, cell_h: int) -> tuple[int, int]:
    return LABEL_WIDTH + PAD + cell.col * (cell_w + PAD), title_h + HEADER_HEIGHT + cell.row * (cell_h + PAD)


def _fit(draw: Any, text: str, width: int, font: Any) -> str:
    while text and draw.textlength(text, font=font) > width:
        text = text[:-2] + "…" if len(text) > 2 else ""
    return text


def grid_document(grid: Grid, image: Any) -> dict[str, Any]:
    """The JSON stored in the PNG: layout (where each cell is) and every cell's settings."""
    cell_w, cell_h = grid.cells[0].result.image.size
    title_h = int(image.info.get("te_switch_title_height", 0))
    return {
        "version": GRID_VERSION,
        "model": grid.model,
        "note": grid.note,
        "rows": grid.rows,
        "columns": grid.columns,
        "cell_size": [cell_w, cell_h],
        "seconds": round(grid.seconds, 3),
        "cells": [
            {
                "row": c.row,
                "col": c.col,
                "box": [*_origin(c, title_h, cell_w, cell_h), cell_w, cell_h],
                "infotext": c.result.infotext,
                "same_as_col": c.same_as,
                "timings": {k: round(v, 4) for k, v in c.result.timings.items()},
                "warnings": c.result.warnings,
            }
            for c in grid.cells
        ],
    }


def save(grid: Grid, path: str) -> Any:
    """Render and write the PNG with its text chunks; returns the image.

    A grid of one cell is that image itself, written as the local page serves it (same bytes).
    """
    from te_switch.standalone.generate import save_png, save_result

    if len(grid.cells) == 1:
        save_result(grid.cells[0].result, path)
        return grid.cells[0].result.image
    image = render(grid)
    text = {"parameters": grid.cells[0].result.infotext}
    text[GRID_KEY] = json.dumps(grid_document(grid, image), ensure_ascii=False)
    save_png(image, path, text)
    return image


# ---------------------------------------------------------------------------------------------
# command line


def timing_table(grid: Grid) -> str:
    head = f"{'cell':<6} {'encoder':<34} {'clip skip':<9} {'seed':>6} {'swap':>8} {'encode':>8} {'generate':>9}"
    lines = [head]
    for c in grid.cells:
        t = c.result.timings
        n = _skip_name(c.clip_skip)
        if c.same_as is not None:
            lines.append(f"r{c.row + 1}c{c.col + 1:<3} {os.path.basename(c.encoder)[:34]:<34} {n:<9} {c.seed:>6} "
                         f"= r{c.row + 1}c{c.same_as + 1} (same layers, not rendered again)")  # fmt: skip
            continue
        lines.append(
            f"r{c.row + 1}c{c.col + 1:<3} {os.path.basename(c.encoder)[:34]:<34} {n:<9} {c.seed:>6} "
            f"{t['swap']:>7.3f}s {t['encode']:>7.3f}s {t['generate']:>8.2f}s"
        )
    return "\n".join(lines)


def _progress_bar() -> Callable[[int, int, str], None]:
    """A one-line progress bar on stderr (redrawn in place on a terminal)."""
    tty = sys.stderr.isatty()
    started = time.perf_counter()

    def show(done: int, total: int, what: str) -> None:
        filled = int(24 * done / max(total, 1))
        bar = "#" * filled + "-" * (24 - filled)
        line = f"[{bar}] {done}/{total} {time.perf_counter() - started:6.1f}s  {what}"
        if tty:
            sys.stderr.write("\r" + line[:120].ljust(120) + ("\n" if done == total else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    return show


def main(args: Any) -> int:
    """The ``compare`` subcommand (``args`` from the CLI parser)."""
    from te_switch.standalone.demo import DEMO_STEPS
    from te_switch.standalone.model import open_model

    check_arguments(args)
    clip_skips = parse_clip_skips(args.clip_skip)
    seeds = parse_seeds(args.seeds)
    model = open_model(args.model, args.config, args.encoders_dir or [])
    encoders = parse_encoders(args.encoders, model)
    if clip_skips is None:
        clip_skips = distinct_clip_skips(model.adapter, DEFAULT_CLIP_SKIPS)
    steps = args.steps or (DEMO_STEPS if model.is_demo else 20)
    if model.is_demo:
        print(f"note: {model.note}", file=sys.stderr)
    grid = run(
        model,
        prompt=args.prompt,
        negative=args.negative or "",
        encoders=encoders,
        clip_skips=clip_skips,
        seeds=seeds,
        steps=steps,
        size=args.size,
        guidance=args.guidance,
        progress=_progress_bar(),
    )
    save(grid, args.out)
    print(timing_table(grid))
    for cell in grid.cells:
        for warning in cell.result.warnings:
            print(f"warning: r{cell.row + 1}c{cell.col + 1}: {warning}", file=sys.stderr)
    rendered = sum(c.same_as is None for c in grid.cells)
    shown = f"{rendered} images" if rendered == len(grid.cells) else f"{rendered} images rendered (the rest identical)"
    print(
        f"{args.out}: {len(grid.rows)} encoders x {len(grid.columns)} columns = {len(grid.cells)} cells, "
        f"{shown} in {grid.seconds:.1f} s"
    )
    return 0
