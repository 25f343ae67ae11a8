"""GGUF: pure-torch block decoders against gguf-py's reference, GGUFSource round trips and bad files.

Decoders are checked against ``gguf.quants.dequantize`` on the same bytes. Both compute in float32
with the same operations in the same order, so float32 output must be bit-identical; float16 and
bfloat16 output must equal that reference rounded once (the decoders cast only at the end).
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from synth_gguf import hf_t5_to_llama_names, random_blocks, write_gguf  # noqa: E402

from te_switch.core import dequant  # noqa: E402
from te_switch.core.errors import BadFileError  # noqa: E402
from te_switch.core.gguf_reader import NEED_GGUF, GGUFSource  # noqa: E402
from te_switch.core.readers import open_file  # noqa: E402
from te_switch.core.tensors import DEQUANTIZERS, PackedTensor  # noqa: E402

QTYPES = list(dequant.TORCH_DECODERS)
SMALL_CHUNK = 1024


def reference(data: np.ndarray, qtype: str) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]).copy())


def assert_bad(path: Path, *needles: str, opener=GGUFSource) -> BadFileError:
    with pytest.raises(BadFileError) as info:
        opener(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(path.name + ": "), msg
    for needle in needles:
        assert needle in msg, msg
    return info.value


def shapes_for(qtype: str) -> list[tuple[int, ...]]:
    block = dequant.BLOCK_SIZES[qtype][0]
    chunk = SMALL_CHUNK // block  # blocks per CPU chunk under the small_chunks fixture
    # the last shape spans two full chunks and a partial one
    return [(block,), (1, block), (3, 2 * block), (2, 3, block), (2 * chunk + 1, block)]


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the CPU chunk loop on small tensors (the real chunk is 256k values)."""
    monkeypatch.setattr(dequant, "CPU_CHUNK_ELEMENTS", SMALL_CHUNK)


# ---------------------------------------------------------------------------------------------
# decoders


def test_block_sizes_match_ggml() -> None:
    for qtype, sizes in dequant.BLOCK_SIZES.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]] == sizes, qtype


def test_every_torch_decoder_is_registered() -> None:
    assert set(QTYPES) == set(dequant.BLOCK_SIZES)
    for qtype in QTYPES:
        assert DEQUANTIZERS[qtype] is dequant.TORCH_DECODERS[qtype]


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("qtype", QTYPES)
def test_decoder_matches_reference_on_random_blocks(qtype: str) -> None:
    """Random bytes cover every bit pattern of the quants and scales (scale fields kept finite)."""
    decode = DEQUANTIZERS[qtype]
    for i, shape in enumerate(shapes_for(qtype)):
        data = random_blocks(qtype, shape, seed=i)
        ref = reference(data, qtype)
        assert ref.shape == shape
        assert torch.isfinite(ref).all()
        raw = torch.from_numpy(data)
        out = decode(raw, torch.Size(shape), torch.float32)
        assert out.dtype == torch.float32
        assert out.shape == shape
        assert torch.equal(out, ref), f"{qtype} {shape}: max diff {(out - ref).abs().max()}"
        # the raw layout does not matter, only the byte order
        assert torch.equal(decode(raw.reshape(-1), torch.Size(shape), torch.float32), ref)
        for dtype in (torch.float16, torch.bfloat16):
            assert torch.equal(decode(raw, torch.Size(shape), dtype), ref.to(dtype)), (qtype, shape, dtype)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_decoder_matches_reference_on_real_quantisation(qtype: str) -> None:
    values = torch.randn(6, 128, generator=torch.Generator().manual_seed(3)).numpy()
    data = gguf.quants.quantize(values, gguf.GGMLQuantizationType[qtype])
    out = DEQUANTIZERS[qtype](torch.from_numpy(data), torch.Size((6, 128)), torch.float32)
    assert torch.equal(out, reference(data, qtype))
    # and it is a quantisation of the input, not just self-consistent
    tolerance = 0.02 if qtype == "Q8_0" else 0.35
    assert (out - torch.from_numpy(values)).abs().max() < tolerance


