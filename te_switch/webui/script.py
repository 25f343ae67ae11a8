"""The AlwaysVisible script "CLIP Skip & Text Encoders" (also the ``alwayson_scripts`` key).

One generation:

* ``process`` (after ``override_settings`` are applied — ``before_process`` runs before them, so a
  per-request ``{"te_switch_clip_skip": "2"}`` would be missed there — and before any
  conditioning): build the effective Selection (X/Y/Z > panel > options > Auto/Built-in; with the
  automatic mode on, an Auto clip skip becomes what the checkpoint and the prompt's LoRAs agree on),
  resolve every chosen encoder once (``webui.sources``), make the model match it (``host.apply`` with
  those sources, atomic), start the encode patches (``host.begin``) and write the infotext from the
  same sources;
* ``postprocess``: ``host.end()``, remember the panel per checkpoint and its clip skip per LoRA (opt-in). ``end`` also runs
  from ``StableDiffusionProcessing.close`` (patched), which every WebUI caller reaches through
  ``with closing(p)`` even when the generation raised.

A failure (bad args, a missing/corrupt/wrong file) is one line: console, the status line, the
generation's comments, a toast where Gradio can show one, and the generation is stopped
(``shared.state.interrupted``) rather than run with the wrong encoder. WebUI hooks swallow
exceptions (``errors.report``), so raising would not stop anything.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from te_switch.core.errors import TESwitchError, one_line
from te_switch.core.selection import Selection
from te_switch.webui import compat, infotext, memory, recommend, runtime, sources, xyz
from te_switch.webui.args import ArgsError, selection_from_args
from te_switch.webui.i18n import tr
from te_switch.webui.panel import panel_backend
from te_switch.webui.ui import TITLE, build_panel

try:  # the WebUI's base class; a plain object outside one, so the package always imports
    from modules import scripts as _scripts

    _ScriptBase: Any = _scripts.Script
except ImportError:
    _scripts = None
    _ScriptBase = object

log = logging.getLogger(__name__)
RUN_ATTR = "te_switch_run"


class RunState:
    """What this script did to one ``p`` (so ``postprocess``/``close`` undo exactly that)."""

    def __init__(self) -> None:
        self.panel: Selection | None = None
        self.resolved: sources.Resolved | None = None  # the effective selection and its files
        self.host: Any = None
        self.failed: str | None = None
        self.ended = False
        self.job: object = _job()
        self.outer: RunState | None = None  # a generation this one runs inside (e.g. ADetailer's)


# runs begun and not ended, innermost last: a nested generation hands the model back to its outer one
_running: list[RunState] = []


def _job() -> object:
    """Identifies the WebUI job (``state.begin`` stamps ``time_start``): nesting never spans jobs."""
    try:
        from modules import shared
    except ImportError:
        return None
    return getattr(shared.state, "time_start", None)


def fail(p: Any, message: str) -> None:
    """Report one line everywhere a user may look, and stop this generation."""
    line = f"{runtime.PREFIX}{message}"
    print(line)
    runtime.set_error(message)
    if hasattr(p, "comment"):
        p.comment(line)
    run = getattr(p, RUN_ATTR, None)
    if isinstance(run, RunState):
        run.failed = message
    compat.warn(sys.modules.get("gradio"), line)  # a toast where the running event can show one
    try:
        from modules import shared

        shared.state.interrupted = True  # the batch loop stops before sampling anything
    except ImportError:
        pass


def live_slots(host: Any) -> tuple[str, ...] | None:
    """The loaded model's slots (None when unknown: then every slot is taken as asked)."""
    if host is None:
        return None
    try:
        names = tuple(host.slot_names())
    except Exception:
        return None
    return names or None


def start(p: Any, args: tuple[Any, ...]) -> RunState:
    """Everything ``process`` does, callable without a Script instance (tests, other callers)."""
    run = RunState()
    setattr(p, RUN_ATTR, run)
    runtime.set_error(None)
    host = runtime.adapter()
    run.host = host
    try:
        run.panel = selection_from_args(args)
        resolved = sources.resolve(runtime.effective(run.panel, xyz.forced(p)), live_slots(host))
        # Auto everywhere + the automatic mode: the models' value
        resolved = resolved.with_selection(recommend.apply_automatic(p, resolved.selection))
    except (ArgsError, TESwitchError, ValueError, OSError) as e:
        fail(p, one_line(e) if isinstance(e, TESwitchError | OSError) else str(e))
        return run
    run.resolved = resolved
    if host is None:
        infotext.write(p, resolved)
        if not resolved.selection.is_auto:
            hosts = "A1111 1.10, Forge 2, reForge or Forge Classic"
            fail(p, tr("this WebUI is not supported: CLIP Skip and encoder swaps need {hosts}", hosts=hosts))
        return run
    _running[:] = [r for r in _running if r.job == run.job and not r.ended]  # a crashed job's runs are gone
    run.outer = _running[-1] if _running else None
    _running.append(run)
    try:
        host.apply(resolved.selection, resolved)  # the host loads the sources the infotext names
        host.begin(resolved.selection)
    except Exception as e:  # atomic swap: the model is as it was; say why in one line
        _end(run)
        fail(p, one_line(e))
        return run
    infotext.write(p, resolved)  # after the swap: a hash found while reading the file is not computed again
    return run


def _end(run: RunState) -> None:
    """Stop this run's encode patches; inside another run, give the model back to that one."""
    if run.ended:
        return
    run.ended = True
    if run in _running:
        _running.remove(run)
    if run.host is None:
        return
    outer = run.outer
    try:
        if outer is not None and not outer.ended and outer.resolved is not None and outer in _running:
            if run.resolved is None or run.resolved.selection != outer.resolved.selection:
                run.host.apply(outer.resolved.selection, outer.resolved)
            run.host.begin(outer.resolved.selection)
        else:
            run.host.end()
    except Exception as e:
        print(f"{runtime.PREFIX}{one_line(e)}")


def finish(p: Any) -> None:
    """``postprocess`` and ``close``: stop the encode patches; remember the panel (opt-in)."""
    run = getattr(p, RUN_ATTR, None)
    if not isinstance(run, RunState) or run.ended:
        return
    _end(run)
    if run.failed or run.panel is None or xyz.forced(p) or not memory.enabled():
        return
    try:
        memory.remember(runtime.checkpoint_key(), run.panel, short_hash=runtime.checkpoint_hash())
    except OSError as e:
        print(f"{runtime.PREFIX}cannot save the per-checkpoint memory: {one_line(e)}")
    recommend.remember(p, run.panel.clip_skip)


class TESwitchScript(_ScriptBase):
    def title(self) -> str:
        return TITLE

    def show(self, is_img2img: bool) -> Any:
        return _scripts.AlwaysVisible if _scripts is not None else True

    def ui(self, is_img2img: bool) -> list[Any]:
        try:
            from modules.ui_components import ToolButton
        except ImportError:
            ToolButton = None
        prompt = getattr(self, "te_switch_prompt", None)
        panel = build_panel(panel_backend(), elem_id=self.elem_id, tool_button=ToolButton, prompt=prompt)
        self.panel = panel
        self.infotext_fields = infotext.fields(panel)
        self.paste_field_names = infotext.paste_field_names()
        return panel.inputs()

    def after_component(self, component: Any, **kwargs: Any) -> None:
        """Keep the tab's prompt box: the recommendation reads its LoRAs (it is built before ``ui``)."""
        if kwargs.get("elem_id") in ("txt2img_prompt", "img2img_prompt"):
            self.te_switch_prompt = component

    def process(self, p: Any, *args: Any) -> None:
        start(p, args)

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        finish(p)
