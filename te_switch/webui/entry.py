"""Wiring into the WebUI, done once when ``scripts/te_switch.py`` is imported.

Options are registered right away (they must exist before any request); callbacks are added with
``script_callbacks`` (the WebUI removes a script's callbacks itself when it reloads scripts), the
host adapter's patches go in, and ``StableDiffusionProcessing.close`` is wrapped so a generation
that raised still ends our encode patches.
"""

from __future__ import annotations

import inspect
from typing import Any

from te_switch.core.errors import one_line
from te_switch.webui import api, infotext, options, runtime, script, sources, xyz

_installed: dict[str, Any] = {}


def _closing(original: Any) -> Any:
    def close(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(self, *args, **kwargs)
        finally:
            script.finish(self)

    close.te_switch_original = original  # type: ignore[attr-defined]
    return close


def patch_close() -> None:
    """End our encode patches whenever a generation's ``p`` is closed (``with closing(p)``)."""
    from modules import patches, processing

    cls = processing.StableDiffusionProcessing
    if getattr(cls.close, "te_switch_original", None) is not None:
        return
    patches.patch(__name__, cls, "close", _closing(cls.close))
    _installed["close"] = cls


def unpatch_close() -> None:
    cls = _installed.pop("close", None)
    if cls is None:
        return
    from modules import patches

    patches.undo(__name__, cls, "close")


def on_model_loaded(sd_model: Any) -> None:
    """The host reloaded weights: the adapter re-applies the last swap (in place)."""
    host = runtime.adapter()
    handler = getattr(host, "on_model_loaded", None)
    if handler is None:
        return
    try:
        handler(sd_model)
    except Exception as e:  # a failed re-apply leaves the checkpoint's own encoders: say so once
        runtime.set_error(one_line(e))
        print(f"{runtime.PREFIX}{one_line(e)}")


def install_host() -> None:
    host = runtime.adapter()
    if host is None:
        return
    host.resolver = sources.resolver  # reapply() after a weights reload: the last generation's sources
    try:
        host.install()
        _installed["host"] = host
    except Exception as e:
        print(f"{runtime.PREFIX}could not install the host patches: {one_line(e)}")


def unload() -> None:
    """``on_script_unloaded``: undo every patch (the WebUI is reloading its scripts)."""
    host = _installed.pop("host", None)
    if host is not None:
        try:
            host.uninstall()
        except Exception as e:
            print(f"{runtime.PREFIX}could not remove the host patches: {one_line(e)}")
    unpatch_close()


def _on(register: Any, callback: Any, name: str) -> None:
    """``script_callbacks.on_*`` with a name where the WebUI takes one (A1111 1.8+); Forge Classic does not."""
    if "name" in inspect.signature(register).parameters:
        register(callback, name=name)
    else:
        register(callback)


def register() -> None:
    from modules import script_callbacks

    options.register()
    install_host()
    patch_close()
    _on(script_callbacks.on_model_loaded, on_model_loaded, "te_switch_model_loaded")
    _on(script_callbacks.on_infotext_pasted, infotext.on_infotext_pasted, "te_switch_infotext_pasted")
    _on(script_callbacks.on_before_ui, xyz.add_axes, "te_switch_xyz_axes")
    _on(script_callbacks.on_app_started, api.on_app_started, "te_switch_routes")
    _on(script_callbacks.on_script_unloaded, unload, "te_switch_unload")
