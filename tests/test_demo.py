"""The built-in demo: deterministic, atomic, reused, and made of what it claims to be."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

from te_switch.core.detect import inspect_path
from te_switch.standalone import demo


def files_of(folder: str) -> dict[str, bytes]:
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def test_creation_is_deterministic(demo_root: demo.Demo, tmp_path: Path) -> None:
    again = demo.build_demo(str(tmp_path / "again"))
    first, second = files_of(demo_root.root), files_of(again.root)
    assert sorted(first) == sorted(second)
    different = [name for name in first if first[name] != second[name]]
    assert different == []


def test_demo_is_small_and_holds_the_promised_kinds(demo_root: demo.Demo) -> None:
    assert demo.folder_size(demo_root.root) < 450e6
    (builtin,) = inspect_path(os.path.join(demo_root.pipeline, "text_encoder", "model.safetensors"))
    assert (builtin.kind, builtin.layers, builtin.width, builtin.vocab, builtin.positions) == (
        "clip-l",
        12,
        768,
        49408,
        77,
    )
    seen = {}
    for name in demo.ENCODERS:
        (tower,) = inspect_path(demo_root.encoder(name))
        seen[name] = (tower.kind, tower.layout, tower.quant, tower.positions)
    assert seen == {
        "clip-l-alt.safetensors": ("clip-l", "hf", None, 77),
        "clip-l-openai-fp8.safetensors": ("clip-l", "openclip", "fp8", 77),
        "long-clip-l.safetensors": ("long-clip-l", "openclip", "fp8", 248),
    }
    assert "draws noise" in (Path(demo_root.root) / "README.txt").read_text()


def test_existing_demo_is_reused(demo_root: demo.Demo, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_rebuild(folder: str) -> None:
        raise AssertionError("an existing demo must be reused")

    monkeypatch.setattr(demo, "build_demo", no_rebuild)
    root = os.path.dirname(demo_root.root)
    assert demo.ensure_demo(root).root == demo_root.root
    monkeypatch.setenv("TE_SWITCH_CACHE", root)
    assert demo.ensure_demo().root == demo_root.root
    assert demo._manifest(demo_root.root)["model"] == demo.DEMO_MODEL_NAME  # the manifest says what it is


def test_creation_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(folder: str) -> None:
        Path(folder, "pipeline").mkdir(parents=True)  # half-written, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "build_demo", crash)
    with pytest.raises(KeyboardInterrupt):
        demo.ensure_demo(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == []  # neither a demo nor a leftover build folder

    # a folder without a manifest (an older, broken demo) is replaced, not trusted
    (tmp_path / "demo" / "pipeline").mkdir(parents=True)
    calls = []

    def record(folder: str) -> demo.Demo:
        calls.append(folder)
        Path(folder, "demo.json").write_text(json.dumps({"version": demo.DEMO_VERSION}))
        return demo.Demo(folder)

    monkeypatch.setattr(demo, "build_demo", record)
    made = demo.ensure_demo(str(tmp_path))
    assert len(calls) == 1
    assert sorted(os.listdir(made.root)) == ["demo.json"]
    assert sorted(os.listdir(tmp_path)) == ["demo"]