@pytest.mark.parametrize("qtype", QTYPES)
def test_decoder_stays_on_the_raw_device(qtype: str) -> None:
    """On the meta device every op runs shape-only: nothing may pull the data to the CPU."""
    shape = torch.Size((2, 2 * dequant.BLOCK_SIZES[qtype][0]))
    raw = torch.from_numpy(random_blocks(qtype, tuple(shape))).to("meta")
    out = DEQUANTIZERS[qtype](raw, shape, torch.float16)
    assert (out.device.type, out.shape, out.dtype) == ("meta", shape, torch.float16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", QTYPES)
def test_decoder_on_cuda_matches_reference(qtype: str) -> None:
    shape = (64, 4 * dequant.BLOCK_SIZES[qtype][0])
    data = random_blocks(qtype, shape, seed=5)
    out = DEQUANTIZERS[qtype](torch.from_numpy(data).cuda(), torch.Size(shape), torch.float32)
    assert out.is_cuda
    assert torch.equal(out.cpu(), reference(data, qtype))


@pytest.mark.parametrize("qtype", sorted(dequant.HALF_FIELDS))
def test_scale_fields_tell_whether_blocks_decode_finite(qtype: str) -> None:
    """The values check reads only the float16 fields: it must agree with decoding every block."""
    from synth_gguf import HALF_FIELDS

    assert dequant.HALF_FIELDS[qtype] == HALF_FIELDS[qtype]  # ggml-common.h, written down twice
    shape = torch.Size((4, 2 * dequant.BLOCK_SIZES[qtype][0]))
    raw = torch.from_numpy(random_blocks(qtype, tuple(shape), seed=3))
    assert dequant.blocks_finite(qtype, raw) is True
    assert torch.isfinite(dequant.dequantize(qtype, raw, shape, torch.float32)).all()
    size = dequant.BLOCK_SIZES[qtype][1]
    for offset in HALF_FIELDS[qtype]:
        for bad in (0x7E00, 0x7C00, 0xFC00):  # NaN, +Inf, -Inf
            broken = raw.clone().reshape(-1, size)
            broken[5, offset : offset + 2] = torch.tensor([bad], dtype=torch.int32).view(torch.uint8)[:2]
            broken = broken.reshape(raw.shape)
            assert dequant.blocks_finite(qtype, broken) is False, (offset, hex(bad))
            assert not torch.isfinite(dequant.dequantize(qtype, broken, shape, torch.float32)).all()
    assert dequant.blocks_finite("Q8_1", raw) is None  # no layout known: decode to tell


def test_decoder_rejects_wrong_sizes() -> None:
    raw = torch.zeros(34 * 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="do not hold"):
        DEQUANTIZERS["Q8_0"](raw, torch.Size((3, 32)), torch.float32)
    with pytest.raises(ValueError, match="uint8"):
        DEQUANTIZERS["Q8_0"](raw.to(torch.int16), torch.Size((2, 32)), torch.float32)


def test_numpy_fallback_for_types_without_a_torch_decoder(tmp_path: Path) -> None:
    path = tmp_path / "tq.gguf"
    values = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    held = write_gguf(path, {"w": values}, {"w": "TQ2_0"})
    with GGUFSource(path) as src:
        assert src.info("w").dtype == "TQ2_0"
        w = src.load("w")
    assert isinstance(w, PackedTensor)
    assert "TQ2_0" not in dequant.TORCH_DECODERS
    assert torch.equal(w.dequantize(torch.float32), held["w"])
    assert w.dequantize(torch.bfloat16).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# GGUFSource round trips


def test_t5_round_trip(tmp_path: Path, t5_small) -> None:
    sd = {k: v.detach() for k, v in t5_small.state_dict().items()}
    named = hf_t5_to_llama_names(sd)
    qtypes = {k: "Q8_0" for k, v in named.items() if v.ndim == 2}
    qtypes["token_embd.weight"] = "BF16"
    qtypes["enc.blk.0.attn_rel_b.weight"] = "F16"
    qtypes["enc.blk.1.ffn_down.weight"] = "Q5_1"
    fields = {"general.name": "tiny t5", "t5encoder.block_count": 3, "test.ratio": 0.25, "test.flag": True}
    fields["tokenizer.ggml.scores"] = [0.5] * 40
    path = tmp_path / "t5-tiny.gguf"
    held = write_gguf(path, named, qtypes, "t5encoder", fields)

    src = open_file(path)
    assert isinstance(src, GGUFSource)
    assert src.format == "gguf"
    assert set(src.keys()) == set(named)
    assert "enc.blk.0.attn_q.weight" in src
    assert "enc.output_norm.weight" in src
    meta = src.metadata
    assert meta["general.architecture"] == "t5encoder"
    assert meta["general.name"] == "tiny t5"
    assert (meta["t5encoder.block_count"], meta["test.ratio"], meta["test.flag"]) == ("3", "0.25", "True")
    assert meta["tokenizer.ggml.scores"] == "array[float32 x 40]"
    assert not any(k.startswith("GGUF.") for k in meta)
    for name, tensor in named.items():
        info = src.info(name)
        want = qtypes.get(name, "F32")
        assert (info.shape, info.dtype) == (tuple(tensor.shape), want), name
        w = src.load(name)
        if want.startswith("Q"):
            assert isinstance(w, PackedTensor)
            assert w.qtype == want
            assert w.shape == tensor.shape
            block_size, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[want]]
            assert w.raw.dtype == torch.uint8
            assert w.raw.shape == (tensor.shape[0], tensor.shape[1] // block_size * type_size)
            values = w.dequantize(torch.float32)
        else:
            assert isinstance(w, torch.Tensor)
            assert w.dtype == held[name].dtype
            values = w
        assert torch.equal(values, held[name]), name
    # the quantised file still holds the model: Q8_0 is close to the original weights
    q = src.load("enc.blk.0.attn_q.weight").dequantize()
    assert torch.allclose(q, sd["encoder.block.0.layer.0.SelfAttention.q.weight"], atol=0.02)
    src.close()


def test_k_quants_and_iq4_round_trip(tmp_path: Path) -> None:
    kinds = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ4_NL"]
    tensors = {f"enc.blk.{i}.ffn_up.weight": torch.zeros(3, 512) for i in range(len(kinds))}
    qtypes = {f"enc.blk.{i}.ffn_up.weight": q for i, q in enumerate(kinds)}
    held = write_gguf(tmp_path / "k.gguf", tensors, qtypes)
    with GGUFSource(tmp_path / "k.gguf") as src:
        for name, qtype in qtypes.items():
            w = src.load(name)
            assert (w.qtype, w.shape, src.info(name).dtype) == (qtype, torch.Size((3, 512)), qtype)
            # random blocks: the file's values are gguf-py's reading of them, and ours must agree
            assert held[name].abs().sum() > 0
            assert torch.equal(w.dequantize(torch.float32), held[name]), qtype


def test_bf16_is_preserved_bit_exactly(tmp_path: Path) -> None:
    values = torch.randn(8, 64).to(torch.bfloat16)
    special = torch.tensor([0.0, -0.0, 1e-40, -3.0e38, float("inf"), -float("inf")], dtype=torch.bfloat16)
    values.view(-1)[: special.numel()] = special
    write_gguf(tmp_path / "bf.gguf", {"token_embd.weight": values}, "BF16")
    with GGUFSource(tmp_path / "bf.gguf") as src:
        assert src.info("token_embd.weight").dtype == "BF16"
        loaded = src.load("token_embd.weight")
    assert loaded.dtype == torch.bfloat16
    assert loaded.shape == values.shape
    assert torch.equal(loaded.view(torch.int16), values.view(torch.int16))


def test_plain_tensors_own_their_memory(tmp_path: Path) -> None:
    path = tmp_path / "f.gguf"
    held = write_gguf(path, {"a.weight": torch.randn(4, 32), "b.weight": torch.randn(4, 32)}, "F16")
    with GGUFSource(path) as src:
        a = src.load("a.weight")
        a.mul_(2)  # writable, and writing does not touch the file or the next load
        assert torch.equal(src.load("a.weight"), held["a.weight"])
    assert a.dtype == torch.float16


def test_comfy_orig_shape_is_honoured(tmp_path: Path) -> None:
    path = tmp_path / "orig.gguf"
    flat = torch.randn(4, 64)
    fields = {"comfy.gguf.orig_shape.w": [2, 2, 64], "comfy.gguf.orig_shape.q": [2, 2, 64]}
    held = write_gguf(path, {"w": flat, "q": flat}, {"w": "F32", "q": "Q8_0"}, extra_fields=fields)
    with GGUFSource(path) as src:
        assert src.info("w").shape == (2, 2, 64)
        assert src.info("q").shape == (2, 2, 64)
        assert torch.equal(src.load("w"), held["w"].reshape(2, 2, 64))
        q = src.load("q")
        assert q.shape == torch.Size((2, 2, 64))
        assert torch.equal(q.dequantize(), held["q"].reshape(2, 2, 64))

    write_gguf(path, {"w": flat}, extra_fields={"comfy.gguf.orig_shape.w": [3, 64]})
    assert_bad(path, "original shape [3, 64]")


def test_gguf_source_holds_no_mapping(tmp_path: Path) -> None:
    """Windows cannot delete or rename a mapped file: nothing may stay mapped once open() returns."""
    maps = Path(f"/proc/{os.getpid()}/maps")
    if not maps.exists():
        pytest.skip("needs /proc/<pid>/maps")
    path = tmp_path / "mapped-check.gguf"
    write_gguf(path, {"w": torch.randn(4, 64)}, "Q8_0")
    src = GGUFSource(path)
    w = src.load("w")
    assert str(path) not in maps.read_text()
    renamed = tmp_path / "renamed.gguf"
    path.rename(renamed)
    assert torch.equal(w.raw, GGUFSource(renamed).load("w").raw)

    # a failed open must not leave the map behind either (an exception's traceback could keep it)
    data = renamed.read_bytes()
    broken = tmp_path / "broken-check.gguf"
    broken.write_bytes(data[: _layout(renamed)["end"] - 1])
    with pytest.raises(BadFileError):
        GGUFSource(broken)
    assert str(broken) not in maps.read_text()


def test_load_notices_a_file_that_shrank(tmp_path: Path) -> None:
    path = tmp_path / "shrink.gguf"
    write_gguf(path, {"w": torch.randn(4, 64)}, "F32")
    src = GGUFSource(path)
    os.truncate(path, path.stat().st_size - 16)
    with pytest.raises(BadFileError, match="changed on disk"):
        src.load("w")


def test_load_refuses_a_file_replaced_after_it_was_opened(tmp_path: Path) -> None:
    """The engine checks a GGUF file's values, then loads it: both reads must see the same file."""
    path, other = tmp_path / "a.gguf", tmp_path / "b.gguf"
    write_gguf(path, {"w": torch.randn(4, 64)}, "Q8_0")
    write_gguf(other, {"w": torch.randn(4, 64)}, "Q8_0")
    src = GGUFSource(path)
    src.load("w")
    os.replace(other, path)  # same size, same names: only the inode says it
    with pytest.raises(BadFileError, match="changed on disk"):
        src.load("w")


# ---------------------------------------------------------------------------------------------
# names


def test_hf_t5_names_match_gguf_py(t5_small) -> None:
    sd = t5_small.state_dict()
    named = hf_t5_to_llama_names(sd)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, 3)
    expected = {}
    for key in sd:
        if key == "encoder.embed_tokens.weight":
            continue  # transformers' tied copy of shared.weight
        base = key.removesuffix(".weight")
        expected[name_map.get_name(base) + ".weight"] = sd[key]
    assert named.keys() == expected.keys()
    assert all(named[k] is expected[k] for k in named)
    assert named["token_embd.weight"] is sd["shared.weight"]
    assert "enc.blk.2.ffn_gate.weight" in named
    assert "enc.output_norm.weight" in named


