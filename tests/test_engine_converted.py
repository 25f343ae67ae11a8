"""Swaps of files that need converting on their way in — GGUF expanded at a precision, CLIP-GmP and
OpenAI-layout CLIP (renames, fused ``in_proj`` split or kept), fp8 CLIP expanded at fp32, an HF file
into a fused OpenCLIP slot — stream from the file one tensor at a time, like a plain safetensors swap.

For each case:

* the slot computes exactly what a reference built from the file alone computes (gguf-py's own
  dequantisation, the GmP/OpenCLIP reference modules the files were written from, the fp8 values
  widened by torch);
* a NaN in the last converted tensor is refused before the first parameter is written;
* no converted tensor outlives its write: the tensors the engine's lazy mapping produced are counted
  (their storage sizes, while alive) — at most a few of them exist at any moment, none after the swap.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import filemakers as fm
import pytest
import refmodels as rm
import torch
from safetensors.torch import load_file
from swaps import bits, hf_clip, hf_file, make_t5, openclip, req, same_bits, save, source, t5_encode, t5_ids
from torch import nn

from te_switch.core.errors import TESwitchError
from te_switch.core.fingerprint import is_mapped, mapped_ranges
from te_switch.core.readers import SafetensorsSource
from te_switch.core.tensors import LazyWeight, PackedTensor
from te_switch.hosts import engine as engine_mod
from te_switch.hosts.engine import SwapEngine
from te_switch.hosts.slots import hf_clip_slot, openclip_slot, t5_slot

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}

# ---------------------------------------------------------------------------------------------
# counting what the lazy mapping produces


class Produced:
    """Tensors returned by ``LazyWeight.load`` (packed ones: their raw blocks) that own memory — views of
    a mapped file cost none — counted by storage size while they are alive."""

    def __init__(self) -> None:
        self.alive: dict[int, int] = {}
        self.peak = self.total = self.largest = 0

    def add(self, value: Any) -> None:
        tensor = value.raw if isinstance(value, PackedTensor) else value
        if not isinstance(tensor, torch.Tensor) or is_mapped(tensor, mapped_ranges()):
            return
        size = tensor.untyped_storage().nbytes()
        token = id(tensor)
        if token in self.alive:
            return
        self.alive[token] = size
        weakref.finalize(tensor, self.alive.pop, token, None)
        self.total += size
        self.largest = max(self.largest, size)
        self.peak = max(self.peak, sum(self.alive.values()))


@contextmanager
def produced(monkeypatch: pytest.MonkeyPatch) -> Iterator[Produced]:
    seen = Produced()
    load = LazyWeight.load

    def counted(self: LazyWeight) -> Any:
        value = load(self)
        seen.add(value)
        return value

    monkeypatch.setattr(LazyWeight, "load", counted)
    yield seen
    monkeypatch.undo()


def no_writes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every module write of the engine (none may happen before the values are checked)."""
    writes: list[str] = []
    real = engine_mod._write

    def write(owner: nn.Module, values: Any) -> None:
        writes.append(type(owner).__name__)
        real(owner, values)

    monkeypatch.setattr(engine_mod, "_write", write)
    return writes


# ---------------------------------------------------------------------------------------------
# the cases: (slot model, slot, file, reference output, output of the slot)

Case = tuple[nn.Module, Any, Path, Callable[[nn.Module], Any]]


