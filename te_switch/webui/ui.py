"""The "CLIP Skip & Text Encoders" panel: one builder for A1111 (Gradio 3.41), Forge (4.x) and the
standalone page (6.x).

:func:`build_panel` only needs Gradio and a :class:`PanelBackend` (plain callables), so the same
panel runs inside a WebUI tab and on ``python -m te_switch ui``. The components it returns in
:meth:`Panel.inputs` are the script's arguments, in the order :data:`args.ARG_NAMES` documents.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from te_switch.core.clip_skip import clip_towers
from te_switch.core.selection import ALL_SLOTS, BUILT_IN, CLIP_SKIP_MAX, SCOPE_LABELS, SLOT_LABELS, Selection
from te_switch.webui import compat, ui_per_model
from te_switch.webui.args import (
    ARG_NAMES,
    PRECISION_CHOICES,
    SCOPE_CHOICES,
    ArgsError,
    args_from_selection,
    precision_label,
)
from te_switch.webui.args import selection_from_args as selection_from_args  # re-exported: the panel's parser

TITLE = "CLIP Skip & Text Encoders"
# one line each, under the control (the WebUI translates them with the rest of the page)
CLIP_SKIP_HINT = "Which CLIP layer the prompt is read from: 1 = the last, higher = earlier and looser. SDXL/SD3 use 2 natively; Flux ignores it"
ENCODER_HINTS = {
    "clip_l": "Another CLIP-L: e.g. a GmP fine-tune follows details more closely; Long-CLIP-L reads 248 tokens per chunk",
    "clip_g": "Another CLIP-G (SDXL, SD3)",
    "clip_h": "Another CLIP-H (SD2)",
    "t5xxl": "Another T5-XXL (Flux, SD3): e.g. Flan-T5-XXL reads wording differently; fp8/GGUF files need less memory",
}
PRECISION_HINT = "fp32: slightly more exact, twice fp16's memory (T5-XXL: about 19 GB instead of 9.5)"
REFRESH_LABEL = "Rescan"  # the encoder folders


@dataclass
class PanelBackend:
    """What the panel asks of its host. Every callable must be cheap and must not raise.

    ``choices(slot)`` returns library labels of compatible encoders (Built-in is added by the
    panel); ``choice_label(label)`` turns one into the text shown in the dropdown (``labels.decorate``;
    the script maps it back with ``labels.strip``).
    """

    describe: Callable[[Selection], str]
    slot_names: Callable[[], tuple[str, ...]]
    family: Callable[[], str | None]
    choices: Callable[[str], list[str]]
    refresh: Callable[[], None]
    defaults: Callable[[], Selection]
    choice_label: Callable[[str], str] = str
    status: Callable[[], tuple[str, bool]] = lambda: ("", False)  # (one line, is it an error)
    hint: Callable[[Selection], str] = lambda selection: ""  # e.g. the Long-CLIP token-chunk note
    resting_clip_skip: Callable[[], int] = lambda: 1  # slider position while Auto is ticked
    model_key: Callable[[], str] = lambda: ""  # identifies the loaded checkpoint ("" = none yet)
    remembered: Callable[[], Selection | None] = lambda: None  # per-checkpoint memory for model_key()
    # per model: (lines, the value "Use N" offers) for a prompt and the panel's selection; the one
    # explanation under them; the page's clip skip (the top bar's; None = Auto) and how to set it
    recommend: Callable[[str, Selection], tuple[list[str], int | None]] = lambda prompt, selection: ([], None)
    explain: Callable[[], str] = lambda: ""
    use_label: Callable[[int], str] = lambda n: f"Use {n}"
    global_clip_skip: Callable[[], int | None] = lambda: None
    set_global_clip_skip: Callable[[int | None], None] | None = None


@dataclass
class Panel:
    accordion: Any
    clip_skip_auto: Any
    clip_skip: Any
    scope: Any
    layers: Any
    status: Any
    hint: Any
    sync: Any  # hidden button: JavaScript clicks it when the model changes
    model_key: Any = None  # per-browser state: the checkpoint this page last synced to
    per_model: ui_per_model.PerModel | None = None
    slot_rows: dict[str, Any] = field(default_factory=dict)
    encoders: dict[str, Any] = field(default_factory=dict)
    precisions: dict[str, Any] = field(default_factory=dict)
    refresh_buttons: dict[str, Any] = field(default_factory=dict)
    # the event functions (plain Python: the standalone page and tests call them directly)
    handlers: dict[str, Callable[..., list[Any]]] = field(default_factory=dict)

    def inputs(self) -> list[Any]:
        """The script's arguments in :data:`args.ARG_NAMES` order."""
        out = [self.clip_skip_auto, self.clip_skip, self.scope]
        for slot in ALL_SLOTS:
            out += [self.encoders[slot], self.precisions[slot]]
        return out

    @property
    def components(self) -> dict[str, Any]:
        """Argument name -> component."""
        return dict(zip(ARG_NAMES, self.inputs(), strict=True))


