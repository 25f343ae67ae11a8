"""``localizations/ja_JP.json`` covers every text the extension shows, and only those.

The WebUI translates whole text nodes with it (labels, hints, settings, X/Y/Z axes); the extension
translates the lines it builds (``te_switch.webui.i18n.tr``) from the same file. The texts are
collected from the code itself, so a new label or message without a translation fails here.
"""

from __future__ import annotations

import ast
import html
import json
import re
import string
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
from test_webui_support import webui  # noqa: F401 - fixture

from te_switch.core.selection import Selection
from te_switch.webui import i18n
from te_switch.webui.ui import PanelBackend, build_panel

ROOT = Path(__file__).resolve().parent.parent
JA = json.loads((ROOT / "localizations" / "ja_JP.json").read_text(encoding="utf-8"))
# names and values that read the same in every language (and the page's hidden buttons)
UNTRANSLATED = {"CLIP-L", "CLIP-G", "CLIP-H", "T5-XXL", "Built-in", "fp32", "bf16", "fp16", "\U0001f504", "sync",
                "recommend", "follow", "(requires Reload UI)"}  # fmt: skip


def panel_texts() -> set[str]:
    backend = PanelBackend(
        describe=lambda sel: "", slot_names=lambda: (), family=lambda: "sdxl", choices=lambda slot: [],
        refresh=lambda: None, defaults=Selection,
    )  # fmt: skip
    with gr.Blocks() as blocks:
        build_panel(backend, elem_id=lambda item: f"te_{item}")
    texts: set[str] = set()
    for block in blocks.blocks.values():
        for attr in ("label", "info"):
            value = getattr(block, attr, None)
            if isinstance(value, str) and value:
                texts.add(value)
        for choice in getattr(block, "choices", None) or []:
            texts.add(choice[0] if isinstance(choice, tuple | list) else choice)
        if isinstance(block, gr.Button) and isinstance(block.value, str):
            texts.add(block.value)
    return texts


def settings_texts() -> set[str]:
    from te_switch.webui import options

    texts: set[str] = set()
    for item in options.templates().values():
        texts.add(item.label)
        texts.update(html.unescape(t) for t in re.findall(r"<span class='info'>([^<]*)</span>", item.comment_after))
        texts.add(item.section[1])
    return texts


def axis_texts() -> set[str]:
    from te_switch.webui import xyz

    module = SimpleNamespace(AxisOption=lambda label, *args, **kwargs: SimpleNamespace(label=label))
    return {o.label for o in xyz.axis_options(module)}  # type: ignore[arg-type]


def _notes(function: ast.FunctionDef) -> set[str]:
    """The literal texts a ``layer_note``/``describe`` returns or appends (f-strings are PATTERNS' job)."""
    out = set()
    for node in ast.walk(function):
        value = node.value if isinstance(node, ast.Return) else None
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "append" and node.args:
            value = node.args[0]
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            out.add(value.value)
    return out


def message_texts() -> set[str]:
    """Every ``tr("…")`` in the WebUI layer, the line patterns, and the host notes ``tr_line`` translates."""
    texts = {key for _pattern, key in i18n.PATTERNS}
    for path in sorted(set((ROOT / "te_switch" / "webui").glob("*.py")) - {ROOT / "te_switch" / "webui" / "i18n.py"}):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "tr" and node.args:
                first = node.args[0]
                assert isinstance(first, ast.Constant), f"{path.name}:{node.lineno}: tr() needs a literal text"
                texts.add(first.value)
    for name in ("a1111.py", "forge.py", "base.py"):
        tree = ast.parse((ROOT / "te_switch" / "hosts" / name).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name in ("layer_note", "describe"):
                texts |= _notes(node)
    texts |= {"native", "Flux uses only CLIP-L's pooled output: clip skip has no effect"}  # core/clip_skip.describe
    return texts


@pytest.fixture
def everything(webui: dict) -> set[str]:  # noqa: F811
    return (panel_texts() | settings_texts() | axis_texts() | message_texts()) - UNTRANSLATED


def test_every_text_has_a_japanese_entry(everything: set[str]) -> None:
    missing = sorted(t for t in everything if t not in JA)
    assert not missing, "no ja_JP entry for:\n" + "\n".join(missing)


def test_no_stale_entries(everything: set[str]) -> None:
    assert sorted(set(JA) - everything) == []


def fields(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def test_translations_keep_their_fields_and_are_japanese() -> None:
    for key, value in JA.items():
        assert fields(value) == fields(key), key
        if value != key:  # the names kept as they are: "CLIP Skip", "[TE] CLIP-L" …
            assert re.search(r"[\u3040-\u30ff\u4e00-\u9fff「」]", value), f"not translated: {key!r} -> {value!r}"


def test_server_lines_follow_the_webuis_language(webui: dict) -> None:  # noqa: F811
    from modules import shared

    assert i18n.tr("Use {n}", n=2) == "Use 2"
    shared.opts.localization = "ja_JP"
    assert i18n.tr("Use {n}", n=2) == "2にする"
    assert i18n.tr_line("SDXL · CLIP-L layer 11/12 · CLIP-G layer 31/32 · native") == (
        "SDXL · CLIP-L第11層（全12層） · CLIP-G第31層（全32層） · 標準"
    )
    assert i18n.tr("a text nobody translated") == "a text nobody translated"
