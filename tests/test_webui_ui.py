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


class PerModelBackend(Backend):
    """Backend with a recommendation (a LoRA named "anime" recommends 2) and a page-wide clip skip."""

    def __init__(self) -> None:
        super().__init__()
        self.global_value: int | None = None

    def panel_backend(self) -> PanelBackend:
        backend = super().panel_backend()

        def recommend(prompt: str, sel: Selection) -> tuple[list[str], int | None]:
            if "<lora:anime" not in prompt:
                return [], None
            current = sel.clip_skip or 1
            return [f"This LoRA was trained with Clip skip 2 (from its file) · you use {current}"], (
                None if current == 2 else 2
            )

        def set_global(n: int | None) -> None:
            self.global_value = n

        backend.recommend = recommend
        backend.explain = lambda: "Per model: one explanation"
        backend.use_label = lambda n: f"Use {n}"
        backend.global_clip_skip = lambda: self.global_value
        backend.set_global_clip_skip = set_global
        return backend


def build_with_prompt(backend: Backend) -> tuple[Panel, Any]:
    with gr.Blocks():
        prompt = gr.Textbox(elem_id="txt2img_prompt")
        panel = build_panel(backend.panel_backend(), elem_id=lambda item: f"script_txt2img_te_{item}", prompt=prompt)
    return panel, prompt


def test_hints_on_the_slider_and_encoder_dropdowns() -> None:
    from te_switch.webui import ui

    panel = build(Backend())
    assert panel.clip_skip.info == ui.CLIP_SKIP_HINT
    assert "SDXL/SD3 use 2 natively; Flux ignores it" in panel.clip_skip.info
    assert panel.encoders["t5xxl"].info == ui.ENCODER_HINTS["t5xxl"]
    assert "Long-CLIP-L reads 248 tokens" in panel.encoders["clip_l"].info
    assert "fp32" in panel.precisions["clip_l"].info


def test_recommendation_line_and_use_button() -> None:
    backend = PerModelBackend()
    panel, _prompt = build_with_prompt(backend)
    defaults = [c.value for c in panel.inputs()]
    line, button, offer = panel.handlers["recommend"]("1girl <lora:anime:0.8>", *defaults)
    assert "This LoRA was trained with Clip skip 2 (from its file) · you use 1" in line
    assert "Per model: one explanation" in line
    assert button["visible"] is True
    assert button["value"] == "Use 2"
    assert offer == 2
    auto, slider, seen = panel.handlers["use"](offer)
    assert (auto, slider) == (False, 2)
    assert backend.global_value == 2 == seen  # the page's clip skip (the top bar) is set too
    explicit = [False, 2, *defaults[2:]]
    line, button, offer = panel.handlers["recommend"]("1girl <lora:anime:0.8>", *explicit)
    assert "you use 2" in line
    assert button["visible"] is False
    assert offer is None
    line, button, _ = panel.handlers["recommend"]("no lora", *defaults)
    assert "Clip skip 2" not in line
    assert "one explanation" in line
    assert button["visible"] is False


def test_tab_and_bar_show_one_value() -> None:
    backend = PerModelBackend()
    panel, _prompt = build_with_prompt(backend)
    assert panel.handlers["chose"](False, 3) == [3]  # the tab's slider moved
    assert backend.global_value == 3
    assert panel.handlers["chose"](True, 3) == [None]  # its Auto tick
    assert backend.global_value is None
    # the bar moved: a tab that saw the old value follows, one that saw this value keeps its own
    backend.global_value = 4
    assert panel.handlers["follow"](None, True, 1) == [4, False, 4]
    seen, auto, slider = panel.handlers["follow"](4, False, 7)
    assert seen == 4
    assert value(auto) == "<unchanged>"
    assert value(slider) == "<unchanged>"
    backend.global_value = None
    assert panel.handlers["follow"](4, False, 4) == [None, True, 1]  # Auto: rests on the native layer
    assert panel.handlers["follow"](-1, True, 1) == [None, True, 1]  # first look after the page loads