def _html(text: str, css_class: str) -> str:
    return f"<span class='{css_class}'>{html.escape(text)}</span>" if text else ""


def layer_html(text: str) -> str:
    return _html(text, "te-switch-layers")


def status_html(status: tuple[str, bool]) -> str:
    text, is_error = status
    return _html(text, "te-switch-status te-switch-error" if is_error else "te-switch-status")


def hint_html(text: str) -> str:
    return _html(text, "te-switch-hint")


def _safe(call: Callable[[], Any], fallback: Any) -> Any:
    try:
        return call()
    except Exception:  # a UI refresh must never break the page
        return fallback


def encoder_choices(backend: PanelBackend, slot: str) -> list[str]:
    labels = _safe(lambda: backend.choices(slot), [])
    return [BUILT_IN, *(_safe(lambda label=label: backend.choice_label(label), label) for label in labels)]


def _display(backend: PanelBackend, encoder: str | None) -> str:
    return BUILT_IN if not encoder else _safe(lambda: backend.choice_label(encoder), encoder)


def visible_slots(backend: PanelBackend) -> tuple[str, ...]:
    """The loaded model's slots; every slot while no model is known (so users can pick ahead)."""
    names = _safe(backend.slot_names, ())
    return tuple(names) if names else ALL_SLOTS


def two_towers(backend: PanelBackend) -> bool:
    family = _safe(backend.family, None)
    return family is not None and len(_safe(lambda: clip_towers(family), ())) > 1


