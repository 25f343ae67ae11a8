"""``python -m te_switch``: inspect and convert encoder files, compare encoders and run a local page without a WebUI."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence

from te_switch.core.detect import TowerInfo, detect, inspect_path
from te_switch.core.errors import TESwitchError, one_line
from te_switch.core.readers import iter_weight_files, open_file
from te_switch.core.tensors import PRECISIONS
from te_switch.standalone.table import format_table, tower_row


def _expand(paths: Sequence[str]) -> list[str]:
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = list(iter_weight_files(p))
            out.extend(found if found else [p])
        else:
            out.append(p)
    return out


def check_values(info: TowerInfo) -> None:
    """Full read of one tower: conversion must succeed and every weight must be finite."""
    from te_switch.core.convert import first_non_finite, load_tower

    if not info.usable:
        return
    try:
        with open_file(info.path) as src:
            bad = first_non_finite(load_tower(src, info))
    except TESwitchError as e:
        info.error = one_line(e)
        return
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        info.error = f"{os.path.basename(info.path)}: {one_line(e)}"
        return
    if bad:
        info.error = f"{os.path.basename(info.path)}: tensor {bad} holds NaN or Inf values"


def cmd_inspect(args: argparse.Namespace) -> int:
    towers: list[TowerInfo] = []
    for path in _expand(args.paths):
        found = inspect_path(path)
        if not args.headers_only:
            for t in found:
                check_values(t)
        towers.extend(found)
        if args.json:
            for t in found:
                print(json.dumps(t.to_json()), flush=True)
    if not args.json:
        print(format_table([tower_row(t) for t in towers]))
    return 1 if any(t.error for t in towers) else 0


def cmd_convert(args: argparse.Namespace) -> int:
    from te_switch.core.convert import load_tower, save_canonical

    src_path, out_path = args.input, args.output
    if os.path.exists(out_path):
        if os.path.exists(src_path) and os.path.samefile(src_path, out_path):
            print(f"error: {out_path}: refusing to overwrite the input file", file=sys.stderr)
            return 2
        if not args.overwrite:
            print(f"error: {out_path}: already exists (use --overwrite)", file=sys.stderr)
            return 2
    try:
        with open_file(src_path) as src:
            towers = [t for t in detect(src) if t.usable]
            if args.tower:
                towers = [t for t in towers if t.tower == args.tower or t.kind == args.tower]
            if not towers:
                what = f" matching {args.tower!r}" if args.tower else ""
                print(f"error: {src_path}: no usable text-encoder tower{what}", file=sys.stderr)
                return 1
            if len(towers) > 1:
                names = ", ".join(t.tower or t.kind or "?" for t in towers)
                print(f"error: {src_path}: holds several towers ({names}); pick one with --tower", file=sys.stderr)
                return 2
            tower = towers[0]
            sd = load_tower(src, tower)
            from te_switch.core.convert import first_non_finite

            bad = first_non_finite(sd)
            if bad:
                print(f"error: {src_path}: tensor {bad} holds NaN or Inf values", file=sys.stderr)
                return 1
            dtype = PRECISIONS[args.dtype] if args.dtype else None
            if dtype is None and tower.quant in ("fp8", "scaled-fp8", "gguf"):
                dtype = PRECISIONS["fp16"]  # expand compressed files to the usual distribution dtype
            meta = {"te_switch.source": os.path.basename(src_path), "te_switch.kind": tower.kind or ""}
            save_canonical(out_path, sd, dtype=dtype, metadata=meta)
    except TESwitchError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    print(f"{out_path}: {tower.kind}, {len(sd)} tensors, canonical HF names")
    return 0


def _standalone(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a diffusers-side command: offline, quiet libraries, user errors as one line."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        return run(args)
    except (TESwitchError, ValueError, OSError) as e:
        print(f"error: {one_line(e) if isinstance(e, TESwitchError) else e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def cmd_compare(args: argparse.Namespace) -> int:
    from te_switch.standalone import compare

    return _standalone(compare.main, args)


def cmd_ui(args: argparse.Namespace) -> int:
    from te_switch.standalone import page

    return _standalone(page.main, args)


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        help="a diffusers model folder or a single-file checkpoint (SD1.x as is; others with --config) (default: the demo)",
    )
    p.add_argument(
        "--config", help="for a single-file --model other than SD1.x: a local diffusers folder of the same architecture"
    )
    p.add_argument(
        "--encoders-dir", action="append", metavar="DIR", help="a folder of encoder files to offer (repeatable)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m te_switch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="say what encoder files hold (folders are listed)")
    p.add_argument("paths", nargs="+", help="files or folders")
    p.add_argument("--json", action="store_true", help="one JSON object per tower per line")
    p.add_argument("--headers-only", action="store_true", help="skip reading the weights (no NaN/Inf check)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("convert", help="write one tower as a plain canonical safetensors file")
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--tower", help="which tower of a whole checkpoint (clip_l, clip_g, clip_h, t5xxl) or a kind")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help="cast on write (default: as stored)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (never the input)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "compare",
        help="render a labelled grid: encoders x clip skip (x seeds) on a diffusers model (default: the demo)",
    )
    _model_arguments(p)
    p.add_argument(
        "--prompt",
        default="a lighthouse on a cliff at dusk, oil painting, highly detailed",
        help="the prompt every cell renders (default: %(default)r)",
    )
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument(
        "--encoders",
        help="comma-separated: Built-in, encoder file names or paths (default: Built-in + every fitting file)",
    )
    p.add_argument("--clip-skip", default="auto,1,2", help="comma-separated: Auto or 1-12 (default: auto,1,2)")
    p.add_argument("--seeds", default="1", help="comma-separated seeds (default: 1)")
    p.add_argument("--steps", type=int, help="sampling steps (default: 20; 10 on the demo)")
    p.add_argument("--size", type=int, help="image side in pixels (default: the model's)")
    p.add_argument("--guidance", type=float, help="CFG scale (default: 7; Flux 3.5)")
    p.add_argument("--out", default="te_switch_compare.png", help="the grid PNG to write")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "ui", help="a local Gradio page with the TE Switch panel on a diffusers model (default: the demo)"
    )
    _model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7870, help="port (default: 7870; 0 = any free port)")
    p.set_defaults(func=cmd_ui)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
