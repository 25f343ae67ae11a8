"""The panel builder under whatever Gradio runs this file (6.x here; 3.41 in the A1111 venv and 4.40
in the Forge venv: ``<venv>/bin/python -m pytest --noconftest tests/test_webui_ui.py``).

Needs only gradio and ``te_switch.webui.ui`` (no WebUI, no torch models)."""

from __future__ import annotations

from typing import Any

import gradio as gr
import pytest

from te_switch.core.selection import Selection, SlotChoice
from te_switch.webui import compat
from te_switch.webui.args import ARG_NAMES
from te_switch.webui.ui import Panel, PanelBackend, build_panel, selection_from_args

LABELS = {"clip_l": ["a.safetensors", "long.safetensors"], "clip_g": ["g.safetensors"], "clip_h": [], "t5xxl": []}


class Backend:
    def __init__(self) -> None:
        self.family_now: str | None = "sd1"
        self.key = "model-a"
        self.memory: Selection | None = None
        self.refreshed = 0
        self.described: list[Selection] = []

    def describe(self, sel: Selection) -> str:
        self.described.append(sel)
        return f"{self.family_now} · skip {sel.clip_skip or 'Auto'} · {sel.scope}"

    def slot_names(self) -> tuple[str, ...]:
        return {"sd1": ("clip_l",), "sdxl": ("clip_l", "clip_g"), None: ()}[self.family_now]

    def refresh(self) -> None:
        self.refreshed += 1
        LABELS["clip_h"] = ["h.safetensors"]

    def panel_backend(self) -> PanelBackend:
        return PanelBackend(
            describe=self.describe,
            slot_names=self.slot_names,
            family=lambda: self.family_now,
            choices=lambda slot: list(LABELS[slot]),
            refresh=self.refresh,
            defaults=Selection,
            choice_label=lambda label: f"{label} (Long-CLIP-L · 248)" if label.startswith("long") else label,
            status=lambda: ("CLIP-L: a.safetensors", False),
            hint=lambda sel: "Long-CLIP soon" if sel.slot("clip_l").encoder == "long.safetensors" else "",
            resting_clip_skip=lambda: 2 if self.family_now == "sdxl" else 1,
            model_key=lambda: self.key,
            remembered=lambda: self.memory,
        )


def value(update: Any) -> Any:
    return update.get("value", "<unchanged>") if isinstance(update, dict) else update


def build(backend: Backend) -> Panel:
    with gr.Blocks():
        return build_panel(backend.panel_backend(), elem_id=lambda item: f"script_txt2img_te_{item}")


def test_components_and_their_order() -> None:
    panel = build(Backend())
    inputs = panel.inputs()
    assert list(panel.components) == list(ARG_NAMES)
    assert [c.value for c in inputs] == [True, 1, "both", "Built-in", "Auto", "Built-in", "Auto", "Built-in", "Auto",
                                         "Built-in", "Auto"]  # fmt: skip
    assert selection_from_args([c.value for c in inputs]) == Selection()
    assert (panel.clip_skip.minimum, panel.clip_skip.maximum) == (1, 12)
    assert panel.accordion.open is False
    assert panel.sync.elem_id == "script_txt2img_te_sync"
    assert panel.encoders["clip_l"].elem_id == "script_txt2img_te_clip_l"
    choices = [c[0] if isinstance(c, tuple) else c for c in panel.encoders["clip_l"].choices]
    assert choices == ["Built-in", "a.safetensors", "long.safetensors (Long-CLIP-L · 248)"]
    # slots the SD1 model lacks start hidden; so does the scope (one tower)
    assert panel.slot_rows["clip_l"].visible is True
    assert panel.slot_rows["clip_g"].visible is False
    assert panel.scope.visible is False
    assert "sd1 · skip Auto" in panel.layers.value
    assert "a.safetensors" in panel.status.value


def test_no_model_yet_shows_every_slot() -> None:
    backend = Backend()
    backend.family_now = None
    panel = build(backend)
    assert all(row.visible for row in panel.slot_rows.values())


def test_describe_follows_the_controls() -> None:
    panel = build(Backend())
    layers, hint = panel.handlers["describe"](False, 3, "CLIP-L only", "long.safetensors (Long-CLIP-L · 248)",
                                              "fp32", "Built-in", "Auto", "Built-in", "Auto", "Built-in", "Auto")  # fmt: skip
    assert "skip 3 · clip_l" in layers
    assert "Long-CLIP soon" in hint
    bad, _ = panel.handlers["describe"](False, None, "both")
    assert "no layer" in bad


def test_sync_after_a_model_change() -> None:
    backend = Backend()
    panel = build(backend)
    defaults = [c.value for c in panel.inputs()]
    backend.family_now = "sdxl"
    out = panel.handlers["sync"]("model-a", *defaults)
    key, layers, _hint, status, scope, *rest = out
    rows, values = rest[:4], rest[4:]
    assert key == "model-a"
    assert "sdxl" in layers
    assert "a.safetensors" in status
    assert scope["visible"] is True
    assert [r["visible"] for r in rows] == [True, True, False, False]
    assert value(values[1]) == 2  # Auto ticked: the slider rests on the model's native layer
    assert value(values[0]) == "<unchanged>"  # nothing remembered: the user's choices stay


def test_sync_applies_per_checkpoint_memory_once() -> None:
    backend = Backend()
    panel = build(backend)
    defaults = [c.value for c in panel.inputs()]
    backend.memory = Selection(2, "both", {"clip_l": SlotChoice("long.safetensors", "fp16")})
    backend.key = "model-b"
    out = panel.handlers["sync"]("model-a", *defaults)
    values = out[9:]
    assert out[0] == "model-b"
    assert [value(v) for v in values[:5]] == [False, 2, "both", "long.safetensors (Long-CLIP-L · 248)", "fp16"]
    again = panel.handlers["sync"]("model-b", *defaults)
    assert value(again[9]) == "<unchanged>"  # same checkpoint: choices made since are kept


def test_refresh_rescans_and_updates_every_list() -> None:
    backend = Backend()
    panel = build(backend)
    out = panel.handlers["refresh"]()
    assert backend.refreshed == 1
    assert len(out) == 4
    assert "h.safetensors" in out[2]["choices"]


@pytest.mark.parametrize("js", [None, "() => 1"])
def test_listen_spells_js_for_this_gradio(js: str | None) -> None:
    seen: dict[str, Any] = {}

    def event(**kwargs: Any) -> None:
        seen.update(kwargs)

    compat.listen(gr, event, None, [], [], js=js)
    js_key = "_js" if compat.major(gr) < 4 else "js"
    assert seen.get(js_key) == js
    assert seen["show_progress"] in (False, "hidden")