def build_panel(
    backend: PanelBackend,
    *,
    elem_id: Callable[[str], str],
    gr_module: ModuleType | None = None,
    tool_button: Callable[..., Any] | None = None,
    title: str = TITLE,
    prompt: Any = None,
) -> Panel:
    """Create the panel's components inside the current Gradio Blocks context.

    ``elem_id(item)`` names each element (the WebUI's ``Script.elem_id``); ``tool_button`` is the
    WebUI's ``ToolButton`` where there is one (small emoji button inside forms); ``prompt`` is the
    tab's prompt box, whose LoRAs the recommendation reads.
    """
    if gr_module is None:
        import gradio as gr_module  # the standalone page passes its own
    gr = gr_module
    make_tool = tool_button or (lambda **kw: gr.Button(**kw))
    defaults = _safe(backend.defaults, Selection())
    shown = visible_slots(backend)
    auto = defaults.clip_skip is None

    with gr.Accordion(title, open=False, elem_id=elem_id("accordion"), elem_classes=["te-switch"]) as accordion:
        with gr.Row(elem_classes=["te-switch-clip-skip"]):
            clip_skip_auto = gr.Checkbox(
                value=auto, label="Auto", elem_id=elem_id("clip_skip_auto"), elem_classes=["te-switch-auto"]
            )
            clip_skip = gr.Slider(
                minimum=1,
                maximum=CLIP_SKIP_MAX,
                step=1,
                value=defaults.clip_skip if not auto else _safe(backend.resting_clip_skip, 1),
                label="CLIP Skip",
                info=CLIP_SKIP_HINT,
                elem_id=elem_id("clip_skip"),
                elem_classes=["te-switch-slider"],
            )
            scope = gr.Radio(
                choices=list(SCOPE_CHOICES),
                value=SCOPE_LABELS[defaults.scope],
                label="Applies to",
                visible=two_towers(backend),
                elem_id=elem_id("scope"),
            )
        per_model = ui_per_model.build(gr, elem_id, _safe(backend.explain, ""), "Use")
        layers = gr.HTML(value=layer_html(_safe(lambda: backend.describe(defaults), "")), elem_id=elem_id("layers"))
        slot_rows: dict[str, Any] = {}
        encoders: dict[str, Any] = {}
        precisions: dict[str, Any] = {}
        refresh_buttons: dict[str, Any] = {}
        for slot in ALL_SLOTS:
            choice = defaults.slot(slot)
            with gr.Row(visible=slot in shown, elem_id=elem_id(f"{slot}_row"), elem_classes=["te-switch-slot"]) as row:
                encoders[slot] = gr.Dropdown(
                    choices=encoder_choices(backend, slot),
                    value=_display(backend, choice.encoder),
                    label=SLOT_LABELS[slot],
                    info=ENCODER_HINTS[slot],
                    allow_custom_value=True,  # choices change at runtime; Gradio 4 would reject old ones
                    elem_id=elem_id(slot),
                    elem_classes=["te-switch-encoder"],
                )
                # words, not an emoji: a font without emoji shows a box (te_switch.js adds the tooltip)
                refresh_buttons[slot] = make_tool(
                    value=REFRESH_LABEL, elem_id=elem_id(f"{slot}_refresh"), elem_classes=["te-switch-refresh"]
                )
                precisions[slot] = gr.Dropdown(
                    choices=list(PRECISION_CHOICES),
                    value=precision_label(choice.precision),
                    label=f"{SLOT_LABELS[slot]} precision",
                    info=PRECISION_HINT,
                    elem_id=elem_id(f"{slot}_precision"),
                    elem_classes=["te-switch-precision"],
                )
            slot_rows[slot] = row
        status = gr.HTML(value=status_html(_safe(backend.status, ("", False))), elem_id=elem_id("status"))
        hint = gr.HTML(value=hint_html(_safe(lambda: backend.hint(defaults), "")), elem_id=elem_id("hint"))
        sync = gr.Button(value="sync", visible=compat.hidden(gr), elem_id=elem_id("sync"))
        model_key = gr.State(value="")

    panel = Panel(
        accordion, clip_skip_auto, clip_skip, scope, layers, status, hint, sync, model_key, per_model, slot_rows,
        encoders, precisions, refresh_buttons,
    )  # fmt: skip
    _wire(panel, backend, gr)
    _wire_per_model(panel, backend, gr, prompt)
    return panel


def _wire_per_model(panel: Panel, backend: PanelBackend, gr: ModuleType, prompt: Any) -> None:
    assert panel.per_model is not None

    def recommend(text: str, values: list[Any]) -> tuple[list[str], int | None]:
        sel = _selection(values)
        return backend.recommend(text, sel if isinstance(sel, Selection) else Selection())

    panel.handlers.update(
        ui_per_model.wire(
            panel.per_model,
            gr,
            clip_skip_auto=panel.clip_skip_auto,
            clip_skip=panel.clip_skip,
            panel_inputs=panel.inputs(),
            prompt=prompt,
            recommend=recommend,
            explanation=lambda: _safe(backend.explain, ""),
            use_label=lambda n: _safe(lambda: backend.use_label(n), f"Use {n}"),
            get_global=lambda: _safe(backend.global_clip_skip, None),
            set_global=backend.set_global_clip_skip,
            resting=lambda: _safe(backend.resting_clip_skip, 1),
        )
    )


