"""``python -m te_switch``: inspect and convert encoder files, compare encoders and run a local page without a WebUI.

Nothing heavy is imported at the top: ``--help`` and argument errors answer before torch or diffusers load.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from te_switch.core.detect import TowerInfo

INSTALL_STANDALONE = 'pip install -e ".[standalone]" (in the te-switch folder)'
# what each diffusers-side command imports: module -> the package that provides it
NEEDS: dict[str, dict[str, str]] = {
    "compare": {
        "diffusers": "diffusers",
        "transformers": "transformers",
        "PIL": "pillow",
        "safetensors": "safetensors",
    },
    "ui": {
        "diffusers": "diffusers",
        "transformers": "transformers",
        "PIL": "pillow",
        "safetensors": "safetensors",
        "gradio": "gradio",
    },
}
CONVERT_DTYPE_HELP = "cast on write (default: as stored; fp8, scaled-fp8 and GGUF files are written as fp16)"


def _expand(paths: Sequence[str]) -> list[tuple[str, str | None]]:
    """(path, how to show it) per weight file; a folder's files are shown relative to the folder typed."""
    from te_switch.core.readers import iter_weight_files

    out: list[tuple[str, str | None]] = []
    for p in paths:
        if os.path.isdir(p):
            found = list(iter_weight_files(p))
            if not found:
                out.append((p, None))
            out.extend((f, os.path.relpath(f, p)) for f in found)
        else:
            out.append((p, os.path.basename(p)))
    return out


def check_values(info: TowerInfo) -> None:
    """Full read of one tower: conversion must succeed and every weight must be finite."""
    from te_switch.core.convert import first_non_finite, load_tower
    from te_switch.core.errors import TESwitchError, one_line
    from te_switch.core.readers import open_file

    if not info.usable:
        return
    try:
        with open_file(info.path) as src:
            bad = first_non_finite(load_tower(src, info, lazy=True))
    except TESwitchError as e:
        info.error = one_line(e)
        return
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        info.error = f"{os.path.basename(info.path)}: {one_line(e)}"
        return
    if bad:
        info.error = f"{os.path.basename(info.path)}: tensor {bad} holds NaN or Inf values"


def cmd_inspect(args: argparse.Namespace) -> int:
    from te_switch.core.detect import TowerInfo, inspect_path
    from te_switch.standalone.table import format_table, tower_row

    rows: list[list[str]] = []
    failed = False
    for path, shown in _expand(args.paths):
        if shown is None:
            found = [TowerInfo(path, error=f"no weight files in {path}")]
            shown = path
        else:
            found = inspect_path(path)
        if not args.headers_only:
            for t in found:
                check_values(t)
        failed |= any(t.error for t in found)
        rows.extend(tower_row(t, name=shown) for t in found)
        if args.json:
            for t in found:
                print(json.dumps(t.to_json()), flush=True)
    if not args.json:
        print(format_table(rows))
    return 1 if failed else 0


def _convertible(t: TowerInfo) -> bool:
    """Every tower the readers understand converts, a size without a name (e.g. a T5 of d_model 1024) included."""
    return t.error is None and t.layout is not None and t.kind != "not-a-text-encoder"


def _tower_name(t: TowerInfo) -> str:
    return f"{t.tower} ({t.kind})" if t.tower else str(t.kind)


def _check_output(src_path: str, out_path: str, overwrite: bool) -> str | None:
    """Why ``out_path`` cannot be written, in the user's terms (None: it can)."""
    if os.path.isdir(out_path):
        return f"{out_path}: is a folder; give the output file's name"
    folder = os.path.dirname(out_path) or "."
    if not os.path.isdir(folder):
        return f"{out_path}: the folder {folder} does not exist"
    if os.path.exists(out_path):
        if os.path.exists(src_path) and os.path.samefile(src_path, out_path):
            return f"{out_path}: refusing to overwrite the input file"
        if not overwrite:
            return f"{out_path}: already exists (use --overwrite)"
    return None


