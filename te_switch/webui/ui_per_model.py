"""The panel's per-model row and the link between the tab's CLIP Skip and the top bar's.

* The recommendation line ("This LoRA was trained with Clip skip 2 (from its file) · you use 1") with a
  "Use 2" button, refreshed when the prompt, the model or the slider changes (the page's script clicks
  the hidden ``recommend`` button a moment after the prompt stops changing), and under it the feature's
  one explanation: what counts first, and whether remembering and the automatic mode are on.
* One clip skip for the page: moving the tab's slider (or its Auto tick, or "Use N") sets the global
  option that the top-bar slider shows, and the page's script moves the bar; moving the bar changes the
  option, and the page's script clicks each tab's hidden ``follow`` button so the tab shows it too.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from te_switch.webui import compat

MIRROR_JS = "teSwitchMirrorBar"  # te_switch.js: move the top-bar slider, let the other tab follow
UNSEEN = -1  # the follow state before the page saw the global value once


@dataclass
class PerModel:
    html: Any
    use: Any
    offer: Any  # gr.State: the value "Use N" sets
    recommend: Any  # hidden button the page's script clicks
    follow: Any  # hidden button: the global value changed
    seen: Any  # gr.State: the global value this tab last followed


def line_html(lines: list[str], explanation: str) -> str:
    body = "".join(f"<span class='te-switch-advice'>{html.escape(line)}</span>" for line in lines)
    note = f"<span class='te-switch-explain'>{html.escape(explanation)}</span>" if explanation else ""
    return body + note


def build(gr: ModuleType, elem_id: Callable[[str], str], explanation: str, use_label: str) -> PerModel:
    with gr.Row(elem_classes=["te-switch-per-model"]):
        box = gr.HTML(value=line_html([], explanation), elem_id=elem_id("recommendation"))
        use = gr.Button(value=use_label, visible=False, size="sm", elem_id=elem_id("use_recommended"))
    hidden = compat.hidden(gr)
    recommend = gr.Button(value="recommend", visible=hidden, elem_id=elem_id("recommend"))
    follow = gr.Button(value="follow", visible=hidden, elem_id=elem_id("follow"))
    return PerModel(box, use, gr.State(value=None), recommend, follow, gr.State(value=UNSEEN))


def wire(
    per_model: PerModel,
    gr: ModuleType,
    *,
    clip_skip_auto: Any,
    clip_skip: Any,
    panel_inputs: list[Any],
    prompt: Any,
    recommend: Callable[[str, list[Any]], tuple[list[str], int | None]],
    explanation: Callable[[], str],
    use_label: Callable[[int], str],
    get_global: Callable[[], int | None],
    set_global: Callable[[int | None], None] | None,
    resting: Callable[[], int],
) -> dict[str, Callable[..., list[Any]]]:
    """Connect the row; returns the event functions by name (tests and the standalone page call them)."""

    def refresh(*values: Any) -> list[Any]:
        text, panel_values = (values[0], values[1:]) if prompt is not None else ("", values)
        try:
            lines, offer = recommend(text or "", list(panel_values))
        except Exception as e:  # a recommendation must never break the panel
            lines, offer = [str(e)], None
        button = compat.update(gr, visible=offer is not None, **({"value": use_label(offer)} if offer else {}))
        return [line_html(lines, explanation()), button, offer]

    inputs = ([prompt] if prompt is not None else []) + panel_inputs
    outputs = [per_model.html, per_model.use, per_model.offer]
    compat.listen(gr, per_model.recommend.click, refresh, inputs, outputs)
    for component in (clip_skip_auto, clip_skip):
        compat.listen(gr, component.change, refresh, inputs, outputs)

    handlers: dict[str, Callable[..., list[Any]]] = {"recommend": refresh}
    if set_global is None:  # the standalone page: no top bar, no global level
        compat.listen(gr, per_model.use.click, lambda offer: [False, offer], [per_model.offer],
                      [clip_skip_auto, clip_skip])  # fmt: skip
        return handlers

    def chose(auto: bool, value: Any) -> list[Any]:
        """The user set the tab's clip skip: it becomes the page's (the bar's) value."""
        n = None if auto else int(value)
        set_global(n)
        return [n]

    def use(offer: Any) -> list[Any]:
        if offer is None:
            return [compat.update(gr), compat.update(gr), compat.update(gr)]
        set_global(int(offer))
        return [False, int(offer), int(offer)]

    def follow(seen: Any, auto: bool, value: Any) -> list[Any]:
        """The global value changed (the bar, the other tab, Settings): show it here too."""
        now = get_global()
        if seen != UNSEEN and now == seen:
            return [seen, compat.update(gr), compat.update(gr)]
        return [now, now is None, now if now is not None else resting()]

    mirror_inputs = [clip_skip_auto, clip_skip]
    for event, fn, ins, outs in (
        (clip_skip.release, lambda value: chose(False, value), [clip_skip], [per_model.seen]),
        (clip_skip_auto.input, chose, [clip_skip_auto, clip_skip], [per_model.seen]),
        (per_model.use.click, use, [per_model.offer], [clip_skip_auto, clip_skip, per_model.seen]),
    ):
        dependency = compat.listen(gr, event, fn, ins, outs)
        compat.listen(gr, dependency.then, None, mirror_inputs, [], js=MIRROR_JS)
    compat.listen(gr, per_model.follow.click, follow, [per_model.seen, clip_skip_auto, clip_skip],
                  [per_model.seen, clip_skip_auto, clip_skip])  # fmt: skip
    handlers.update(chose=chose, use=use, follow=follow)
    return handlers
