"""Which host adapter serves the running WebUI, decided from what is live, never from versions.

* A loaded model answers directly: a Forge 2 model carries ``forge_objects`` and no
  ``cond_stage_model``; a reForge / Forge Classic model carries both (A1111's text wrappers over
  Forge's objects); an A1111 model has ``cond_stage_model`` / ``conditioner`` / ``text_encoders``.
* Before any model is loaded (Forge loads on the first generation), what can be imported
  decides: ``modules_forge`` together with ``backend.diffusion_engine`` is Forge 2, together with
  ``ldm_patched`` it is reForge / Forge Classic; a WebUI with ``modules.sd_hijack`` and neither is A1111.

The adapter modules are imported lazily (the adetailer import-fallback style), so importing
``te_switch.hosts`` never needs a WebUI.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import threading
from types import ModuleType
from typing import Any

from te_switch.hosts.base import HostAdapter

FORGE = "forge"
LDM_FORGE = "ldm-forge"  # reForge, Forge Classic
A1111 = "a1111"
ADAPTER_MODULES = {
    FORGE: "te_switch.hosts.forge",
    LDM_FORGE: "te_switch.hosts.ldm_forge",
    A1111: "te_switch.hosts.a1111",
}

_lock = threading.Lock()
_adapter: HostAdapter | None = None


def importable(module: str) -> bool:
    """True when ``module`` can be imported (``find_spec('a.b')`` raises when ``a`` is missing)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def kind_of_model(model: Any) -> str | None:
    """'forge' | 'ldm-forge' | 'a1111' from a live model object; None when it tells nothing (e.g.
    Forge's FakeInitialModel before the first generation)."""
    if model is None:
        return None
    if hasattr(model, "forge_objects"):
        return LDM_FORGE if getattr(model, "cond_stage_model", None) is not None else FORGE
    if any(getattr(model, name, None) is not None for name in ("cond_stage_model", "conditioner", "text_encoders")):
        return A1111
    return None


def kind_of_environment() -> str | None:
    """'forge' | 'ldm-forge' | 'a1111' from what the running process can import; None outside a WebUI."""
    if importable("modules_forge") and importable("backend.diffusion_engine"):
        return FORGE
    if importable("modules_forge") and importable("ldm_patched"):
        return LDM_FORGE
    if importable("modules.sd_hijack") and importable("modules.sd_models"):
        return A1111
    return None


def detect(model: Any = None) -> str | None:
    return kind_of_model(model) or kind_of_environment()


def adapter_class(module: ModuleType, kind: str) -> type[HostAdapter]:
    """The concrete :class:`HostAdapter` a host module defines (preferring one named ``kind``)."""
    found = [
        cls
        for cls in vars(module).values()
        if inspect.isclass(cls)
        and issubclass(cls, HostAdapter)
        and cls.__module__ == module.__name__
        and not inspect.isabstract(cls)
    ]
    if not found:
        raise ImportError(f"{module.__name__} defines no host adapter")
    return next((c for c in found if getattr(c, "name", None) == kind), found[0])


def create(kind: str) -> HostAdapter:
    module = importlib.import_module(ADAPTER_MODULES[kind])
    return adapter_class(module, kind)()


def get_adapter(model: Any = None) -> HostAdapter | None:
    """The process's adapter (created on first use). ``model``: a live model to decide by.

    Returns None outside a supported WebUI; raises ImportError when the adapter for a detected
    host cannot be imported (the caller reports it once).
    """
    global _adapter
    with _lock:
        if _adapter is not None:
            return _adapter  # one WebUI per process: the first decision stands
        kind = detect(model)
        if kind is None:
            return None
        _adapter = create(kind)
        return _adapter


def set_adapter(adapter: HostAdapter | None) -> None:
    """Use ``adapter`` from now on (tests, the standalone page)."""
    global _adapter
    with _lock:
        _adapter = adapter