def _selection(values: Sequence[Any]) -> Selection | str:
    try:
        return selection_from_args(values)
    except (ArgsError, ValueError) as e:
        return str(e)


def _wire(panel: Panel, backend: PanelBackend, gr: ModuleType) -> None:
    inputs = panel.inputs()

    def describe(*values: Any) -> list[Any]:
        sel = _selection(values)
        if isinstance(sel, str):
            return [layer_html(sel), hint_html("")]
        return [layer_html(_safe(lambda: backend.describe(sel), "")), hint_html(_safe(lambda: backend.hint(sel), ""))]

    for component in (panel.clip_skip_auto, panel.clip_skip, panel.scope):
        compat.listen(gr, component.change, describe, inputs, [panel.layers, panel.hint])
    for slot in ALL_SLOTS:
        for component in (panel.encoders[slot], panel.precisions[slot]):
            compat.listen(gr, component.change, describe, inputs, [panel.layers, panel.hint])

    # moving the slider by hand means "this layer", so Auto goes off
    compat.listen(
        gr,
        panel.clip_skip.release,
        lambda _value: compat.update(gr, value=False),
        [panel.clip_skip],
        [panel.clip_skip_auto],
    )

    encoder_list = [panel.encoders[s] for s in ALL_SLOTS]

    def refresh(*_values: Any) -> list[Any]:
        _safe(backend.refresh, None)
        return [compat.update(gr, choices=encoder_choices(backend, s)) for s in ALL_SLOTS]

    for button in panel.refresh_buttons.values():
        compat.listen(gr, button.click, refresh, [], encoder_list)

    sync_outputs = [
        panel.model_key,
        panel.layers,
        panel.hint,
        panel.status,
        panel.scope,
        *(panel.slot_rows[s] for s in ALL_SLOTS),
        *inputs,
    ]

    def sync(seen_key: str, *values: Any) -> list[Any]:
        """The model (or a setting) changed: visibility, lists, lines; per-checkpoint memory.

        ``seen_key`` is the checkpoint this browser page last synced to: memory is applied once
        per checkpoint change, never over choices made since.
        """
        key = _safe(backend.model_key, "")
        remembered = _safe(backend.remembered, None) if key and key != seen_key else None
        current = remembered if remembered is not None else _selection(values)
        shown = visible_slots(backend)
        out: list[Any] = [key or seen_key]
        if isinstance(current, str):
            out += [layer_html(current), hint_html("")]
        else:
            out += [
                layer_html(_safe(lambda: backend.describe(current), "")),
                hint_html(_safe(lambda: backend.hint(current), "")),
            ]
        out.append(status_html(_safe(backend.status, ("", False))))
        out.append(compat.update(gr, visible=two_towers(backend)))
        out += [compat.update(gr, visible=s in shown) for s in ALL_SLOTS]
        values_now = list(values)
        if remembered is not None:
            values_now = args_from_selection(remembered)
            values_now[3::2] = [_display(backend, remembered.slot(s).encoder) for s in ALL_SLOTS]
        auto_now = bool(values_now[0]) if values_now else True
        for name, component_value in zip(ARG_NAMES, values_now, strict=False):
            changes: dict[str, Any] = {}
            if remembered is not None:
                changes["value"] = component_value
            if name == "clip_skip" and auto_now:
                changes["value"] = _safe(backend.resting_clip_skip, 1)
            if name in ALL_SLOTS:
                changes["choices"] = encoder_choices(backend, name)
            out.append(compat.update(gr, **changes))
        return out

    compat.listen(gr, panel.sync.click, sync, [panel.model_key, *inputs], sync_outputs)
    panel.handlers.update(describe=describe, refresh=refresh, sync=sync)
