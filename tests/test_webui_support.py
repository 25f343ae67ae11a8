"""Fixtures and helpers shared by the WebUI-layer tests (``test_webui_*.py``); no tests here.

* ``webui``: the common fake WebUI tree on ``sys.path``, the model/data/cache folders in a tmp dir,
  and a fresh import of ``te_switch.webui`` (module-level state never leaks between tests);
* ``tiny_kinds``: tiny HF CLIP towers (width 64) count as CLIP-L / Long-CLIP-L / CLIP-G / CLIP-H, so
  files are a few hundred KB and hashing or reading them whole is instant. Only core's shape table
  is replaced; reading, converting and checking values run for real;
* ``FakeHost``: a HostAdapter that records what the script asks of it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(__file__))

import filemakers as fm
from fakes.harness import fake_webui

from te_switch.core import detect
from te_switch.core.errors import IncompatibleError
from te_switch.core.selection import SLOTS_BY_FAMILY, Selection
from te_switch.hosts.base import HostAdapter
from te_switch.hosts.engine import EncoderSource, LiveSlot

TINY_VOCAB = 320
TINY_WIDTH = 64
TINY_LAYERS = {"clip-l": 2, "clip-g": 3, "clip-h": 4}


def purge_te_switch_webui() -> None:
    """Forget imported ``te_switch.webui`` modules: they bind ``modules.*`` at import time."""
    for name in list(sys.modules):
        if name.startswith("te_switch.webui"):
            del sys.modules[name]
    import te_switch.hosts

    te_switch.hosts.set_adapter(None)


def install_tiny_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    original = detect._clip_kind

    def clip_kind(width: int | None, layers: int, positions: int | None) -> tuple[str, str | None]:
        if width == TINY_WIDTH:
            if layers == TINY_LAYERS["clip-l"]:
                return ("clip-l" if positions == 77 else "long-clip-l"), None
            for kind, n in TINY_LAYERS.items():
                if layers == n:
                    return kind, None
        return original(width, layers, positions)

    monkeypatch.setattr(detect, "_clip_kind", clip_kind)


@pytest.fixture
def tiny_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    install_tiny_kinds(monkeypatch)


def write_clip(path: Path, *, kind: str = "clip-l", positions: int = 77, seed: int = 0, nan: bool = False) -> Path:
    """A tiny HF-format CLIP tower with random values (``nan``: one weight holds a NaN)."""
    layers = TINY_LAYERS["clip-l" if kind == "long-clip-l" else kind]
    spec = fm.hf_clip_spec(TINY_WIDTH, layers, vocab=TINY_VOCAB, positions=positions, dtype="F32")
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(shape, generator=gen) * 0.02 for k, (shape, _) in spec.items()}
    if nan:
        tensors["text_model.final_layer_norm.weight"][3] = float("nan")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def truncate(path: Path) -> Path:
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return path


@pytest.fixture
def webui(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Path]]:
    """The common fake WebUI with its folders under ``tmp_path``; yields the folder paths."""
    install_tiny_kinds(monkeypatch)
    models = tmp_path / "models"
    data = tmp_path / "data"
    for sub in ("CLIP", "text_encoder", "text_encoders"):
        (models / sub).mkdir(parents=True)
    data.mkdir()
    monkeypatch.delenv("SD_WEBUI_CACHE_DIR", raising=False)
    purge_te_switch_webui()
    with fake_webui("common"):
        from modules import paths, script_callbacks, shared

        monkeypatch.setattr(paths, "models_path", str(models))
        monkeypatch.setattr(paths, "data_path", str(data))
        monkeypatch.setattr(shared, "config_filename", str(data / "config.json"))
        script_callbacks.clear_callbacks()
        shared.state.begin()
        yield {"models": models, "clip": models / "CLIP", "data": data, "cache": data / "cache" / "te_switch"}
    purge_te_switch_webui()


class FakeHost(HostAdapter):
    """Records the script's calls; ``apply`` resolves every chosen encoder like the real base does
    (so missing/wrong files fail the same way) and can be told to fail like the engine."""

    name = "fake"

    def __init__(self, family: str | None = "sd1") -> None:
        super().__init__()
        self.model_family = family
        self.calls: list[tuple[str, Any]] = []
        self.fail_with: Exception | None = None
        self.loaded: dict[str, EncoderSource] = {}
        self.model: Any = type(
            "Model",
            (),
            {"sd_checkpoint_info": type("Info", (), {"name": "model-a.safetensors", "shorthash": "abcdef0123"})()},
        )()

    def live_model(self) -> Any | None:
        return self.model if self.model_family else None

    def family(self, model: Any) -> str | None:
        return self.model_family

    def slots(self, model: Any) -> dict[str, LiveSlot]:
        return {
            name: LiveSlot(name, torch.nn.Linear(1, 1), to_host=dict) for name in SLOTS_BY_FAMILY[self.model_family]
        }

    def apply(self, selection: Selection, resolve: Any = None) -> list[str]:
        self.calls.append(("apply", selection))
        sources = {}
        for slot in self.slot_names():
            choice = selection.slot(slot)
            if choice.encoder:
                sources[slot] = resolve(slot, choice.encoder)
        if self.fail_with is not None:
            raise self.fail_with
        self.loaded = sources
        self.requested = selection
        return list(sources)

    def after_swap(self, model: Any) -> None:
        pass

    def begin(self, selection: Selection) -> None:
        self.calls.append(("begin", selection))
        super().begin(selection)

    def end(self) -> None:
        self.calls.append(("end", None))
        super().end()

    def status(self) -> dict[str, Any]:
        slots = {}
        for slot in self.slot_names():
            src = self.loaded.get(slot)
            slots[slot] = {
                "encoder": src.label if src else "Built-in",
                "hash": src.short_hash if src else None,
                "precision": "auto",
            }
        return {"host": self.name, "family": self.model_family, "slots": slots}

    def install(self) -> None:
        self.calls.append(("install", None))

    def uninstall(self) -> None:
        self.calls.append(("uninstall", None))

    def on_model_loaded(self, sd_model: Any) -> None:
        self.calls.append(("model_loaded", sd_model))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def engine_failure() -> Exception:
    return IncompatibleError(
        "x.safetensors: text_model.embeddings.position_embedding.weight is [248, 768] but "
        "the CLIP-L slot needs [77, 768]"
    )


def use_host(host: HostAdapter | None) -> None:
    import te_switch.hosts

    te_switch.hosts.set_adapter(host)
