"""core.readers: every format opens lazily, loads bit-exactly, and every bad file is one BadFileError line."""

from __future__ import annotations

import json
import os
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import filemakers as fm
import pytest
import torch

from te_switch.core.errors import BadFileError, one_line
from te_switch.core.readers import iter_weight_files, open_file
from te_switch.core.tensors import TensorInfo


def every_dtype() -> dict[str, torch.Tensor]:
    """Tensors covering each stored dtype, with every bit pattern where that is cheap (fp8, bf16, fp16)."""
    gen = torch.Generator().manual_seed(0)
    all16 = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    all8 = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    tensors = {
        "f64": torch.randn(3, 5, generator=gen, dtype=torch.float64),
        "f32": torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-45, 3.4e38]),
        "f32_nan_payload": torch.tensor([0x7FC00001, 0x7F800001, -1], dtype=torch.int32).view(torch.float32),
        "f16_all": all16.view(torch.float16).reshape(256, 256),
        "bf16_all": all16.view(torch.bfloat16).reshape(64, 1024),
        "e4m3_all": all8.view(torch.float8_e4m3fn).reshape(16, 16),
        "e5m2_all": all8.view(torch.float8_e5m2),
        "i64": torch.tensor([[-(1 << 62), 0, (1 << 62) + 7]]),
        "i32": torch.tensor([-5, 7], dtype=torch.int32),
        "i16": torch.tensor([-300], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": all8.clone(),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "position_ids": torch.arange(77).unsqueeze(0),
    }
    return {k: v.clone() for k, v in tensors.items()}  # separate storages (pickles refuse shared views)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def assert_bad(path: Path | str, action: Callable[[], object] | None = None) -> BadFileError:
    """``action`` (default: open the file) raises BadFileError: one line, naming the file."""
    with pytest.raises(BadFileError) as info:
        (action or (lambda: open_file(path)))()
    err = info.value
    text = str(err)
    assert "\n" not in text, repr(text)
    assert "\r" not in text, repr(text)
    assert text == one_line(err)
    assert os.path.basename(os.fspath(path).rstrip("/")) in text, f"{text!r} does not name {path}"
    assert len(text) < 400, text
    return err


# ---------------------------------------------------------------------------------------------
# formats open and load bit-exactly


def test_safetensors_every_dtype_bit_exact(tmp_path: Path) -> None:
    tensors = every_dtype()
    path = fm.save_safetensors(tmp_path / "all.safetensors", tensors, metadata={"format": "pt", "note": "x"})
    with open_file(path) as src:
        assert src.format == "safetensors"
        assert set(src.keys()) == set(tensors)
        assert src.metadata == {"format": "pt", "note": "x"}
        for k, t in tensors.items():
            assert src.info(k) == TensorInfo(tuple(t.shape), fm.DTYPES_BY_TORCH[t.dtype]), k
            assert k in src
            assert same_bits(src.load(k), t), k


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("wrap", [None, "state_dict"])
def test_pickle_every_dtype_bit_exact(tmp_path: Path, legacy: bool, wrap: str | None) -> None:
    tensors = every_dtype()
    if legacy:  # torch itself cannot reload fp8 from the pre-1.6 format (and no such files exist)
        tensors = {k: v for k, v in tensors.items() if v.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2)}
    obj: object = tensors if wrap is None else {wrap: tensors, "global_step": 10, "epoch": 2, "hparams": {"lr": 1}}
    path = fm.save_pickle(tmp_path / "all.ckpt", obj, legacy=legacy)
    with open_file(path) as src:
        assert src.format == "pickle"
        assert set(src.keys()) == set(tensors)
        for k, t in tensors.items():
            assert src.info(k) == TensorInfo(tuple(t.shape), fm.DTYPES_BY_TORCH[t.dtype]), k
            assert same_bits(src.load(k), t), k


def test_format_is_told_by_content_not_name(tmp_path: Path) -> None:
    st = fm.save_safetensors(tmp_path / "weights.pt", {"a": torch.ones(2)})
    pk = fm.save_pickle(tmp_path / "weights.safetensors", {"a": torch.ones(2)})
    noext = fm.save_safetensors(tmp_path / "weights", {"a": torch.ones(2)})
    assert open_file(st).format == "safetensors"
    assert open_file(pk).format == "pickle"
    assert open_file(noext).format == "safetensors"


