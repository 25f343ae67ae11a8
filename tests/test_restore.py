"""Built-in without a second copy: restore from the host's own file, proven by the fingerprint.

The slot's module is loaded from a "checkpoint" file the way hosts load one (copied into its own
parameters, or left as views of the file's mapping as transformers and Forge leave them); the engine is
told where it came from (:class:`BuiltinSource`). Oracles: the bytes of every tensor before the first
swap (``bits``), and the bytes the file holds.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import filemakers as fm
import pytest
import torch
from safetensors.torch import load_file
from swaps import assert_bits, bits, fail_first_load, hf_clip, hf_file, make_t5, one_line_error, save, source

from te_switch.core import lowbit
from te_switch.core.detect import detect
from te_switch.core.errors import TESwitchError
from te_switch.core.fingerprint import is_mapped, mapped_ranges
from te_switch.core.readers import open_file
from te_switch.core.selection import SlotChoice
from te_switch.hosts.engine import BuiltinSource, LiveSlot, SlotRequest, SwapEngine
from te_switch.hosts.slots import hf_clip_slot, t5_slot

PREFIX = "cond_stage_model.transformer."


def checkpoint(folder: Path, seed: int, name: str = "model.safetensors") -> tuple[Path, torch.nn.Module]:
    """An SD1-style checkpoint holding a CLIP-L tower (plus a stand-in UNet tensor), fp16 as published."""
    donor = hf_clip(seed).half()
    state = {PREFIX + k: v for k, v in fm.hf_clip_state(donor).items()}
    state["model.diffusion_model.out.0.weight"] = torch.randn(8, 8).half()
    return save(folder / name, state), donor


def builtin_of(path: Path) -> BuiltinSource:
    with open_file(path) as src:
        tower = next(t for t in detect(src) if t.prefix == PREFIX)
    return BuiltinSource(str(path), tower)


def loaded(path: Path, *, mapped: bool = False) -> torch.nn.Module:
    """A tower as a host loads it: copied into its parameters, or (``mapped``) as views of the file."""
    model = hf_clip(0).half()
    state = {k[len(PREFIX) :]: v for k, v in load_file(str(path)).items() if k.startswith(PREFIX)}
    slot = hf_clip_slot("clip_l", model)
    host = slot.to_host({("text_model." + k if not k.startswith("text_model.") else k): v for k, v in state.items()})
    live = slot.live_tensors()
    with torch.no_grad():
        for key, value in host.items():
            if key in live:
                if mapped:
                    live[key].data = value
                else:
                    live[key].copy_(value)
    return model


def request(slot: LiveSlot, builtin: BuiltinSource, src=None) -> SlotRequest:
    return SlotRequest(slot, SlotChoice(src.label if src else None), src, None, lambda: builtin)


@pytest.fixture
def notes() -> list[str]:
    return []


def test_builtin_comes_back_from_the_checkpoint_with_no_copy_kept(tmp_path: Path, notes: list[str]) -> None:
    ckpt, _ = checkpoint(tmp_path, 1)
    model = loaded(ckpt)
    before = bits(model)
    slot, engine = hf_clip_slot("clip_l", model), SwapEngine(notify=notes.append)
    a, _ = hf_file(tmp_path, 2, proj=False)
    engine.apply([request(slot, builtin_of(ckpt), source(a, "clip-l"))])
    assert engine.kept_bytes(slot) == 0
    assert notes == []
    assert not same(model, before)
    assert engine.apply([request(slot, builtin_of(ckpt))]) == ["clip_l"]
    assert_bits(model, before)


def test_views_of_the_mapped_file_come_back_as_views_and_are_never_written(tmp_path: Path) -> None:
    ckpt, _ = checkpoint(tmp_path, 1)
    model = loaded(ckpt, mapped=True)
    before = bits(model)
    weight = model.get_input_embeddings().weight
    ptr = weight.data_ptr()
    assert is_mapped(weight, mapped_ranges())
    slot, engine = hf_clip_slot("clip_l", model), SwapEngine(notify=pytest.fail)
    a, _ = hf_file(tmp_path, 2, proj=False)
    engine.apply([request(slot, builtin_of(ckpt), source(a, "clip-l"))])
    assert weight.data_ptr() != ptr  # pointed elsewhere, not written into
    assert torch.equal(
        load_file(str(ckpt))[PREFIX + "text_model.embeddings.token_embedding.weight"], before_value(before)
    )
    engine.apply([request(slot, builtin_of(ckpt))])
    assert weight.data_ptr() == ptr
    assert is_mapped(weight, mapped_ranges())
    assert_bits(model, before)


def test_weights_released_for_a_packed_file_come_back_in_memory_of_their_own(tmp_path: Path) -> None:
    """An fp8 file kept packed frees the slot's own weights; Built-in rebuilds them as the host held them
    (copied in, A1111's way), not as views of the checkpoint's map: rewriting the checkpoint in place
    afterwards (a re-download) must not change the loaded model."""
    ckpt, _ = checkpoint(tmp_path, 1)
    model = loaded(ckpt)
    before = bits(model)
    slot, engine = hf_clip_slot("clip_l", model), SwapEngine(notify=pytest.fail)
    fp8 = save(tmp_path / "clip_l_fp8.safetensors", fm.hf_clip_state(hf_clip(2), dtype=torch.float8_e4m3fn))
    weight = model.get_input_embeddings().weight
    engine.apply([request(slot, builtin_of(ckpt), source(fp8, "clip-l"))])
    assert lowbit.is_attached(model.get_input_embeddings())
    engine.apply([request(slot, builtin_of(ckpt))])
    assert_bits(model, before)
    ranges = mapped_ranges()
    assert not [n for n, t in model.state_dict().items() if is_mapped(t, ranges)]
    with open(ckpt, "r+b") as f:  # same inode, new bytes
        (header,) = torch.frombuffer(bytearray(f.read(8)), dtype=torch.int64).tolist()
        f.seek(8 + header)
        f.write(bytes(os.path.getsize(ckpt) - 8 - header))
    assert_bits(model, before)
    assert model.get_input_embeddings().weight is weight  # the host's own Parameter object, as before


def before_value(before: dict) -> torch.Tensor:
    key = next(k for k in before if k.endswith("token_embedding.weight"))
    return before[key][2].view(torch.float16).reshape(before[key][1])


def test_weights_changed_in_memory_fall_back_to_a_copy_and_say_so_once(tmp_path: Path, notes: list[str]) -> None:
    ckpt, _ = checkpoint(tmp_path, 1)
    model = loaded(ckpt)
    layer = model.get_encoder().layers[0] if hasattr(model, "get_encoder") else None
    fc1 = next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp.fc1"))
    with torch.no_grad():
        fc1.weight += 0.01  # a LoRA merged in by another extension
    before = bits(model)
    slot, engine = hf_clip_slot("clip_l", model), SwapEngine(notify=notes.append)
    a, _ = hf_file(tmp_path, 2, proj=False)
    b, _ = hf_file(tmp_path, 3, proj=False)
    engine.apply([request(slot, builtin_of(ckpt), source(a, "clip-l"))])
    engine.apply([request(slot, builtin_of(ckpt), source(b, "clip-l"))])
    assert len(notes) == 1
    assert "CLIP-L" in notes[0]
    assert "\n" not in notes[0]
    assert engine.kept_bytes(slot) == fc1.weight.nbytes  # only the tensor the file cannot give back
    engine.apply([request(slot, builtin_of(ckpt))])
    assert_bits(model, before)
    del layer


@pytest.mark.parametrize("how", ["rewritten", "same-size-and-mtime", "deleted"])
def test_a_checkpoint_changed_on_disk_is_refused_in_one_line_and_changes_nothing(tmp_path: Path, how: str) -> None:
    ckpt, _ = checkpoint(tmp_path, 1)
    model = loaded(ckpt)
    slot, engine = hf_clip_slot("clip_l", model), SwapEngine()
    a, _ = hf_file(tmp_path, 2, proj=False)
    engine.apply([request(slot, builtin_of(ckpt), source(a, "clip-l"))])
    swapped = bits(model)
    st = os.stat(ckpt)
    if how == "deleted":
        ckpt.unlink()
    else:
        other, _ = checkpoint(tmp_path, 9, name="other.safetensors")
        with open(ckpt, "r+b") as f:  # in place: same inode
            f.write(other.read_bytes())
        if how == "same-size-and-mtime":
            os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(TESwitchError) as err:
        engine.restore(slot)
    one_line_error(err.value, "CLIP-L", "model.safetensors")
    assert_bits(model, swapped)
    assert engine.applied(slot) is not None  # still swapped, and says so


def test_a_touched_checkpoint_with_the_same_bytes_still_restores(tmp_path: Path) -> None:
    ckpt, _ = checkpoint(tmp_path, 1)
    model = loaded(ckpt)
    before = bits(model)
    slot, engine = hf_clip_slot("clip_l", model), SwapEngine(notify=pytest.fail)
    a, _ = hf_file(tmp_path, 2, proj=False)
    engine.apply([request(slot, builtin_of(ckpt), source(a, "clip-l"))])
    os.utime(ckpt, (1, 1))
    engine.apply([request(slot, builtin_of(ckpt))])
    assert_bits(model, before)


def test_a_failure_mid_commit_rolls_back_from_the_file_without_a_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt, _ = checkpoint(tmp_path, 1)
    model = loaded(ckpt)
    before = bits(model)
    slot, engine = hf_clip_slot("clip_l", model), SwapEngine(notify=pytest.fail)
    a, _ = hf_file(tmp_path, 2, proj=False)
    fail_first_load(model, monkeypatch)
    with pytest.raises(TESwitchError) as err:
        engine.apply([request(slot, builtin_of(ckpt), source(a, "clip-l"))])
    one_line_error(err.value, "undone")
    assert_bits(model, before)
    assert engine.applied(slot) is None


def test_restore_after_the_host_loads_another_checkpoint_into_the_same_module(tmp_path: Path) -> None:
    """A1111's same-config reload: slots go back to Built-in first, then the host loads checkpoint B
    into the same parameters, then the choice is applied again; Built-in is then B's weights."""
    ckpt_a, _ = checkpoint(tmp_path, 1, name="a.safetensors")
    ckpt_b, _ = checkpoint(tmp_path, 5, name="b.safetensors")
    model = loaded(ckpt_a)
    slot, engine = hf_clip_slot("clip_l", model), SwapEngine(notify=pytest.fail)
    f, _ = hf_file(tmp_path, 2, proj=False)
    engine.apply([request(slot, builtin_of(ckpt_a), source(f, "clip-l"))])
    assert engine.restore(slot)  # restore_before_load
    reloaded = loaded(ckpt_b)
    with torch.no_grad():
        for key, value in reloaded.state_dict().items():
            model.state_dict(keep_vars=True)[key].copy_(value)
    after_reload = bits(model)
    engine.apply([request(slot, builtin_of(ckpt_b), source(f, "clip-l"))])
    engine.apply([request(slot, builtin_of(ckpt_b))])
    assert_bits(model, after_reload)


def test_t5_tied_table_is_written_once_and_restored_from_the_file(tmp_path: Path) -> None:
    donor = make_t5(4).half()
    ckpt = save(tmp_path / "t5.safetensors", {k: v for k, v in donor.state_dict().items() if "embed_tokens" not in k})
    model = make_t5(0).half()
    model.load_state_dict(donor.state_dict())
    before = bits(model)
    with open_file(ckpt) as src:
        tower = replace(detect(src)[0], kind="t5-xxl")
    builtin = BuiltinSource(str(ckpt), tower)
    incoming = save(tmp_path / "flan.safetensors", dict(make_t5(7).half().state_dict().items()))
    slot, engine = t5_slot("t5xxl", model), SwapEngine(notify=pytest.fail)
    engine.apply([request(slot, builtin, source(incoming, "t5-xxl"))])
    assert model.shared.weight is model.encoder.embed_tokens.weight
    engine.apply([request(slot, builtin)])
    assert_bits(model, before)


def same(model: torch.nn.Module, want: dict) -> bool:
    from swaps import same_bits

    return same_bits(model, want)


def _resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache now (``mincore`` over a private map of it)."""
    import ctypes
    import mmap

    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mm:
        assert libc.mincore(ctypes.addressof(ctypes.c_char.from_buffer(mm)), size, vec) == 0
    return sum(b & 1 for b in bytes(vec)) * mmap.PAGESIZE


def _disk_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


@pytest.mark.skipif(
    not os.path.exists("/proc/self/io"), reason="needs posix_fadvise, mincore and /proc/self/io (Linux)"
)
def test_proving_a_mapped_tensor_reads_a_few_pages_not_the_tensor(tmp_path: Path) -> None:
    """The fingerprints a swap takes and a restore checks read sampled pages of the host's file. A page
    fault on a map reads the disk's read-ahead window around it (8 MB on some disks): without care, 32
    samples of a cold tensor read the whole tensor, i.e. the whole encoder, from the disk."""
    from te_switch.core.fingerprint import WINDOWS, fingerprint

    weights = torch.randn(4096, 4096).half()  # 32 MB of real data (a sparse file's holes are never read)
    path = save(tmp_path / "big.safetensors", {"w": weights})
    probe = save(tmp_path / "probe.safetensors", {"w": weights})
    for file in (path, probe):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    read = _disk_bytes()
    probe.read_bytes()
    if _resident_bytes(path) > 1 << 20 or _disk_bytes() - read < 30 << 20:
        pytest.skip("files here stay cached, or their reads are not counted (cached below the file system)")
    with open_file(path) as src:
        view = src.load("w")
        assert fingerprint(view) == fingerprint(weights)
        sampled = _resident_bytes(path)  # memory pressure can only lower it
    assert sampled <= (WINDOWS * 2 + 4) * 4096  # each window within two pages, plus the header
