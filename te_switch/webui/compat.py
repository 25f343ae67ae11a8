"""The few places where Gradio 3.41 (A1111), 4.x (Forge) and 6.x (standalone page) differ."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any


def major(gr: ModuleType) -> int:
    try:
        return int(str(gr.__version__).split(".", 1)[0])
    except (AttributeError, ValueError):
        return 4


def listen(
    gr: ModuleType,
    event: Callable[..., Any],
    fn: Callable[..., Any] | None,
    inputs: Sequence[Any] | None = None,
    outputs: Sequence[Any] | None = None,
    *,
    js: str | None = None,
) -> Any:
    """``component.change(...)`` with a JS hook and no progress overlay, on every Gradio.

    3.x spells the JS hook ``_js`` and wants ``show_progress=False``; 4.x+ spell it ``js`` and
    take ``"hidden"``.
    """
    kwargs: dict[str, Any] = {"fn": fn, "inputs": list(inputs or []), "outputs": list(outputs or [])}
    if major(gr) < 4:
        kwargs["show_progress"] = False
        if js:
            kwargs["_js"] = js
    else:
        kwargs["show_progress"] = "hidden"
        if js:
            kwargs["js"] = js
    return event(**kwargs)


def update(gr: ModuleType, **changes: Any) -> Any:
    """``gr.update`` exists on all three majors (3.41 returns a dict, later ones too)."""
    return gr.update(**changes)


def hidden(gr: ModuleType) -> bool | str:
    """``visible=`` for a component that must stay in the DOM for JavaScript to click.

    Gradio 5+ drops ``visible=False`` components from the page; ``"hidden"`` keeps them.
    """
    return "hidden" if major(gr) >= 5 else False


def warn(gr: ModuleType | None, message: str) -> None:
    """A toast where the running Gradio event can show one; otherwise nothing (callers log)."""
    if gr is None:
        return
    with warnings.catch_warnings():
        # outside an event Gradio falls back to warnings.warn: the console line is printed by callers
        warnings.simplefilter("ignore")
        try:
            gr.Warning(message)
        except Exception:  # a toast is best effort, never a reason to fail
            pass