def _last(sd: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    """``sd`` with ``key`` moved to the end (the file's last tensor)."""
    value = sd.pop(key)
    return {**sd, key: value}


def gguf_t5(folder: Path, precision: str, *, nan: bool = False) -> tuple[nn.Module, Any, Path, Any, str]:
    """A Q8_0 GGUF T5 into an HF T5 slot at fp16/fp32: reference = gguf-py's dequantised values."""
    pytest.importorskip("gguf")
    from synth_gguf import HF_T5_BLOCK, HF_T5_TOP, hf_t5_to_llama_names, write_gguf

    donor = make_t5(21)
    last = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    sd = _last(fm.t5_state(donor), last)
    if nan:
        sd[last][5, 3] = float("nan")
    path = folder / ("t5-nan-Q8_0.gguf" if nan else "t5-Q8_0.gguf")
    held = write_gguf(path, hf_t5_to_llama_names(sd), "Q8_0")
    assert list(held)[-1] == "enc.blk.1.ffn_down.weight"
    names = {v: k for k, v in HF_T5_TOP.items()}
    for i in range(2):
        names.update({f"enc.blk.{i}.{v}": f"encoder.block.{i}.{k}" for k, v in HF_T5_BLOCK.items() if "wi." not in k})
    reference = make_t5(0)
    rm.load_canonical_into_hf(reference, {names[k]: v for k, v in held.items()})
    reference.to(DTYPES[precision])
    if precision == "fp16":  # transformers and the slot keep T5's `wo` in fp32, from the file's values
        for name, param in reference.named_parameters():
            if name.endswith("DenseReluDense.wo.weight"):
                param.data = held[hf_t5_to_llama_names({name: 0}).popitem()[0]].float()
    model = make_t5(1).half()
    return model, t5_slot("t5xxl", model), path, reference, "t5-xxl"


def gmp_openai(folder: Path, into: str, *, nan: bool = False) -> tuple[nn.Module, Any, Path, Any, str]:
    """A CLIP-GmP checkpoint in OpenAI layout (fused in_proj, r/theta) into an HF or OpenCLIP slot."""
    donor = rm.make_openclip(64, 2, 4, vocab=rm.SMALL_VOCAB, proj_dim=48, gmp=True, seed=22)
    last = "transformer.resblocks.1.mlp.c_proj.theta"
    sd = _last(fm.openclip_state(donor), last)
    if nan:
        sd[last][7, 1] = float("nan")
    path = save(folder / ("gmp-nan.safetensors" if nan else "gmp.safetensors"), sd)
    model = hf_clip(1, proj=True) if into == "hf" else openclip(1)
    slot = hf_clip_slot("clip_l", model) if into == "hf" else openclip_slot("clip_l", model)
    return model, slot, path, donor, "clip-l"


def fp8_clip(folder: Path, *, nan: bool = False) -> tuple[nn.Module, Any, Path, Any, str]:
    """A CLIP-L stored fp8 e4m3fn into an fp16 HF slot at fp32: reference = the stored values widened."""
    donor = hf_clip(23)
    last = "text_model.final_layer_norm.bias"
    sd = _last(fm.hf_clip_state(donor), last)
    if nan:
        sd[last][2] = float("nan")
    path = save(
        folder / ("fp8-nan.safetensors" if nan else "fp8.safetensors"),
        {k: v.to(torch.float8_e4m3fn) for k, v in sd.items()},
    )
    reference = hf_clip(0)
    rm.load_canonical_into_hf(reference, {k: v.float() for k, v in load_file(str(path)).items()})
    model = hf_clip(1).half()
    return model, hf_clip_slot("clip_l", model), path, reference, "clip-l"


def hf_into_fused(folder: Path, *, nan: bool = False) -> tuple[nn.Module, Any, Path, Any, str]:
    """An HF-layout CLIP file into an OpenCLIP slot: q, k and v fused again into in_proj."""
    donor = hf_clip(24, proj=True)
    last = "text_model.encoder.layers.1.self_attn.v_proj.weight"
    sd = _last(fm.hf_clip_state(donor), last)
    if nan:
        sd[last][0, 0] = float("nan")
    path = save(folder / ("hf-nan.safetensors" if nan else "hf.safetensors"), sd)
    model = openclip(1)
    return model, openclip_slot("clip_g", model), path, donor, "clip-g"


CASES: dict[str, Callable[..., tuple[nn.Module, Any, Path, Any, str]]] = {
    "gguf-fp16": lambda folder, **kw: gguf_t5(folder, "fp16", **kw),
    "gguf-fp32": lambda folder, **kw: gguf_t5(folder, "fp32", **kw),
    "gmp-into-hf": lambda folder, **kw: gmp_openai(folder, "hf", **kw),
    "gmp-into-openclip": lambda folder, **kw: gmp_openai(folder, "openclip", **kw),
    "fp8-clip-fp32": lambda folder, **kw: fp8_clip(folder, **kw),
    "hf-into-openclip": lambda folder, **kw: hf_into_fused(folder, **kw),
}
PRECISION = {"gguf-fp16": "fp16", "gguf-fp32": "fp32", "fp8-clip-fp32": "fp32"}


def assert_matches_reference(case: str, model: nn.Module, reference: nn.Module) -> None:
    if case.startswith("gguf"):
        ids = t5_ids()
        for got, want in zip(t5_encode(model, ids), t5_encode(reference, ids), strict=True):
            assert torch.equal(got, want)
        return
    toks = rm.clip_tokens(2, 77, rm.SMALL_VOCAB)
    if isinstance(model, rm.OpenClipTextTransformer) and isinstance(reference, rm.OpenClipTextTransformer):
        # the same module code on both sides: GmP folded exactly as GeometricLinear computes it
        got, want = rm.ref_outputs(model, toks), rm.ref_outputs(reference, toks)
        for key in ("last", "pooled"):
            assert torch.equal(got[key], want[key]), key
        return
    got = (
        rm.ref_outputs(model, toks)
        if isinstance(model, rm.OpenClipTextTransformer)
        else rm.hf_clip_outputs(model, toks)
    )
    if isinstance(reference, rm.OpenClipTextTransformer):
        want = rm.ref_outputs(reference, toks)
    else:
        want = rm.hf_clip_outputs(reference, toks)
    if case == "fp8-clip-fp32":
        for key in ("hidden_states", "last"):
            xs, ys = (got[key], want[key]) if isinstance(got[key], list) else ([got[key]], [want[key]])
            assert all(torch.equal(x, y) for x, y in zip(xs, ys, strict=True)), key
        return
    # OpenCLIP and HF attention differ in rounding: a wrong split, fuse, fold or projection is O(1e-2)
    assert rm.max_output_diff(got, want) < 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_converted_swap_computes_like_the_file_and_keeps_no_converted_tensor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    model, slot, path, reference, kind = CASES[case](tmp_path)
    before = bits(model)
    engine = SwapEngine(notify=lambda line: None)  # the test models come from no file: Built-in is a copy
    with produced(monkeypatch) as seen:
        engine.apply([req(slot, source(path, kind), PRECISION.get(case, "auto"))])
        if case == "fp8-clip-fp32":
            assert seen.total == 0  # views of the file, widened by the in-place copy itself
        else:  # converted one at a time from the lazy mapping: never more than two of them alive, not the tower
            assert seen.peak <= 2 * seen.largest, (seen.peak, seen.largest, seen.total)
            assert seen.peak < seen.total / 2, (seen.peak, seen.largest, seen.total)
        assert not seen.alive, f"{len(seen.alive)} converted tensors outlive the swap ({sum(seen.alive.values())} B)"
    assert_matches_reference(case, model, reference)
    engine.apply([req(slot)])
    assert same_bits(model, before)


@pytest.mark.parametrize("case", list(CASES))
def test_a_nan_in_the_last_converted_tensor_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    model, slot, path, _, kind = CASES[case](tmp_path, nan=True)
    before = bits(model)
    writes = no_writes(monkeypatch)
    with pytest.raises(TESwitchError, match="NaN or Inf"):
        SwapEngine().apply([req(slot, source(path, kind), PRECISION.get(case, "auto"))])
    assert writes == []  # refused by the check, not undone by a rollback
    assert same_bits(model, before)


def test_a_nan_in_a_later_piece_of_a_gguf_tensor_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GGUF values check holds a few rows at a time, and still sees a NaN past its first piece."""
    from te_switch.core import gguf_reader
    from te_switch.core.gguf_reader import GGUFSource

    model, slot, path, _, kind = gguf_t5(tmp_path, "fp16", nan=True)
    before = bits(model)
    monkeypatch.setattr(gguf_reader, "PIECE_BYTES", 256)
    sizes: list[int] = []
    real = GGUFSource.pieces

    def pieces(self: GGUFSource, key: str, *args: Any) -> Any:
        for piece in real(self, key, *args):
            if key == "enc.blk.1.ffn_down.weight":
                sizes.append(piece.numel())
            yield piece

    monkeypatch.setattr(GGUFSource, "pieces", pieces)
    with pytest.raises(TESwitchError, match=r"NaN or Inf"):
        SwapEngine().apply([req(slot, source(path, kind), "fp16")])
    assert len(sizes) > 1  # the NaN (row 5) lies past the first piece
    assert max(sizes) <= 256
    assert same_bits(model, before)


def test_a_fused_in_proj_is_read_once_per_pass_and_kept_fused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenAI layout into an HF slot: q, k and v come from one read of in_proj; into an OpenCLIP slot the
    file's own in_proj goes in whole (no split and concatenation in between)."""
    reads: dict[str, int] = {}
    load = SafetensorsSource.load

    def counted(self: SafetensorsSource, key: str) -> torch.Tensor:
        reads[key] = reads.get(key, 0) + 1
        return load(self, key)

    monkeypatch.setattr(SafetensorsSource, "load", counted)
    for into in ("hf", "openclip"):
        model, slot, path, _, kind = gmp_openai(tmp_path / into, into)
        reads.clear()
        SwapEngine().apply([req(slot, source(path, kind))])
        fused = {k: n for k, n in reads.items() if "in_proj" in k}
        assert len(fused) == 4, fused  # 2 layers x (weight, bias)
        assert set(fused.values()) == {1}, fused
        if into == "openclip":
            for key, value in load_file(str(path)).items():
                if "in_proj" in key:
                    assert torch.equal(model.state_dict()[key], value), key


def test_gguf_t5_tied_table_is_read_once_per_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``shared`` and ``encoder.embed_tokens`` are one table: the check and the commit each read it once."""
    from te_switch.core.gguf_reader import GGUFSource

    _, slot, path, _, kind = gguf_t5(tmp_path, "fp16")
    reads: dict[str, int] = {}
    load, pieces = GGUFSource.load, GGUFSource.pieces

    def counted(real: Any) -> Any:
        def read(self: GGUFSource, key: str, *args: Any) -> Any:
            reads[key] = reads.get(key, 0) + 1
            return real(self, key, *args)

        return read

    monkeypatch.setattr(GGUFSource, "load", counted(load))
    monkeypatch.setattr(GGUFSource, "pieces", counted(pieces))  # the values check reads it piece by piece
    SwapEngine().apply([req(slot, source(path, kind), "fp16")])
    assert reads["token_embd.weight"] == 2  # values check, then the load
    assert set(reads.values()) == {2}


def test_a_file_changed_between_its_check_and_its_commit_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lazy weights are read at commit time: the file must still be the one whose values were checked."""
    clip_model = hf_clip(1)
    clip_slot = hf_clip_slot("clip_l", clip_model)
    clip_path, _ = hf_file(tmp_path, 2, proj=False)
    t5_model, t5, gguf_path, _, kind = gguf_t5(tmp_path, "fp16")
    before = (bits(clip_model), bits(t5_model))
    real = SwapEngine._remember

    def remember(self: SwapEngine, slot: Any, request: Any) -> Any:
        if slot is clip_slot:  # both files checked, the CLIP-L about to be committed, the T5 not yet
            os.utime(gguf_path, ns=(1, 1))
        return real(self, slot, request)

    monkeypatch.setattr(SwapEngine, "_remember", remember)
    with pytest.raises(TESwitchError, match="changed on disk"):
        SwapEngine(notify=lambda line: None).apply(
            [req(clip_slot, source(clip_path, "clip-l")), req(t5, source(gguf_path, kind), "fp16")]
        )
    assert same_bits(clip_model, before[0])  # committed first, then put back
    assert same_bits(t5_model, before[1])


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_packed_weights_are_expanded_into_the_slot_a_few_rows_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    """Slices of 7 rows (T5-XXL's token table is written 1024 rows at a time): the same bits as expanding
    every tensor whole, and no temporary the size of a tensor."""
    monkeypatch.setattr(engine_mod, "ROW_CHUNK", 7)
    model, slot, path, reference, kind = gguf_t5(tmp_path, precision)
    expanded: list[int] = []
    dequantize = PackedTensor.dequantize

    def counted(self: PackedTensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        expanded.append(self.shape[0])
        return dequantize(self, *args, **kwargs)

    monkeypatch.setattr(PackedTensor, "dequantize", counted)
    SwapEngine(notify=lambda line: None).apply([req(slot, source(path, kind), precision)])
    assert expanded
    assert max(expanded) <= 7
    assert_matches_reference("gguf", model, reference)
