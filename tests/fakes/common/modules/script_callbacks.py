"""Fake of modules/script_callbacks.py: the registration functions and their triggers."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any


@dataclasses.dataclass
class ScriptCallback:
    script: str
    callback: Any
    name: str = "unnamed"


@dataclasses.dataclass
class BeforeTokenCounterParams:
    prompt: str
    steps: int
    styles: list
    is_positive: bool = True


callback_map: dict[str, list[ScriptCallback]] = defaultdict(list)


def _add(category: str, callback, name=None) -> None:
    callback_map[category].append(ScriptCallback("extension", callback, name or "unnamed"))


def _run(category: str, *args) -> None:
    for c in list(callback_map[category]):
        c.callback(*args)


def clear_callbacks() -> None:
    callback_map.clear()


def remove_current_script_callbacks() -> None:
    clear_callbacks()


def remove_callbacks_for_function(callback_func) -> None:
    for lst in callback_map.values():
        lst[:] = [c for c in lst if c.callback != callback_func]


def on_app_started(callback, *, name=None):
    _add("callbacks_app_started", callback, name)


def on_model_loaded(callback, *, name=None):
    _add("callbacks_model_loaded", callback, name)


def on_ui_settings(callback, *, name=None):
    _add("callbacks_ui_settings", callback, name)


def on_infotext_pasted(callback, *, name=None):
    _add("callbacks_infotext_pasted", callback, name)


def on_script_unloaded(callback, *, name=None):
    _add("callbacks_script_unloaded", callback, name)


def on_before_ui(callback, *, name=None):
    _add("callbacks_before_ui", callback, name)


def on_before_token_counter(callback, *, name=None):
    _add("callbacks_before_token_counter", callback, name)


def app_started_callback(demo, app):
    _run("callbacks_app_started", demo, app)


def model_loaded_callback(sd_model):
    _run("callbacks_model_loaded", sd_model)


def ui_settings_callback():
    _run("callbacks_ui_settings")


def infotext_pasted_callback(infotext: str, params: dict[str, Any]):
    _run("callbacks_infotext_pasted", infotext, params)


def script_unloaded_callback():
    _run("callbacks_script_unloaded")


def before_ui_callback():
    _run("callbacks_before_ui")


def before_token_counter_callback(params: BeforeTokenCounterParams):
    _run("callbacks_before_token_counter", params)
