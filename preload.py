"""Command-line flags, added by the WebUI before it parses its arguments."""

from __future__ import annotations

import argparse
import os

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def _folder(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def preload(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--te-switch-dir",
        action="append",
        type=_folder,
        default=None,  # not []: argparse would append into one shared default list on every parse
        metavar="DIR",
        help="TE Switch: an extra folder of text-encoder files (repeat for several); "
        "models/CLIP, models/text_encoder and models/text_encoders are always scanned",
    )
    parser.add_argument(
        "--te-switch-precision",
        choices=PRECISIONS,
        default=None,
        help="TE Switch: precision for swapped text encoders whose precision is Auto (default: the WebUI's dtype)",
    )
