"""The file's sha256 is computed once per file state: a swap's first read starts it beside its own
checks, and the library (the infotext's short hash) gets that result instead of a second pass."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest
from swaps import hf_clip, hf_file, req, source

from te_switch.core import digest
from te_switch.core.library import EncoderLibrary
from te_switch.hosts.engine import SwapEngine
from te_switch.hosts.slots import hf_clip_slot


@pytest.fixture
def passes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every full pass of the hash over a file (and a clean registry: each test hashes from scratch)."""
    monkeypatch.setattr(digest, "_known", {})
    monkeypatch.setattr(digest, "_running", {})
    seen: list[str] = []
    real = digest._hash

    def counting(path: str) -> str:
        seen.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(digest, "_hash", counting)
    visiting = digest.sha256_visiting

    def counting_visits(path: str, *args: object) -> str:
        seen.append(os.path.basename(path))
        return visiting(path, *args)

    monkeypatch.setattr(digest, "sha256_visiting", counting_visits)
    return seen


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_swap_hashes_its_file_once_and_the_library_reuses_that_hash(tmp_path: Path, passes: list[str]) -> None:
    folder = tmp_path / "CLIP"
    folder.mkdir()
    path, _ = hf_file(folder, 3)
    model = hf_clip(0)
    SwapEngine(notify=lambda line: None).apply([req(hf_clip_slot("clip_l", model), source(path, "clip-l"))])
    library = EncoderLibrary([str(folder)])
    assert library.short_hash(str(path)) == sha256(path)[:10]
    assert library.short_hash(str(path)) == sha256(path)[:10]
    assert passes == [path.name]


def test_one_read_checks_every_tensor_and_hashes_the_file(tmp_path: Path, passes: list[str]) -> None:
    """Tensors across several read pieces (CHUNK made small), odd header lengths: the pass sees every byte."""
    import torch
    from safetensors.torch import save_file

    tensors = {f"t{i}": torch.randn(37 + i, 5).to(dt) for i, dt in enumerate([torch.float16, torch.float32] * 4)}
    path = tmp_path / "many.safetensors"
    save_file(tensors, str(path), metadata={"x": "y" * 13})
    with open(path, "rb") as f:
        data = f.read()
    seen: dict[int, bytearray] = {}
    spans = sorted(_spans(path).values())

    def visit(i: int, piece: memoryview) -> None:
        seen.setdefault(i, bytearray()).extend(piece)

    import te_switch.core.digest as d

    old, old_ring = d.CHUNK, d.RING
    d.CHUNK, d.RING = 64, 2  # the ring runs out: some pieces are hashed from the file instead
    try:
        digest.sha256_visiting(str(path), spans, visit)
        assert digest.sha256(str(path)) == hashlib.sha256(data).hexdigest()
    finally:
        d.CHUNK, d.RING = old, old_ring
    assert {i: bytes(b) for i, b in seen.items()} == {i: data[b:e] for i, (b, e) in enumerate(spans)}


def _spans(path: Path) -> dict[str, tuple[int, int]]:
    from te_switch.core.readers import open_file

    with open_file(path) as src:
        return {k: src.span(k) for k in src.keys()}  # noqa: SIM118


def test_a_file_changed_on_disk_is_hashed_again(tmp_path: Path, passes: list[str]) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"one" * 1000)
    assert digest.sha256(str(path)) == sha256(path)
    path.write_bytes(b"two" * 1000)  # same size; mtime_ns or the inode tells it apart
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert digest.sha256(str(path)) == sha256(path)
    assert passes == ["a.bin", "a.bin"]


def test_asking_while_the_background_hash_runs_waits_for_it(
    tmp_path: Path, passes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(os.urandom(1 << 20))
    gate = threading.Event()
    counting = digest._hash

    def slow(p: str) -> str:
        gate.wait(5)
        return counting(p)

    monkeypatch.setattr(digest, "_hash", slow)
    digest.start(str(path))
    digest.start(str(path))  # already on its way: no second thread
    assert digest.known(str(path)) is None
    threading.Timer(0.05, gate.set).start()
    assert digest.sha256(str(path)) == sha256(path)
    assert digest.known(str(path)) == sha256(path)
    assert passes == ["big.bin"]


def test_a_failed_hash_is_reported_to_whoever_waits_and_tried_again_next_time(
    tmp_path: Path, passes: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.bin"
    path.write_bytes(b"x" * 100)
    counting = digest._hash
    calls = []

    def flaky(p: str) -> str:
        calls.append(p)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        return counting(p)

    monkeypatch.setattr(digest, "_hash", flaky)
    with pytest.raises(OSError, match="Input/output"):
        digest.sha256(str(path))
    assert digest.sha256(str(path)) == sha256(path)
