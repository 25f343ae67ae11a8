"""Each chosen encoder is resolved once per generation into one source that the API's pre-check, the
swap engine and the infotext share (``te_switch.webui.sources``).

The host here is a real ``HostAdapter`` over tiny HF CLIP towers with its own ``SwapEngine``, so
``base.apply`` -> ``requests`` -> the engine's prepare/commit run as they do on a WebUI. What is
counted is the work a resolution costs: the library lookup (``library.lookup``), hashing a file
(``core.digest``, alone or in the values read) and reading a tower's values (``engine.remember_check``
records each read).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import refmodels as rm
from test_webui_api import TITLE, Api
from test_webui_script import generate
from test_webui_support import TINY_LAYERS, TINY_VOCAB, TINY_WIDTH, use_host, webui, write_clip  # noqa: F401

from te_switch.core.selection import Selection
from te_switch.hosts.base import HostAdapter
from te_switch.hosts.engine import LiveSlot, SwapEngine
from te_switch.hosts.slots import hf_clip_slot


class EngineHost(HostAdapter):
    """SDXL-shaped: a CLIP-L and a CLIP-G tower the tiny files fit, and the real swap engine."""

    name = "engine"

    def __init__(self) -> None:
        super().__init__(SwapEngine(notify=lambda line: None))
        self.model = {
            slot: rm.make_hf_clip(TINY_WIDTH, TINY_LAYERS[kind], 4, vocab=TINY_VOCAB, seed=n)
            for n, (slot, kind) in enumerate((("clip_l", "clip-l"), ("clip_g", "clip-g")))
        }

    def live_model(self) -> Any:
        return self.model

    def family(self, model: Any) -> str | None:
        return "sdxl"

    def slots(self, model: Any) -> dict[str, LiveSlot]:
        return {name: hf_clip_slot(name, module) for name, module in model.items()}

    def after_swap(self, model: Any) -> None:
        pass

    def install(self) -> None:
        pass

    def source(self, slot: str) -> Any:
        applied = self.engine.applied(self.slots(self.model)[slot])
        return applied.source if applied is not None else None


class Work:
    """What resolving costs, counted: lookups per slot, hashes per file, value reads per tower."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from te_switch.core import digest
        from te_switch.hosts import engine
        from te_switch.webui import library

        self.lookups: Counter[str] = Counter()
        self.hashes: Counter[str] = Counter()
        self.reads = 0
        lookup, remember_check = library.lookup, engine.remember_check
        hash_alone, hash_visiting = digest._hash, digest.sha256_visiting

        def counted_lookup(value: str, slot: str | None = None) -> Any:
            self.lookups[str(slot)] += 1
            return lookup(value, slot)

        def counted_hash(path: str) -> str:
            self.hashes[Path(path).name] += 1
            return hash_alone(path)

        def counted_hash_visiting(path: str, *args: Any) -> Any:
            self.hashes[Path(path).name] += 1
            return hash_visiting(path, *args)

        def counted_read(*args: Any) -> None:  # every values read of a tower ends in recording its result
            self.reads += 1
            remember_check(*args)

        monkeypatch.setattr(digest, "_known", {})  # each test hashes from scratch
        monkeypatch.setattr(digest, "_running", {})
        monkeypatch.setattr(library, "lookup", counted_lookup)
        monkeypatch.setattr(digest, "_hash", counted_hash)
        monkeypatch.setattr(digest, "sha256_visiting", counted_hash_visiting)
        monkeypatch.setattr(engine, "remember_check", counted_read)

    def reset(self) -> None:
        self.lookups.clear()
        self.hashes.clear()
        self.reads = 0

    def assert_at_most_once(self, slots: tuple[str, ...] = ("clip_l", "clip_g")) -> None:
        assert set(self.lookups) <= set(slots), self.lookups  # nothing resolved without a slot
        assert all(n <= 1 for n in self.lookups.values()), f"resolved more than once per slot: {self.lookups}"
        assert all(n <= 1 for n in self.hashes.values()), f"hashed more than once: {self.hashes}"
        assert self.reads <= len(slots), f"values read {self.reads} times for {len(slots)} slots"


@pytest.fixture
def files(webui: dict[str, Path]) -> dict[str, Path]:  # noqa: F811
    from te_switch.webui import options

    options.register()
    return {
        "clip_l": write_clip(webui["clip"] / "l.safetensors", seed=11),
        "clip_g": write_clip(webui["clip"] / "sub" / "g.safetensors", kind="clip-g", seed=12),
    }


@pytest.fixture
def host(files: dict[str, Path]) -> EngineHost:
    fake = EngineHost()
    use_host(fake)
    return fake


@pytest.fixture
def work(monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]) -> Work:
    return Work(monkeypatch)


def dropdown(label: str) -> str:
    from te_switch.webui import library

    return library.display_label(label)  # what the panel sends back: the decorated label