def test_hf_t5_names_non_gated_and_errors() -> None:
    w = torch.zeros(1)
    named = hf_t5_to_llama_names({"encoder.block.0.layer.1.DenseReluDense.wi.weight": w})
    assert named == {"enc.blk.0.ffn_up.weight": w}
    assert hf_t5_to_llama_names({"encoder.embed_tokens.weight": w}) == {"token_embd.weight": w}
    with pytest.raises(ValueError, match=r"decoder\.block\.0"):
        hf_t5_to_llama_names({"decoder.block.0.layer.0.SelfAttention.q.weight": w})


# ---------------------------------------------------------------------------------------------
# bad files


@pytest.fixture
def good_file(tmp_path: Path) -> tuple[Path, gguf.GGUFReader]:
    path = tmp_path / "good.gguf"
    write_gguf(path, {"enc.blk.0.attn_q.weight": torch.randn(4, 64)}, "Q8_0", extra_fields={"a.b": "text"})
    return path


def _layout(path: Path) -> dict[str, int]:
    reader = gguf.GGUFReader(path)
    t = reader.tensors[0]
    info = t.field.offset
    name_len = len(t.name.encode())
    layout = {
        "info": info,
        "dims": info + 8 + name_len + 4,
        "type": info + 8 + name_len + 4 + 8 * len(t.shape),
        "data": int(t.data_offset),
        "end": int(t.data_offset) + int(t.n_bytes),  # the writer pads after this
    }
    del reader, t
    return layout