@pytest.mark.parametrize("header_len", [128, 384, 640, 0x80 + 0x0300, 0x0480])
def test_safetensors_header_length_low_byte_0x80(tmp_path: Path, header_len: int) -> None:
    """A header whose length ends in byte 0x80 starts the file with b'\\x80' (like a pickle); still safetensors.

    The safetensors library pads headers to 8 bytes, so 1 in 32 real files has such a length.
    """
    header = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    raw = json.dumps(header).encode()
    raw += b" " * (header_len - len(raw))
    path = tmp_path / "te.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + struct.pack("<2f", 1.5, -2.0))
    assert path.read_bytes()[:1] == b"\x80"
    with open_file(path) as src:
        assert src.format == "safetensors"
        assert src.keys() == ["w"]
        assert src.load("w").tolist() == [1.5, -2.0]


def test_misaligned_tensor_offsets_load_exactly(tmp_path: Path) -> None:
    """Writers other than the safetensors library may leave tensors unaligned (odd header, odd U8 before F32)."""
    vals = torch.tensor([1.25, -3.5, 7.0], dtype=torch.float32)
    half = torch.tensor([0.5, 2.0], dtype=torch.float16)
    header = {
        "odd": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "f32": {"dtype": "F32", "shape": [3], "data_offsets": [3, 15]},
        "f16": {"dtype": "F16", "shape": [2], "data_offsets": [15, 19]},
    }
    raw = json.dumps(header).encode() + b"   "
    raw += b" " * (1 - len(raw) % 2)  # odd header length on purpose
    data = bytes([1, 2, 3]) + vals.numpy().tobytes() + half.numpy().tobytes()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(fm.raw_safetensors(raw, data))
    with open_file(path) as src:
        assert same_bits(src.load("f32"), vals)
        assert same_bits(src.load("f16"), half)
        assert src.load("odd").tolist() == [1, 2, 3]


def test_loaded_tensors_are_writable_copy_on_write(tmp_path: Path) -> None:
    """Callers may modify what they load (in-place conversion); the file must never change."""
    path = fm.save_safetensors(tmp_path / "w.safetensors", {"w": torch.arange(6, dtype=torch.float32)})
    before = path.read_bytes()
    with open_file(path) as src:
        t = src.load("w")
        t.mul_(10)
        assert t.tolist() == [0, 10, 20, 30, 40, 50]
    assert path.read_bytes() == before
    with open_file(path) as src:
        assert src.load("w").tolist() == [0, 1, 2, 3, 4, 5]


def test_nan_and_inf_weights_are_read_faithfully(tmp_path: Path) -> None:
    """Readers do not judge values: NaN/Inf come back bit for bit (validation happens before a swap)."""
    w = torch.randn(4, 4)
    w[0, 0], w[1, 1], w[2, 2] = float("nan"), float("inf"), float("-inf")
    for path in (
        fm.save_safetensors(tmp_path / "n.safetensors", {"w": w}),
        fm.save_pickle(tmp_path / "n.pt", {"w": w}),
    ):
        with open_file(path) as src:
            assert same_bits(src.load("w"), w)


@pytest.mark.parametrize(
    "name",
    ["hf-clip-l", "openai-clip-l", "sdxl-checkpoint", "t5xxl-fp8-e4m3fn", "t5xxl-scaled-fp8-input", "umt5-xxl"],
)
def test_header_only_info_matches_real_shapes(make_case: Callable[[str], Path], name: str) -> None:
    """Real-size headers (data is a sparse hole): keys, order, shapes and dtypes read back as written."""
    path = make_case(name)
    spec = {k: v for k, v in json.loads(_header_of(path)).items() if k != "__metadata__"}
    with open_file(path) as src:
        assert sorted(src.keys()) == sorted(spec)
        for k, entry in spec.items():
            assert src.info(k) == TensorInfo(tuple(entry["shape"]), entry["dtype"])


def _header_of(path: Path) -> str:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(n).decode()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_expanded_real_shape_pickle_info(tmp_path: Path, legacy: bool) -> None:
    spec = fm.openclip_spec(768, 12, proj=768)
    path = fm.save_pickle(tmp_path / "ViT-L-14.pt", fm.expanded_tensors(spec), legacy=legacy)
    assert path.stat().st_size < 1 << 20
    with open_file(path) as src:
        infos = src.infos()
        assert {k: (i.shape, i.dtype) for k, i in infos.items()} == spec


def test_textual_inversion_pickle_unwraps_its_tensor(tmp_path: Path) -> None:
    path = fm.textual_inversion_pt(tmp_path / "emb.pt", vectors=3)
    with open_file(path) as src:
        assert [i.shape for i in src.infos().values()] == [(3, 768)]


# ---------------------------------------------------------------------------------------------
# sharded folders and folder entries


