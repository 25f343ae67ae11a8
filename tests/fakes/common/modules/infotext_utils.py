"""Fake of modules/infotext_utils.py: the parser (same regex, same "Clip skip: 1" default and
skip_fields handling) and the paste-field/override helpers the extension relies on."""

from __future__ import annotations

import json
import re

from modules import shared

re_param_code = r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)'
re_param = re.compile(re_param_code)
re_imagesize = re.compile(r"^(\d+)x(\d+)$")
paste_fields: dict[str, dict] = {}


class PasteField(tuple):
    def __new__(cls, component, target, *, api=None):
        return super().__new__(cls, (component, target))

    def __init__(self, component, target, *, api=None):
        super().__init__()
        self.api = api
        self.component = component
        self.label = target if isinstance(target, str) else None
        self.function = target if callable(target) else None


def quote(text):
    if "," not in str(text) and "\n" not in str(text) and ":" not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_generation_parameters(x: str, skip_fields: list[str] | None = None):
    if skip_fields is None:
        skip_fields = getattr(shared.opts, "infotext_skip_pasting", [])
    res = {}
    prompt = ""
    negative_prompt = ""
    done_with_prompt = False
    *lines, lastline = x.strip().split("\n")
    if len(re_param.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    for k, v in re_param.findall(lastline):
        if v and v[0] == '"' and v[-1] == '"':
            v = unquote(v)
        m = re_imagesize.match(v)
        if m is not None:
            res[f"{k}-1"] = m.group(1)
            res[f"{k}-2"] = m.group(2)
        else:
            res[k] = v
    res["Prompt"] = prompt
    res["Negative prompt"] = negative_prompt
    # Missing CLIP skip means it was set to 1 (the default)
    if "Clip skip" not in res:
        res["Clip skip"] = "1"
    for key in skip_fields:
        res.pop(key, None)
    return res


def create_infotext_params_text(params: dict) -> str:
    """The parameter line create_infotext writes (``k: quote(v)``, None omitted)."""
    return ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in params.items() if v is not None)


def get_override_settings(params, *, skip_fields=None):
    res = []
    mapping = [(info.infotext, k) for k, info in shared.opts.data_labels.items() if info.infotext]
    for param_name, setting_name in mapping:
        if param_name in (skip_fields or {}):
            continue
        v = params.get(param_name, None)
        if v is None:
            continue
        v = shared.opts.cast_value(setting_name, v)
        current_value = getattr(shared.opts, setting_name, None)
        if v == current_value:
            continue
        res.append((param_name, setting_name, v))
    return res