def _patched(src: Path, dst: Path, offset: int, data: bytes) -> Path:
    blob = bytearray(src.read_bytes())
    blob[offset : offset + len(data)] = data
    dst.write_bytes(bytes(blob))
    return dst


def test_truncated_anywhere_is_one_line_bad_file_error(tmp_path: Path, good_file: Path) -> None:
    layout = _layout(good_file)
    blob = good_file.read_bytes()
    cuts = [2, 6, 16, 30, layout["info"] + 5, layout["type"] + 2, layout["data"] + 10, layout["end"] - 1]
    for cut in cuts:
        path = tmp_path / f"cut-{cut}.gguf"
        path.write_bytes(blob[:cut])
        assert_bad(path, "truncated")
        assert_bad(path, "truncated", opener=open_file)
    # data cut short: the message names the tensor
    assert_bad(tmp_path / f"cut-{layout['end'] - 1}.gguf", "enc.blk.0.attn_q.weight", "past the end")


def test_bad_magic_version_and_empty(tmp_path: Path, good_file: Path) -> None:
    assert_bad(_patched(good_file, tmp_path / "magic.gguf", 0, b"GGML"), "not a GGUF file")
    for version in (1, 4):
        path = _patched(good_file, tmp_path / f"v{version}.gguf", 4, struct.pack("<I", version))
        assert_bad(path, f"unsupported GGUF version {version}")
        assert_bad(path, f"unsupported GGUF version {version}", opener=open_file)
    assert_bad(_patched(good_file, tmp_path / "be.gguf", 4, struct.pack(">I", 3)), "big-endian")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert_bad(empty, "empty file")
    assert_bad(empty, "empty file", opener=open_file)


