"""The infotext codec: the keys TE Switch writes and the WebUIs' ``parameters`` text format.

One place for what both the WebUI glue (``webui/infotext.py``) and the standalone tools write and
read, so a PNG made by one pastes into the other:

* ``Clip skip: N`` — the WebUI's own key, written whenever clip skip is explicit (N=1 too);
* ``Clip skip scope: CLIP-L only|CLIP-G only`` — only when not "both";
* ``TE CLIP-L: name [short hash]`` (``TE CLIP-G``, ``TE CLIP-H``, ``TE T5-XXL``) per swapped slot;
* ``TE CLIP-L precision: fp32`` when the slot's precision is not Auto.

The text itself is ``prompt\\nNegative prompt: …\\nKey: value, Key: "quoted, value"`` as A1111
writes it (``modules/infotext_utils.py``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from te_switch.core.selection import ALL_SLOTS, SCOPE_LABELS, SLOT_LABELS, Selection

CLIP_SKIP = "Clip skip"
SCOPE = "Clip skip scope"
PROMPT = "Prompt"
NEGATIVE = "Negative prompt"
# A1111's infotext parameter pattern (modules/infotext_utils.py re_param_code)
PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_HASHED = re.compile(r"^(?P<name>.*\S)\s*\[(?P<hash>[0-9a-fA-F]+)\]$")


def encoder_key(slot: str) -> str:
    """``TE CLIP-L`` …: the slot's encoder."""
    return f"TE {SLOT_LABELS[slot]}"


def precision_key(slot: str) -> str:
    """``TE CLIP-L precision`` …: the slot's precision when not Auto."""
    return f"TE {SLOT_LABELS[slot]} precision"


OUR_KEYS = (SCOPE, *(k for slot in ALL_SLOTS for k in (encoder_key(slot), precision_key(slot))))


# ---------------------------------------------------------------------------------------------
# our entries


def encoder_value(label: str, short_hash: str | None) -> str:
    """``name [short hash]`` (just the name when the hash is unknown)."""
    return f"{label} [{short_hash}]" if short_hash else label


def split_encoder_value(value: str) -> tuple[str, str | None]:
    """``name [hash]`` -> (name, hash); a value without a hash -> (value, None)."""
    match = _HASHED.match(value.strip())
    return (match["name"], match["hash"].lower()) if match else (value.strip(), None)


def clip_skip_entries(selection: Selection) -> dict[str, Any]:
    """``Clip skip`` (and its scope) for an explicit clip skip; nothing for Auto."""
    if selection.clip_skip is None:
        return {}
    out: dict[str, Any] = {CLIP_SKIP: selection.clip_skip}
    if selection.scope != "both":
        out[SCOPE] = SCOPE_LABELS[selection.scope]
    return out


def slot_entries(slot: str, encoder: str | None, precision: str) -> dict[str, Any]:
    """One slot's entries: ``encoder`` is the written value (see :func:`encoder_value`), None = Built-in."""
    out: dict[str, Any] = {}
    if encoder:
        out[encoder_key(slot)] = encoder
    if precision != "auto":
        out[precision_key(slot)] = precision
    return out


# ---------------------------------------------------------------------------------------------
# the text


def quote(value: Any) -> str:
    """A value as A1111 writes it: JSON-quoted when it holds a separator."""
    text = str(value)
    if any(c in text for c in ',:"\n'):
        return json.dumps(text, ensure_ascii=False)
    return text


def unquote(value: Any) -> Any:
    """The inverse of :func:`quote` for values a WebUI's parser left quoted (others unchanged)."""
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def format_infotext(params: Mapping[str, Any]) -> str:
    """``prompt\\nNegative prompt: …\\nKey: value, …`` exactly as the WebUIs write it."""
    lines = [str(params.get(PROMPT, ""))]
    if params.get(NEGATIVE):
        lines.append(f"{NEGATIVE}: {params[NEGATIVE]}")
    rest = {k: v for k, v in params.items() if k not in (PROMPT, NEGATIVE)}
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in rest.items()))
    return "\n".join(lines)


def _parameter_line(text: str) -> tuple[list[str], str]:
    """(the lines before it, the ``Key: value, …`` line or '' when the text has none)."""
    *head, last = (text or "").strip("\n").split("\n")
    if len(PARAM.findall(last)) < 3:  # A1111's rule: fewer than three pairs is still prompt
        return [*head, last], ""
    return head, last


def raw_keys(text: str) -> set[str]:
    """The keys the parameter line really has (before any WebUI parser adds defaults)."""
    _, last = _parameter_line((text or "").strip())
    return {k.strip() for k, _ in PARAM.findall(last)}


def parse_infotext(text: str) -> dict[str, Any]:
    """The inverse of :func:`format_infotext` (values stay strings, except whole numbers become ints)."""
    head, last = _parameter_line(text)
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    target = prompt_lines
    for line in head:
        if line.startswith(f"{NEGATIVE}:"):
            target = negative_lines
            line = line[len(NEGATIVE) + 1 :].strip()
        target.append(line)
    params: dict[str, Any] = {PROMPT: "\n".join(prompt_lines), NEGATIVE: "\n".join(negative_lines)}
    for key, raw in PARAM.findall(last):
        value: Any = unquote(raw.strip())
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value) and raw.strip() == value:
            value = int(value)
        params[key.strip()] = value
    return params