def test_script_path_resolves_each_slot_once_and_shares_the_source(host: EngineHost, work: Work) -> None:
    args = [False, 2, "both", dropdown("l.safetensors"), "Auto", dropdown("sub/g.safetensors"), "Auto"]
    assert args[3] == "l.safetensors (CLIP-L)"
    p = generate(args)
    assert work.lookups == {"clip_l": 1, "clip_g": 1}
    assert work.hashes == {"l.safetensors": 1, "g.safetensors": 1}  # for the infotext, once
    assert work.reads == 2  # the engine's values check, once per tower
    resolved = p.te_switch_run.resolved
    for slot, key, name in (("clip_l", "TE CLIP-L", "l.safetensors"), ("clip_g", "TE CLIP-G", "sub/g.safetensors")):
        src = host.source(slot)
        assert src is resolved.sources[slot]  # the engine holds the object the generation resolved
        assert p.extra_generation_params[key] == f"{name} [{src.short_hash}]"  # and the infotext wrote it
        assert (src.size, src.layout, src.kind) == (Path(src.path).stat().st_size, "hf", src.tower.kind)
        assert src.checked() == (True, None)  # its values were read and found finite
    work.reset()
    generate(args)  # the next generation with the same files: nothing is looked up, hashed or read again
    work.assert_at_most_once()
    assert (work.lookups, work.hashes, work.reads) == ({}, {}, 0)


def test_api_path_checks_and_generates_with_one_resolution(host: EngineHost, work: Work) -> None:
    api = Api()
    body = {"clip_skip": 2, "clip_l": dropdown("l.safetensors"), "clip_g": "sub/g.safetensors"}
    assert api.generate([body]).status_code == 200  # the pre-check: looked up, values read
    assert work.lookups == {"clip_l": 1, "clip_g": 1}
    assert work.reads == 2
    p = generate(api.received[-1]["alwayson_scripts"][TITLE.lower()]["args"])  # the generation it let through
    work.assert_at_most_once()
    assert work.lookups == {"clip_l": 1, "clip_g": 1}  # the generation reused the pre-check's sources
    assert work.reads == 2  # the engine did not read the values the pre-check had read
    assert p.extra_generation_params["TE CLIP-L"] == f"l.safetensors [{host.source('clip_l').short_hash}]"


def test_api_infotext_path_resolves_once(host: EngineHost, work: Work, files: dict[str, Path]) -> None:
    from te_switch.core.library import sha256_of

    digest = sha256_of(str(files["clip_l"]))[:10]
    api = Api()
    text = f"a cat\nSteps: 20, Sampler: Euler, Seed: 1, Clip skip: 2, TE CLIP-L: l.safetensors [{digest}]"
    work.reset()
    assert api.generate(infotext=text).status_code == 200
    args = api.received[-1]["alwayson_scripts"][TITLE]["args"]
    assert args[0]["clip_l"] == "l.safetensors"
    generate(args)
    work.assert_at_most_once(("clip_l",))
    assert work.lookups == {"clip_l": 1}  # the infotext's "name [hash]" once; its label is the same source


def test_xyz_cells_resolve_each_axis_value_once(host: EngineHost, work: Work) -> None:
    from te_switch.webui import xyz

    axes = {a.label: a for a in xyz.axis_options(type("XYZ", (), {"AxisOption": _Axis}))}
    confirm = axes["[TE] CLIP-L"].confirm
    values = [dropdown("l.safetensors"), "Built-in"]
    confirm(None, values)  # X/Y/Z checks every value before the first cell
    for value in values * 2:  # two rows of cells
        generate([True, 1, "both"], xyz={"clip_l": value})
    assert work.lookups == {"clip_l": 1}
    assert work.reads == 1


def test_a_changed_file_is_resolved_again(files: dict[str, Path]) -> None:
    import os

    from te_switch.webui import sources

    first = sources.source("l.safetensors", "clip_l")
    assert sources.source("./l.safetensors", "clip_l") is first  # another name for the same file
    assert sources.short_hash(first) == first.short_hash is not None
    write_clip(files["clip_l"], seed=99)
    stat = files["clip_l"].stat()
    os.utime(files["clip_l"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = sources.source("l.safetensors", "clip_l")
    assert second is not first
    assert second.mtime != first.mtime
    assert second.short_hash is None  # the old file's hash is not carried over
    assert sources.short_hash(second) != first.short_hash


def test_resolve_drops_what_the_model_lacks_and_keeps_labels(files: dict[str, Path]) -> None:
    from te_switch.core.selection import SlotChoice
    from te_switch.webui import sources

    resolved = sources.resolve(
        Selection(
            None, "both", {"clip_l": SlotChoice("./l.safetensors", "fp16"), "clip_g": SlotChoice("g.safetensors")}
        ),
        ("clip_l",),
    )
    assert resolved.selection == Selection(None, "both", {"clip_l": SlotChoice("l.safetensors", "fp16")})
    assert set(resolved.sources) == {"clip_l"}
    assert resolved("clip_l", "l.safetensors") is resolved.sources["clip_l"]


class _Axis:
    def __init__(self, label: str, kind: Any, apply: Any, **kwargs: Any) -> None:
        self.label = label
        self.confirm = kwargs.get("confirm")