def test_unknown_and_undecodable_tensor_types(tmp_path: Path, good_file: Path) -> None:
    layout = _layout(good_file)
    unknown = _patched(good_file, tmp_path / "unknown.gguf", layout["type"], struct.pack("<I", 999))
    assert_bad(unknown, "unknown GGUF type id 999", "enc.blk.0.attn_q.weight")
    assert_bad(unknown, "unknown GGUF type id 999", opener=open_file)

    # Q8_1 is a real ggml type (an intermediate for matmuls) that gguf-py cannot decode either
    path = tmp_path / "q8_1.gguf"
    writer = gguf.GGUFWriter(str(path), "t5encoder")
    writer.add_tensor("w", np.zeros((2, 40), dtype=np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_bad(path, "'w'", "Q8_1", "no decoder")

    # a row that is not a whole number of blocks (ne0 = 40 for Q8_0's 32-element blocks)
    rows = _patched(good_file, tmp_path / "rows.gguf", layout["dims"], struct.pack("<Q", 40))
    assert_bad(rows, "whole number of Q8_0 blocks")


def test_garbage_after_a_valid_preamble(tmp_path: Path) -> None:
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + b"\x05\x00\x00\x00\x00\x00\x00\x00abcde" + b"\xff" * 4)
    assert_bad(path, "malformed GGUF header")


def test_missing_gguf_package_is_a_clear_error(tmp_path: Path, good_file: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    err = assert_bad(good_file, NEED_GGUF)
    assert err.reason == "GGUF files need the `gguf` package: pip install gguf"


def test_core_imports_without_gguf() -> None:
    code = (
        "import sys; sys.modules['gguf'] = None\n"
        "from te_switch.core import gguf_reader, lowbit, readers\n"
        "from te_switch.core.tensors import DEQUANTIZERS\n"
        "assert len(DEQUANTIZERS) >= 12, DEQUANTIZERS\n"
        "print('ok')\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"
