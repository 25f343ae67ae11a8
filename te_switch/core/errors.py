"""Errors that reach users as one line: the file (or slot) and what was wrong."""

from __future__ import annotations

import os


class TESwitchError(Exception):
    """Base class. ``str(err)`` is a complete one-line message meant for a user."""


class BadFileError(TESwitchError):
    """A file cannot be read as text-encoder weights (truncated, malformed, unsafe...)."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{os.path.basename(self.path) or self.path}: {reason}")


class IncompatibleError(TESwitchError):
    """A readable encoder that does not fit where it was asked to go."""


def one_line(err: BaseException) -> str:
    """A single line for any exception: ours verbatim, others with their type."""
    text = str(err) if isinstance(err, TESwitchError) else f"{type(err).__name__}: {err}"
    return " ".join(text.split())
