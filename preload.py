"""Command-line flags, added by the WebUI before it parses its arguments."""

from __future__ import annotations

import argparse
import os


def _folder(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def preload(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--te-switch-dir",
        action="append",
        type=_folder,
        default=None,  # not []: argparse would append into one shared default list on every parse
        metavar="DIR",
        help="TE Switch: add a folder of text-encoder files to the 'Extra encoder folders' setting "
        "(repeat for several); models/CLIP, models/text_encoder and models/text_encoders are always scanned",
    )
    # removed (precision is chosen per slot): still accepted, so a command line that has it starts;
    # ignored, with one line at start-up saying so (te_switch.webui.options.register)
    parser.add_argument("--te-switch-precision", default=None, help=argparse.SUPPRESS)
