"""Fake of modules/prompt_parser.py: attention parsing (weights, BREAK, escapes) exactly as A1111
parses it, and the conditioning entry points without prompt editing (``[a:b:0.5]``) or ``AND``:
every prompt is one schedule that lasts all steps."""

from __future__ import annotations

import re
from collections import namedtuple

import torch

# one token of the attention syntax per match; group 1 is the number of a "(text:1.3)" closer
re_attention = re.compile(
    r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:",
    re.X,
)
re_break = re.compile(r"\s*\bBREAK\b\s*", re.S)

ROUND = 1.1
SQUARE = 1 / 1.1


def parse_prompt_attention(text):
    """[[text, weight], ...]; ``BREAK`` becomes ``['BREAK', -1]``; runs of equal weight merge."""
    pieces: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for m in re_attention.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(pieces))
        elif token == "[":
            open_square.append(len(pieces))
        elif weight is not None and open_round:
            scale_from(open_round.pop(), float(weight))
        elif token == ")" and open_round:
            scale_from(open_round.pop(), ROUND)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), SQUARE)
        else:
            for i, part in enumerate(re_break.split(token)):
                if i:
                    pieces.append(["BREAK", -1])
                pieces.append([part, 1.0])

    for start in open_round:
        scale_from(start, ROUND)
    for start in open_square:
        scale_from(start, SQUARE)

    if not pieces:
        pieces = [["", 1.0]]

    merged = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return merged


class SdConditioning(list):
    """A list of prompts with the image size and polarity the SDXL conditioner reads."""

    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__()
        self.extend(prompts)
        if copy_from is None:
            copy_from = prompts
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, "is_negative_prompt", False)
        self.width = width or getattr(copy_from, "width", None)
        self.height = height or getattr(copy_from, "height", None)


ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])
ComposableScheduledPromptConditioning = namedtuple(
    "ComposableScheduledPromptConditioning", ["schedules", "weight"], defaults=[1.0]
)
MulticondLearnedConditioning = namedtuple("MulticondLearnedConditioning", ["shape", "batch"])


def _row(conds, i):
    if isinstance(conds, dict):
        return {k: v[i] for k, v in conds.items()}
    return conds[i]


def get_learned_conditioning(
    model, prompts: SdConditioning | list[str], steps, hires_steps=None, use_old_scheduling=False
):
    """One ``[ScheduledPromptConditioning(steps, cond)]`` per prompt (the batch is encoded at once)."""
    with torch.no_grad():
        conds = model.get_learned_conditioning(prompts)
    return [[ScheduledPromptConditioning(steps, _row(conds, i))] for i in range(len(prompts))]


def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    learned = get_learned_conditioning(model, prompts, steps, hires_steps, use_old_scheduling)
    batch = [[ComposableScheduledPromptConditioning(schedules)] for schedules in learned]
    return MulticondLearnedConditioning(shape=(len(prompts),), batch=batch)