def _t5_shards(tmp_path: Path, fmt: str) -> tuple[Path, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    enc = {
        "shared.weight": torch.randn(10, 4, generator=gen),
        "encoder.block.0.layer.0.SelfAttention.q.weight": torch.randn(4, 4, generator=gen).to(torch.bfloat16),
        "encoder.final_layer_norm.weight": torch.randn(4, generator=gen),
    }
    dec = {"decoder.block.0.layer.0.SelfAttention.q.weight": torch.randn(4, 4), "lm_head.weight": torch.randn(10, 4)}
    index = fm.write_sharded(tmp_path / "t5", [enc, dec], fmt=fmt)
    return index, enc, dec


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_index_loads_by_key(tmp_path: Path, fmt: str) -> None:
    index, enc, dec = _t5_shards(tmp_path, fmt)
    for entry in (index, index.parent):  # the index file or its folder
        with open_file(entry) as src:
            assert src.format == "sharded"
            assert set(src.keys()) == set(enc) | set(dec)
            for k, t in {**enc, **dec}.items():
                assert src.info(k) == TensorInfo(tuple(t.shape), fm.DTYPES_BY_TORCH[t.dtype])
                assert same_bits(src.load(k), t)
    assert json.loads(index.read_text())["metadata"]["total_size"] > 0


@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_sharded_never_touches_an_unneeded_shard(tmp_path: Path, damage: str) -> None:
    index, enc, dec = _t5_shards(tmp_path, "safetensors")
    decoder_shard = index.parent / "model-00002-of-00002.safetensors"
    if damage == "delete":
        decoder_shard.unlink()
    else:
        decoder_shard.write_bytes(b"\xff" * 64)
    with open_file(index) as src:
        assert set(src.keys()) == set(enc) | set(dec)  # the index alone names everything
        for k, t in enc.items():
            assert same_bits(src.load(k), t)
        err = assert_bad(decoder_shard if damage == "corrupt" else index, lambda: src.load("lm_head.weight"))
        assert "00002" in str(err)


def test_sharded_index_bad_entries(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "escape.index.json").write_text(json.dumps({"weight_map": {"a": "../outside.safetensors"}}))
    assert_bad(folder / "escape.index.json")
    (folder / "nomap.index.json").write_text(json.dumps({"metadata": {}}))
    assert_bad(folder / "nomap.index.json")
    (folder / "broken.index.json").write_text('{"weight_map": {"a": ')
    assert_bad(folder / "broken.index.json")
    (folder / "listmap.index.json").write_text(json.dumps({"weight_map": ["a"]}))
    assert_bad(folder / "listmap.index.json")
    # a shard that is itself an index, and a shard that lacks a key the index promises
    fm.save_safetensors(folder / "real.safetensors", {"b": torch.ones(1)})
    (folder / "inner.index.json").write_text(json.dumps({"weight_map": {"z": "real.safetensors"}}))
    (folder / "self.index.json").write_text(
        json.dumps({"weight_map": {"a": "inner.index.json", "c": "real.safetensors"}})
    )
    with open_file(folder / "self.index.json") as src:
        assert_bad(folder / "self.index.json", lambda: src.load("a"))
        assert_bad(folder / "self.index.json", lambda: src.load("c"))


def test_folder_with_one_weights_file_opens_it(tmp_path: Path) -> None:
    fm.save_safetensors(tmp_path / "model.safetensors", {"a": torch.ones(1)})
    (tmp_path / "config.json").write_text("{}")
    with open_file(tmp_path) as src:
        assert src.keys() == ["a"]


def test_iter_weight_files_lists_index_not_its_shards(tmp_path: Path) -> None:
    index, _, _ = _t5_shards(tmp_path, "safetensors")
    fm.save_safetensors(tmp_path / "clip_l.safetensors", {"a": torch.ones(1)})
    (tmp_path / "notes.txt").write_text("x")
    found = sorted(os.path.relpath(p, tmp_path) for p in iter_weight_files(str(tmp_path)))
    assert found == ["clip_l.safetensors", os.path.join("t5", index.name)]


# ---------------------------------------------------------------------------------------------
# bad inputs: always BadFileError, one line, naming the file, nothing else raised


def _valid_blob() -> bytes:
    return fm.safetensors_bytes({"a": torch.arange(8, dtype=torch.float32), "b": torch.ones(3, dtype=torch.float16)})


def _bad_blobs() -> dict[str, bytes]:
    good = _valid_blob()
    n = fm.header_len(good)
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    return {
        "empty": b"",
        "four-bytes": b"\x01\x02\x03\x04",
        "cut-in-length-field": good[:6],
        "cut-in-header": good[: 8 + n // 2],
        "cut-right-after-header": good[: 8 + n],
        "cut-in-data": good[:-3],
        "header-length-beyond-file": struct.pack("<Q", len(good) + 100) + good[8:],
        "huge-claimed-header": struct.pack("<Q", 1 << 40) + good[8:],
        "malformed-json": fm.raw_safetensors(b'{"a": {"dtype": "F32", "shape": [2], ') + b"\0" * 8,
        "header-not-utf8": fm.raw_safetensors(b'{"\xff\xfe": 1}   '),
        "unknown-dtype": fm.raw_safetensors({"a": {**entry, "dtype": "F4"}}, b"\0" * 8),
        "dtype-not-a-string": fm.raw_safetensors({"a": {**entry, "dtype": 7}}, b"\0" * 8),
        "missing-offsets": fm.raw_safetensors({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8),
        "entry-not-an-object": fm.raw_safetensors({"a": [1, 2]}, b"\0" * 8),
        "shape-bytes-mismatch": fm.raw_safetensors({"a": {**entry, "shape": [3]}}, b"\0" * 8),
        "negative-shape": fm.raw_safetensors({"a": {**entry, "shape": [-2]}}, b"\0" * 8),
        "offsets-reversed": fm.raw_safetensors({"a": {**entry, "data_offsets": [8, 0]}}, b"\0" * 8),
        "offsets-past-end": fm.raw_safetensors({"a": {**entry, "data_offsets": [4, 12]}}, b"\0" * 8),
        "metadata-not-an-object": fm.raw_safetensors({"__metadata__": [1], "a": entry}, b"\0" * 8),
        "garbage": b"this is not a weights file at all, just some text\n" * 3,
        "gguf-magic-then-garbage": b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40,
        "plain-zip": _plain_zip(),
        "not-torch-pickle": b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x07.",
    }


def _plain_zip() -> bytes:
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("readme.txt", "hello")
    return buf.getvalue()


@pytest.mark.parametrize("case", list(_bad_blobs()))
def test_bad_bytes_raise_one_line_bad_file_error(tmp_path: Path, case: str) -> None:
    path = tmp_path / f"{case}.safetensors"
    path.write_bytes(_bad_blobs()[case])
    assert_bad(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_truncated_pickles(tmp_path: Path, legacy: bool) -> None:
    good = fm.save_pickle(tmp_path / "good.pt", {"w": torch.randn(64, 64)}, legacy=legacy)
    blob = good.read_bytes()
    for frac in (0.1, 0.5, 0.97):
        cut = tmp_path / f"cut{int(frac * 100)}.ckpt"
        cut.write_bytes(blob[: int(len(blob) * frac)])
        assert_bad(cut, lambda cut=cut: _read_all(cut))


def _read_all(path: Path) -> None:
    with open_file(path) as src:
        names = src.keys()
        for k in names:
            src.load(k)


def test_missing_path_and_directories(tmp_path: Path) -> None:
    assert_bad(tmp_path / "nope.safetensors")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    assert_bad(empty)
    two = tmp_path / "two_models"
    two.mkdir()
    fm.save_safetensors(two / "a.safetensors", {"a": torch.ones(1)})
    fm.save_safetensors(two / "b.safetensors", {"a": torch.ones(1)})
    assert_bad(two)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("wrapped", [True, False], ids=["inside-checkpoint", "bare"])
@pytest.mark.parametrize("name", ["evil.pt", "evil.ckpt", "evil.bin"])
def test_hostile_pickle_never_runs(tmp_path: Path, legacy: bool, wrapped: bool, name: str) -> None:
    marker = tmp_path / "PWNED"
    path = fm.hostile_pickle(tmp_path / name, marker, legacy=legacy, wrapped=wrapped)
    err = assert_bad(path)
    assert not marker.exists(), "unpickling ran code"
    assert "weights_only" in str(err) or "weights-only" in str(err), str(err)
    # control: the fixture really is hostile when loaded the unsafe way
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_hostile_pickle_named_safetensors_is_refused_as_a_pickle(tmp_path: Path) -> None:
    """Recent torch (2.13 here) hands any *path* ending in .safetensors to the safetensors library;
    a pickle under that name must still be read (and refused) as a pickle, by content."""
    marker = tmp_path / "PWNED"
    path = fm.hostile_pickle(tmp_path / "clip_l.safetensors", marker)
    err = assert_bad(path)
    assert not marker.exists()
    assert "weights_only" in str(err), str(err)