def cmd_convert(args: argparse.Namespace) -> int:
    from te_switch.core.convert import first_non_finite, load_tower, save_canonical
    from te_switch.core.detect import detect
    from te_switch.core.errors import TESwitchError, one_line
    from te_switch.core.readers import open_file
    from te_switch.core.tensors import PRECISIONS

    src_path, out_path = args.input, args.output
    problem = _check_output(src_path, out_path, args.overwrite)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        with open_file(src_path) as src:
            found = detect(src)
            towers = [t for t in found if _convertible(t)]
            if not towers:
                what = "; ".join(t.note for t in found if t.note) or "no text-encoder tower"
                print(f"error: {src_path}: nothing to convert ({what})", file=sys.stderr)
                return 1
            if args.tower:
                matching = [t for t in towers if args.tower in (t.tower, t.kind)]
                if not matching:
                    names = ", ".join(_tower_name(t) for t in towers)
                    print(f"error: {src_path}: no tower {args.tower!r}; it has {names}", file=sys.stderr)
                    return 2
                towers = matching
            if len(towers) > 1:
                names = ", ".join(_tower_name(t) for t in towers)
                print(f"error: {src_path}: holds several towers ({names}); pick one with --tower", file=sys.stderr)
                return 2
            tower = towers[0]
            sd = load_tower(src, tower, check=tower.usable)  # a size without a name converts all the same
            bad = first_non_finite(sd)
            if bad:
                print(f"error: {src_path}: tensor {bad} holds NaN or Inf values", file=sys.stderr)
                return 1
            dtype = PRECISIONS[args.dtype] if args.dtype else None
            if dtype is None and tower.quant in ("fp8", "scaled-fp8", "gguf"):
                dtype = PRECISIONS["fp16"]  # expand compressed files to the usual distribution dtype
            kind = tower.kind if tower.usable else f"{tower.family}"
            meta = {"te_switch.source": os.path.basename(src_path), "te_switch.kind": kind or ""}
            save_canonical(out_path, sd, dtype=dtype, metadata=meta)
    except TESwitchError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    what = tower.kind if tower.usable else f"{tower.family} tower ({tower.note})"
    print(f"{out_path}: {what}, {len(sd)} tensors, canonical HF names")
    return 0


def missing_packages(command: str) -> list[str]:
    """The packages ``command`` needs that this Python lacks."""
    return [pkg for module, pkg in NEEDS[command].items() if importlib.util.find_spec(module) is None]


def _standalone(command: str, args: argparse.Namespace) -> int:
    """Run a diffusers-side command: dependencies and arguments checked before anything heavy loads,
    offline, quiet libraries, user errors as one line."""
    missing = missing_packages(command)
    if missing:
        print(f"error: {command} needs {', '.join(missing)}, not installed: {INSTALL_STANDALONE}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    from te_switch.core.errors import TESwitchError, one_line

    try:
        if command == "compare":
            from te_switch.standalone import compare

            compare.check_arguments(args)  # before the model: a typo answers at once
        elif not 0 <= args.port <= 65535:
            raise ValueError(f"--port must be 0-65535, not {args.port}")
        from te_switch.standalone.pipeline import check_model

        check_model(args.model, args.config)
        if command == "compare":
            return compare.main(args)
        from te_switch.standalone import page

        return page.main(args)
    except (TESwitchError, ValueError, OSError) as e:
        print(f"error: {one_line(e) if isinstance(e, TESwitchError) else e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def cmd_compare(args: argparse.Namespace) -> int:
    return _standalone("compare", args)


def cmd_ui(args: argparse.Namespace) -> int:
    return _standalone("ui", args)


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
    parser = argparse.ArgumentParser(prog="python -m te_switch", description=__doc__.split("\n\n")[0])
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
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], help=CONVERT_DTYPE_HELP)
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
    p.add_argument(
        "--clip-skip",
        help="comma-separated: Auto or 1-12 (default: Auto, 1, 2, 3 without the one Auto already is, "
        "e.g. Auto, 2, 3 on SD1); a value that uses the same layers as an earlier one is shown, not rendered again",
    )
    p.add_argument("--seeds", default="1", help="comma-separated seeds (default: 1)")
    p.add_argument("--steps", type=int, help="sampling steps (default: 20; 6 on the demo)")
    p.add_argument("--size", type=int, help="image side in pixels, a multiple of 8 (default: the model's)")
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
