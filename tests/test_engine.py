"""hosts.engine.SwapEngine: atomic, in-place, bit-identical swaps.

DESIGN "Swap semantics": a swap reads and validates the whole file before touching the model, loads
in place, and "Built-in" puts the checkpoint's own tensors back bit for bit. Every check below
compares raw bytes (``view(uint8)``) and dtypes of every parameter *and* buffer of the slot module,
against a copy taken before the first swap. Oracles for loaded values are the donor modules the
files were written from (``refmodels``), never te_switch's own conversion.

Runs under transformers 5.x (``CLIPTextModel`` without ``text_model``) and 4.x (the host venvs).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import filemakers as fm
import pytest
import refmodels as rm
import torch
from swaps import (
    HF_SPELLINGS,
    W,
    assert_bits,
    assert_outputs_equal,
    assert_same,
    bits,
    clip_out,
    fail_first_load,
    hf_clip,
    hf_file,
    hf_weights,
    make_t5,
    one_line_error,
    openclip,
    openclip_file,
    param_ids,
    req,
    same_bits,
    save,
    source,
    t5_encode,
    t5_ids,
    t5_variant,
)
from torch import nn

from te_switch.core import lowbit
from te_switch.core.convert import load_tower
from te_switch.core.errors import TESwitchError
from te_switch.core.longclip import causal_mask, stretch_positions
from te_switch.core.readers import open_file
from te_switch.core.tensors import PackedTensor, materialize
from te_switch.hosts import engine as engine_mod
from te_switch.hosts.engine import EncoderSource, LiveSlot, SwapEngine
from te_switch.hosts.slots import hf_clip_slot, openclip_slot, t5_slot, text_transformer

# ---------------------------------------------------------------------------------------------
# swap and Built-in: bit-identical for every module family


@pytest.mark.parametrize("file_flat", [False, True], ids=["file-text_model", "file-flat"])
@pytest.mark.parametrize("spelling", HF_SPELLINGS)
def test_hf_clip_swap_loads_in_place_and_builtin_restores_bits(tmp_path: Path, spelling: str, file_flat: bool) -> None:
    proj = spelling.endswith("Projection")
    model = hf_clip(1, proj=proj)
    before, ids = bits(model), param_ids(model)
    path, donor = hf_file(tmp_path, 2, flat=file_flat)
    slot, engine = hf_clip_slot("clip_l", model), SwapEngine()

    assert engine.apply([req(slot, source(path, "clip-l"))]) == ["clip_l"]
    want = hf_weights(donor)
    if not proj:
        del want["text_projection.weight"]  # the slot has none: dropped, not an error
    assert_same(hf_weights(model), want)
    assert param_ids(model) == ids  # loaded in place: hooks and host references stay valid
    assert_outputs_equal(clip_out(model), clip_out(donor))
    assert engine.applied(slot).source.path == str(path)

    assert engine.apply([req(slot)]) == ["clip_l"]
    assert_bits(model, before)
    assert param_ids(model) == ids
    assert engine.applied(slot) is None
    assert len(engine._memory) == 0  # the snapshot is freed, not kept for later


def test_the_file_streams_in_from_its_end_to_its_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check has just read the file front to back; where it does not fit in the page cache beside the
    model, the cache still holds its tail: the copy starts there (``benchmarks/bench_swap.py``'s cold rows)."""
    model = hf_clip(1)
    path, donor = hf_file(tmp_path, 2)
    slot, engine = hf_clip_slot("clip_l", model), SwapEngine()
    addresses: list[int] = []
    real = engine_mod._write
    monkeypatch.setattr(
        engine_mod,
        "_write",
        lambda owner, values: addresses.extend(v.data_ptr() for v in values.values()) or real(owner, values),
    )
    engine.apply([req(slot, source(path, "clip-l"))])
    assert len(addresses) >= len(hf_weights(donor)) - 1  # every tensor (the slot has no projection)
    assert addresses == sorted(addresses, reverse=True)  # views of the file's map: address order = file order
    assert_outputs_equal(clip_out(model), clip_out(donor))


def test_openclip_tower_swap_and_restore(tmp_path: Path) -> None:
    model = openclip(1)
    before, ids = bits(model), param_ids(model)
    path, donor = openclip_file(tmp_path, 2)
    slot, engine = openclip_slot("clip_g", model), SwapEngine()

    engine.apply([req(slot, source(path, "clip-g"))])
    assert_same(model.state_dict(), donor.state_dict())  # fused in_proj rebuilt bit for bit
    toks = rm.clip_tokens(2, 77, rm.SMALL_VOCAB)
    got, want = rm.ref_outputs(model, toks), rm.ref_outputs(donor, toks)
    assert_outputs_equal(got, want, ("hidden_states", "last", "pooled"))
    assert param_ids(model) == ids

    engine.apply([req(slot)])
    assert_bits(model, before)  # attn_mask (a non-persistent buffer) included


def test_hf_layout_file_into_openclip_tower_matches_the_hf_donor(tmp_path: Path) -> None:
    model = openclip(1)
    path, donor = hf_file(tmp_path, 3)
    engine = SwapEngine()
    engine.apply([req(openclip_slot("clip_g", model), source(path, "clip-g"))])
    toks = rm.clip_tokens(3, 77, rm.SMALL_VOCAB)
    # fp32 (transformers 4.46's eager mask overflows in float64): a wrong q/k/v fuse or projection is O(1e-2)
    assert rm.max_output_diff(rm.ref_outputs(model, toks), rm.hf_clip_outputs(donor, toks)) < 1e-5


@pytest.mark.parametrize("file_layout", ["shared", "embed_tokens"])
@pytest.mark.parametrize("variant", ["hf", "embed-only", "shared-only"])
def test_t5_swap_and_restore(tmp_path: Path, variant: str, file_layout: str) -> None:
    model = t5_variant(make_t5(1), variant)
    before = bits(model)
    donor = make_t5(2)
    stored = fm.t5_state(donor, shared=file_layout == "shared", embed_tokens=file_layout == "embed_tokens")
    path = save(tmp_path / "t5.safetensors", stored)
    slot, engine = t5_slot("t5xxl", model), SwapEngine()

    engine.apply([req(slot, source(path, "t5-xxl"))])
    ids = t5_ids()
    for got, want in zip(t5_encode(model, ids), t5_encode(donor, ids), strict=True):
        assert torch.equal(got, want)
    table = donor.shared.weight
    for key, value in model.state_dict().items():
        if key in ("shared.weight", "encoder.embed_tokens.weight"):
            assert torch.equal(value, table), key

    engine.apply([req(slot)])
    assert_bits(model, before)


# ---------------------------------------------------------------------------------------------
# atomicity: nothing changes unless everything fits


def _bad_clip_g(folder: Path, case: str) -> tuple[Path, str, tuple[str, ...]]:
    """(file, the kind the library would report, words the error must contain)."""
    if case == "wrong-kind":
        path, _ = hf_file(folder, 40, name="a-clip-l.safetensors")
        return path, "clip-l", ("cannot go into", "CLIP-G")
    if case == "truncated":
        path, _ = openclip_file(folder, 41)
        return path, "clip-g", ("truncated",)
    if case == "nan":
        sd = fm.openclip_state(openclip(42))
        sd["transformer.resblocks.1.mlp.c_fc.weight"][3, 5] = float("nan")
        return save(folder / "nan.safetensors", sd), "clip-g", ("NaN",)
    if case == "wrong-shape":
        path, _ = openclip_file(folder, 43, width=32)
        return path, "clip-g", ("needs",)
    if case == "missing-layer":
        path, _ = openclip_file(folder, 44, layers=1)
        return path, "clip-g", ("lacks",)
    if case == "extra-layer":
        path, _ = openclip_file(folder, 45, layers=3)
        return path, "clip-g", ("has no place",)
    if case == "incomplete":
        sd = fm.openclip_state(openclip(46))
        del sd["ln_final.bias"]
        return save(folder / "incomplete.safetensors", sd), "clip-g", ("incomplete",)
    if case == "unexpected-projection":
        path, _ = openclip_file(folder, 47)  # has a text_projection; the slot's tower below has none
        return path, "clip-g", ("has no place",)
    raise AssertionError(case)


BAD_CASES = [
    "wrong-kind",
    "truncated",
    "nan",
    "wrong-shape",
    "missing-layer",
    "extra-layer",
    "incomplete",
    "unexpected-projection",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_second_file_leaves_both_slots_untouched(tmp_path: Path, case: str) -> None:
    clip_l, clip_g = hf_clip(1), openclip(2, proj=None if case == "unexpected-projection" else 48)
    slot_l, slot_g = hf_clip_slot("clip_l", clip_l), openclip_slot("clip_g", clip_g)
    engine = SwapEngine()
    earlier, _ = hf_file(tmp_path, 3)
    engine.apply([req(slot_l, source(earlier, "clip-l"))])  # clip_l already holds a file: it must keep it
    held_l, before_g, epoch = bits(clip_l), bits(clip_g), engine.epoch

    good, _ = hf_file(tmp_path, 4)
    bad, kind, needles = _bad_clip_g(tmp_path / "bad", case)
    bad_src = source(bad, kind)
    if case == "truncated":  # the file shrank after the library scanned it
        os.truncate(bad, os.path.getsize(bad) // 2)
    with pytest.raises(TESwitchError) as err:
        engine.apply([req(slot_l, source(good, "clip-l")), req(slot_g, bad_src)])
    one_line_error(err.value, bad.name, *needles)
    assert_bits(clip_l, held_l)
    assert_bits(clip_g, before_g)
    assert engine.epoch == epoch
    assert engine.applied(slot_l).source.path == str(earlier)
    assert engine.applied(slot_g) is None


def test_failure_during_commit_rolls_back_dtypes_and_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = hf_clip(1).half()
    before = bits(model)
    path, _ = hf_file(tmp_path, 2)
    slot, engine = hf_clip_slot("clip_l", model), SwapEngine()
    fail_first_load(model, monkeypatch)
    with pytest.raises(TESwitchError) as err:
        engine.apply([req(slot, source(path, "clip-l"), "fp32")])  # dtypes are changed before the load
    one_line_error(err.value, "CLIP-L", "undone", "simulated")
    assert_bits(model, before)
    assert engine.applied(slot) is None
    assert len(engine._memory) == 0
    # the engine is usable afterwards
    engine.apply([req(slot, source(path, "clip-l"))])
    engine.apply([req(slot)])
    assert_bits(model, before)


def test_failure_committing_the_second_slot_undoes_the_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DESIGN: atomic across slots. A commit that fails for CLIP-G must not leave CLIP-L swapped."""
    clip_l, clip_g = hf_clip(1), openclip(2)
    slot_l, slot_g = hf_clip_slot("clip_l", clip_l), openclip_slot("clip_g", clip_g)
    before_l, before_g = bits(clip_l), bits(clip_g)
    file_l, _ = hf_file(tmp_path, 3)
    file_g, _ = openclip_file(tmp_path, 4)
    engine = SwapEngine()
    epoch = engine.epoch
    fail_first_load(clip_g, monkeypatch)
    with pytest.raises(TESwitchError):
        engine.apply([req(slot_l, source(file_l, "clip-l")), req(slot_g, source(file_g, "clip-g"))])
    assert_bits(clip_g, before_g)
    undone = same_bits(clip_l, before_l)
    assert undone, f"CLIP-L kept the new file after the apply failed (epoch {epoch} -> {engine.epoch})"
    assert engine.applied(slot_l) is None


def test_failed_swap_over_an_earlier_swap_keeps_the_earlier_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A → (B fails while loading): the model must still be A and the engine must say so."""
    model = hf_clip(1)
    slot, engine = hf_clip_slot("clip_l", model), SwapEngine()
    file_a, _ = hf_file(tmp_path, 2)
    file_b, _ = hf_file(tmp_path, 3)
    src_a = source(file_a, "clip-l")
    engine.apply([req(slot, src_a)])
    held_a, epoch = bits(model), engine.epoch
    fail_first_load(model, monkeypatch)
    with pytest.raises(TESwitchError):
        engine.apply([req(slot, source(file_b, "clip-l"))])
    applied = engine.applied(slot)
    now = "Built-in" if applied is None else applied.source.label
    kept = same_bits(model, held_a)  # DESIGN: any failure leaves the model bit-identical
    assert kept, f"the failed swap left the slot at {now} (epoch {epoch} -> {engine.epoch}), not at A"
    assert applied is not None
    assert applied.source == src_a


# ---------------------------------------------------------------------------------------------
# idempotence, epochs, identities


def test_same_request_twice_is_a_no_op(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = hf_clip(1)
    slot, engine = hf_clip_slot("clip_l", model), SwapEngine()
    assert engine.apply([req(slot)]) == []  # Built-in on an untouched slot
    assert engine.epoch == 0
    path, _ = hf_file(tmp_path, 2)
    src = source(path, "clip-l")
    assert engine.apply([req(slot, src, "fp16")]) == ["clip_l"]
    epoch, held = engine.epoch, bits(model)
    opened: list[str] = []
    real_open = engine_mod.open_file
    monkeypatch.setattr(engine_mod, "open_file", lambda p: opened.append(p) or real_open(p))
    assert engine.apply([req(slot, src, "fp16")]) == []
    assert opened == []  # not even read again
    assert engine.epoch == epoch
    assert_bits(model, held)


def test_epoch_bumps_on_every_real_change(tmp_path: Path) -> None:
    model = hf_clip(1, proj=True)
    slot, engine = hf_clip_slot("clip_l", model), SwapEngine()
    a, _ = hf_file(tmp_path, 2)
    b, _ = hf_file(tmp_path, 3)
    seen = [engine.epoch]
    steps = [
        req(slot, source(a, "clip-l")),
        req(slot, source(b, "clip-l")),
        req(slot, source(b, "clip-l"), "bf16"),
        req(slot, None, "fp16"),  # the checkpoint's own weights at another precision
        req(slot, None, positions=248),
        req(slot),
    ]
    for step in steps:
        assert engine.apply([step]) == ["clip_l"]
        assert engine.epoch > seen[-1]
        seen.append(engine.epoch)


def test_touched_file_is_a_new_identity(tmp_path: Path) -> None:
    model = hf_clip(1)
    slot, engine = hf_clip_slot("clip_l", model), SwapEngine()
    path, _ = hf_file(tmp_path, 2)
    src = source(path, "clip-l")
    engine.apply([req(slot, src)])
    # the user replaced the file under the same name: the next apply must load the new content
    _, donor = hf_file(tmp_path, 5, name=path.name)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert engine.apply([req(slot, src)]) == ["clip_l"]
    assert_same(hf_weights(model), {k: v for k, v in hf_weights(donor).items() if "projection" not in k})


def test_a_changed_shard_is_a_new_identity(tmp_path: Path) -> None:
    """A sharded encoder is its index *and* its shards (as the library's cache sees it)."""
    model = make_t5(1)
    state = fm.t5_state(make_t5(2))
    second = {k: v for k, v in state.items() if ".block.1." in k}
    first = {k: v for k, v in state.items() if k not in second}
    index = fm.write_sharded(tmp_path / "t5", [first, second])
    slot, engine = t5_slot("t5xxl", model), SwapEngine()
    src = source(index, "t5-xxl")
    engine.apply([req(slot, src)])
    newer = fm.t5_state(make_t5(3))
    shard = next(index.parent.glob("model-00002-*.safetensors"))
    fm.save_safetensors(shard, {k: newer[k] for k in second})  # a re-downloaded shard; the index is unchanged
    st = os.stat(shard)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert engine.apply([req(slot, src)]) == ["t5xxl"]
    key = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    assert torch.equal(model.state_dict()[key], newer[key])


def test_a_then_b_then_builtin_restores_the_checkpoint_not_a(tmp_path: Path) -> None:
    model = hf_clip(1, proj=True)
    before = bits(model)
    slot, engine = hf_clip_slot("clip_l", model), SwapEngine()
    a, _ = hf_file(tmp_path, 2)
    b, donor_b = hf_file(tmp_path, 3)
    engine.apply([req(slot, source(a, "clip-l"))])
    engine.apply([req(slot, source(b, "clip-l"))])
    assert_same(hf_weights(model), hf_weights(donor_b))
    engine.apply([req(slot)])
    assert_bits(model, before)


# ---------------------------------------------------------------------------------------------
# precision


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("spelling", HF_SPELLINGS)
def test_precision_request_changes_dtypes_and_auto_restores(tmp_path: Path, spelling: str, precision: str) -> None:
    want_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    model = hf_clip(1, proj=spelling.endswith("Projection")).half()  # a WebUI keeps the TE in fp16
    before = bits(model)
    path, donor = hf_file(tmp_path, 2)
    slot, engine = hf_clip_slot("clip_l", model), SwapEngine()

    engine.apply([req(slot, source(path, "clip-l"), precision)])
    assert engine.compute_dtype(slot) == want_dtype
    for name, p in model.named_parameters():
        assert p.dtype == want_dtype, name
    got = hf_weights(model)
    for key, value in got.items():
        assert torch.equal(value, hf_weights(donor)[key].to(want_dtype)), key
    for name, buf in model.named_buffers():
        assert not buf.is_floating_point(), name  # position_ids stay integer

    engine.apply([req(slot)])
    assert engine.compute_dtype(slot) is None
    assert_bits(model, before)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_builtin_at_another_precision_uses_the_checkpoints_own_values(precision: str) -> None:
    model = openclip(1).half()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    before_bits = bits(model)
    slot, engine = openclip_slot("clip_g", model), SwapEngine()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    assert engine.apply([req(slot, None, precision)]) == ["clip_g"]
    for key, value in model.state_dict().items():
        assert value.dtype == dtype, key
        assert torch.equal(value, before[key].to(dtype)), key  # fp16 -> fp32 is exact
    assert model.attn_mask.dtype == before_bits["attn_mask"][0]  # buffers keep their dtype
    engine.apply([req(slot)])
    assert_bits(model, before_bits)


# ---------------------------------------------------------------------------------------------
# Long-CLIP: 77 <-> 248 positions


@pytest.mark.parametrize("spelling", HF_SPELLINGS)
def test_long_clip_file_resizes_an_hf_tower_and_builtin_shrinks_it(tmp_path: Path, spelling: str) -> None:
    model = hf_clip(1, proj=spelling.endswith("Projection"))
    before, ids = bits(model), param_ids(model)
    path, donor = hf_file(tmp_path, 3, positions=248)
    slot, engine = hf_clip_slot("clip_l", model), SwapEngine()

    engine.apply([req(slot, source(path, "long-clip-l"))])
    emb = text_transformer(model).embeddings
    assert emb.position_embedding.weight.shape == (248, W)
    assert torch.equal(emb.position_embedding.weight, text_transformer(donor).embeddings.position_embedding.weight)
    assert torch.equal(emb.position_ids, torch.arange(248).unsqueeze(0))
    assert emb.position_embedding.num_embeddings == 248
    assert model.config.max_position_embeddings == 248
    assert slot.positions() == 248
    assert engine.applied(slot).positions == 248
    assert param_ids(model) == ids
    assert_outputs_equal(clip_out(model, 248), clip_out(donor, 248))  # a 248-token prompt runs end to end

    engine.apply([req(slot)])
    assert model.config.max_position_embeddings == 77
    assert emb.position_embedding.num_embeddings == 77
    assert_bits(model, before)
    assert_outputs_equal(clip_out(model), clip_out(hf_clip(1, proj=spelling.endswith("Projection"))))


def test_original_long_clip_into_openclip_tower_rebuilds_the_mask(tmp_path: Path) -> None:
    model = openclip(1)
    before = bits(model)
    long_ref = openclip(4, context=248, long=True)
    path = save(tmp_path / "longclip-L.safetensors", fm.openclip_state(long_ref))
    slot, engine = openclip_slot("clip_l", model), SwapEngine()

    engine.apply([req(slot, source(path, "long-clip-l"))])
    assert torch.equal(model.positional_embedding, long_ref.effective_positions())
    assert model.attn_mask.shape == (248, 248)
    assert torch.equal(model.attn_mask, torch.full((248, 248), float("-inf")).triu_(1))
    toks = rm.clip_tokens(2, 248, rm.SMALL_VOCAB)
    got, want = rm.ref_outputs(model, toks), rm.ref_outputs(long_ref, toks)
    assert_outputs_equal(got, want, ("hidden_states", "last", "pooled"))

    engine.apply([req(slot)])
    assert model.attn_mask.shape == (77, 77)
    assert_bits(model, before)


def test_long_clip_into_a_fixed_size_slot_is_refused(tmp_path: Path) -> None:
    model = hf_clip(1)
    before = bits(model)
    path, _ = hf_file(tmp_path, 3, positions=248)
    slot, engine = hf_clip_slot("clip_l", model, resizable=False), SwapEngine()
    with pytest.raises(TESwitchError) as err:
        engine.apply([req(slot, source(path, "long-clip-l"))])
    one_line_error(err.value, path.name, "248")
    assert_bits(model, before)


def test_stretch_request_on_builtin_hf_tower(tmp_path: Path) -> None:
    model = hf_clip(1, proj=True)
    before = bits(model)
    table = text_transformer(model).embeddings.position_embedding.weight.detach().clone()
    slot, engine = hf_clip_slot("clip_l", model), SwapEngine()

    assert engine.apply([req(slot, None, positions=248)]) == ["clip_l"]
    emb = text_transformer(model).embeddings
    assert torch.equal(emb.position_embedding.weight, stretch_positions(table))
    assert torch.equal(emb.position_ids, torch.arange(248).unsqueeze(0))
    assert model.config.max_position_embeddings == 248
    assert engine.applied(slot).positions == 248
    # a later plain Built-in (no stretch asked) puts the 77-row checkpoint back
    assert engine.apply([req(slot)]) == ["clip_l"]
    assert_bits(model, before)


def test_stretch_request_on_a_77_position_file_and_an_openclip_tower(tmp_path: Path) -> None:
    model = openclip(1)
    before = bits(model)
    path, donor = openclip_file(tmp_path, 2)
    slot, engine = openclip_slot("clip_g", model), SwapEngine()
    engine.apply([req(slot, source(path, "clip-g"), positions=248)])
    assert torch.equal(model.positional_embedding, stretch_positions(donor.positional_embedding.detach()))
    assert torch.equal(model.attn_mask, causal_mask(248))
    assert torch.equal(
        model.transformer.resblocks[1].attn.in_proj_weight, donor.transformer.resblocks[1].attn.in_proj_weight
    )
    # the same file without the stretch is a different request
    assert engine.apply([req(slot, source(path, "clip-g"))]) == ["clip_g"]
    assert model.positional_embedding.shape == (77, W)
    engine.apply([req(slot)])
    assert_bits(model, before)


def test_stretch_to_an_unsupported_count_fails_cleanly() -> None:
    model = hf_clip(1)
    before = bits(model)
    slot, engine = hf_clip_slot("clip_l", model), SwapEngine()
    with pytest.raises(TESwitchError) as err:
        engine.apply([req(slot, None, positions=300)])
    one_line_error(err.value, "300")
    assert_bits(model, before)
    assert engine.applied(slot) is None


# ---------------------------------------------------------------------------------------------
# optional and derived keys


def test_optional_projection_comes_from_the_checkpoint_not_an_earlier_file(tmp_path: Path) -> None:
    model = hf_clip(1, proj=True)
    own = model.text_projection.weight.detach().clone()
    with_proj, donor_a = hf_file(tmp_path, 2, proj=True)
    without, donor_b = hf_file(tmp_path, 3, proj=False)
    slot, engine = hf_clip_slot("clip_l", model), SwapEngine()
    engine.apply([req(slot, source(with_proj, "clip-l"))])
    assert torch.equal(model.text_projection.weight, donor_a.text_projection.weight)
    engine.apply([req(slot, source(without, "clip-l"))])
    assert torch.equal(model.text_projection.weight, own)
    got = hf_weights(model)
    del got["text_projection.weight"]
    assert_same(got, hf_weights(donor_b))


def test_openclip_file_without_projection_keeps_the_checkpoints(tmp_path: Path) -> None:
    model = openclip(1)
    own = model.text_projection.detach().clone()
    a, _ = openclip_file(tmp_path, 2)
    b, _ = openclip_file(tmp_path / "b", 3, proj=None)
    slot, engine = openclip_slot("clip_g", model), SwapEngine()
    engine.apply([req(slot, source(a, "clip-g"))])
    assert not torch.equal(model.text_projection, own)
    engine.apply([req(slot, source(b, "clip-g"))])
    assert torch.equal(model.text_projection, own)


def _persistent_position_ids(model: nn.Module) -> None:
    """transformers 4.30 saves position_ids; 5.x keeps it out of the state dict. Make both look like 4.30."""
    emb = text_transformer(model).embeddings
    emb.register_buffer("position_ids", emb.position_ids, persistent=True)


def test_position_ids_are_never_taken_from_files(tmp_path: Path) -> None:
    model = hf_clip(1)
    _persistent_position_ids(model)
    before = bits(model)
    donor = hf_clip(2)
    scrambled = torch.arange(77).flip(0).unsqueeze(0)
    path = save(tmp_path / "ids.safetensors", fm.hf_clip_state(donor, position_ids=scrambled))
    slot, engine = hf_clip_slot("clip_l", model), SwapEngine()
    assert any(k.endswith("position_ids") for k in slot.derived)
    engine.apply([req(slot, source(path, "clip-l"), "fp16")])
    assert torch.equal(text_transformer(model).embeddings.position_ids, torch.arange(77).unsqueeze(0))
    assert text_transformer(model).embeddings.position_ids.dtype == torch.int64
    engine.apply([req(slot)])
    assert_bits(model, before)


def test_a_slot_mapping_that_supplies_a_derived_key_is_refused(tmp_path: Path) -> None:
    model = hf_clip(1)
    _persistent_position_ids(model)
    before = bits(model)
    base = hf_clip_slot("clip_l", model)
    ids_key = next(iter(base.derived))

    def to_host(sd: Mapping[str, Any]) -> dict[str, Any]:
        return {**base.to_host(sd), ids_key: torch.zeros(1, 77, dtype=torch.int64)}

    slot = replace(base, to_host=to_host)
    path, _ = hf_file(tmp_path, 2)
    with pytest.raises(TESwitchError) as err:
        SwapEngine().apply([req(slot, source(path, "clip-l"))])
    one_line_error(err.value, "position_ids", "derived")
    assert_bits(model, before)


# ---------------------------------------------------------------------------------------------
# compressed weights (core.lowbit) at Auto precision


def _compressed_t5_file(folder: Path, donor: nn.Module, fmt: str) -> tuple[Path, dict[str, torch.Tensor] | None]:
    """(file, the dense values it stands for when an independent oracle exists)."""
    sd = fm.t5_state(donor)
    if fmt == "scaled-fp8":
        stored, dense = fm.scaled_fp8_state(sd)
        return save(folder / "t5xxl_fp8_e4m3fn_scaled.safetensors", stored), dense
    pytest.importorskip("gguf")
    from synth_gguf import hf_t5_to_llama_names, write_gguf

    path = folder / "t5-v1_1-xxl-encoder-Q8_0.gguf"
    write_gguf(path, hf_t5_to_llama_names(sd), "Q8_0")
    return path, None


def _packed_modules(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if lowbit.is_attached(m)}


@pytest.mark.parametrize("fmt", ["scaled-fp8", "gguf-q8_0"])
def test_compressed_t5_stays_packed_at_auto_and_encodes_like_dense(tmp_path: Path, fmt: str) -> None:
    model = make_t5(1)
    before = bits(model)
    path, dense = _compressed_t5_file(tmp_path, make_t5(2), fmt)
    src = source(path, "t5-xxl")
    if dense is None:  # GGUF: the values the file holds, expanded once
        with open_file(path) as f:
            dense = materialize(load_tower(f, src.tower), torch.float32)
    oracle = make_t5(3)
    rm.load_canonical_into_hf(oracle, dense)
    slot, engine = t5_slot("t5xxl", model), SwapEngine()

    engine.apply([req(slot, src)])
    packed = _packed_modules(model)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    embeddings = {n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    rel_bias = {n for n in embeddings if "relative_attention_bias" in n}
    if fmt == "scaled-fp8":
        assert packed == linears  # only the scaled matrices; embeddings were stored dense
    else:
        assert packed == linears | (embeddings - rel_bias)  # F32 relative bias stays dense
        # the tied token table is one packed copy for both modules, not one each
        shared, embed = (lowbit.packed_weight(m) for m in (model.shared, model.encoder.embed_tokens))
        assert shared.raw.untyped_storage().data_ptr() == embed.raw.untyped_storage().data_ptr()
    for name, m in model.named_modules():
        if "layer_norm" in name:
            assert not lowbit.is_attached(m), name
            assert torch.isfinite(m.weight).all(), name
    assert 0 < lowbit.compressed_bytes(model) < lowbit.dense_bytes(model)
    # the slot's own weights are not kept beside the packed ones: Built-in writes them back from the source
    originals = [m.__dict__["_te_switch_lowbit"].original for n, m in model.named_modules() if n in packed]
    assert originals
    assert all(o.numel() == 0 for o in originals)
    ids = t5_ids()
    for got, want in zip(t5_encode(model, ids), t5_encode(oracle, ids), strict=True):
        assert torch.equal(got, want)

    # the same file at fp16 is expanded: nothing stays packed; T5's `wo` stays fp32 (fp16 overflows there)
    engine.apply([req(slot, src, "fp16")])
    assert _packed_modules(model) == set()
    for key, value in model.state_dict().items():
        want_key = "shared.weight" if key == "encoder.embed_tokens.weight" else key
        want_dtype = torch.float32 if key.endswith("DenseReluDense.wo.weight") else torch.float16
        assert value.dtype == want_dtype, key
        assert torch.equal(value, dense[want_key].to(want_dtype)), key

    engine.apply([req(slot, src)])  # packed again, then back to Built-in
    assert _packed_modules(model)
    engine.apply([req(slot)])
    assert _packed_modules(model) == set()
    assert not any(lowbit.RAW_BUFFER in n for n, _ in model.named_buffers())
    assert_bits(model, before)


def test_packed_weights_do_not_depend_on_the_file_after_the_swap(tmp_path: Path) -> None:
    """The file may be rewritten in place (a re-download, a sync tool): the swapped model must not change."""
    model = make_t5(1)
    path, _ = _compressed_t5_file(tmp_path, make_t5(2), "scaled-fp8")
    slot, engine = t5_slot("t5xxl", model), SwapEngine()
    engine.apply([req(slot, source(path, "t5-xxl"))])
    ids = t5_ids()
    want = t5_encode(model, ids)
    with open(path, "r+b") as f:  # same inode, new bytes (not a replace)
        (header,) = torch.frombuffer(bytearray(f.read(8)), dtype=torch.int64).tolist()
        f.seek(8 + header)
        f.write(bytes(os.path.getsize(path) - 8 - header))
    for got, expect in zip(t5_encode(model, ids), want, strict=True):
        assert torch.equal(got, expect), "the packed weights still read the file's pages"


def test_packed_weights_are_never_expanded_all_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keeping T5-XXL packed saves ~9 GB only if nothing expands every weight together afterwards.

    Validation expands one tensor at a time (NaN check) before anything is attached; after the first
    attach, reading the slot's shapes (positions(), the Applied record, a later prepare) needs no values.
    """
    model = make_t5(1)
    path, _ = _compressed_t5_file(tmp_path, make_t5(2), "scaled-fp8")
    other, _ = _compressed_t5_file(tmp_path / "other", make_t5(3), "scaled-fp8")
    slot, engine = t5_slot("t5xxl", model), SwapEngine()
    attached = {"yes": False}
    expanded: list[int] = []  # storage of each packed weight expanded after the first attach
    real_dequantize, real_attach = PackedTensor.dequantize, lowbit.attach

    def dequantize(self: PackedTensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if attached["yes"]:
            expanded.append(self.raw.untyped_storage().data_ptr())
        return real_dequantize(self, *args, **kwargs)

    def attach(*args: Any, **kwargs: Any) -> None:
        attached["yes"] = True
        real_attach(*args, **kwargs)

    monkeypatch.setattr(PackedTensor, "dequantize", dequantize)
    monkeypatch.setattr(lowbit, "attach", attach)
    engine.apply([req(slot, source(path, "t5-xxl"))])
    assert expanded == [], f"{len(expanded)} packed weights expanded after attaching (commit)"
    slot.positions()
    assert expanded == [], f"{len(expanded)} packed weights expanded to read a position count"
    live = {b.untyped_storage().data_ptr() for n, b in model.named_buffers() if n.endswith(lowbit.RAW_BUFFER)}
    engine.prepare(req(slot, source(other, "t5-xxl")))  # expands the new file's weights (NaN check): fine
    ours = [p for p in expanded if p in live]
    assert ours == [], f"{len(ours)} packed weights of the live slot expanded to validate another file"


def test_plain_fp8_clip_packs_linear_and_embedding_weights_only(tmp_path: Path) -> None:
    model = hf_clip(1, proj=True)
    before = bits(model)
    donor = hf_clip(2, proj=True)
    fp8 = fm.hf_clip_state(donor, dtype=torch.float8_e4m3fn)  # norms and biases in fp8 too
    path = save(tmp_path / "clip_l_fp8.safetensors", fp8)
    slot, engine = hf_clip_slot("clip_l", model), SwapEngine()
    engine.apply([req(slot, source(path, "clip-l"))])
    for name, m in model.named_modules():
        assert lowbit.is_attached(m) == isinstance(m, nn.Linear | nn.Embedding), name
        dense_here = [m.weight, m.bias] if isinstance(m, nn.LayerNorm) else [getattr(m, "bias", None)]
        for t in (t for t in dense_here if isinstance(t, torch.Tensor)):
            assert t.dtype == torch.float32, name  # expanded into the live dtype, not packed
            assert torch.isfinite(t).all(), name
    oracle = hf_clip(3, proj=True)
    rm.load_canonical_into_hf(oracle, {k: v.float() for k, v in fp8.items()})
    assert_outputs_equal(clip_out(model), clip_out(oracle), ("hidden_states", "last", "pooled"))
    engine.apply([req(slot)])
    assert_bits(model, before)


# ---------------------------------------------------------------------------------------------
# memory


def live_tensors() -> tuple[int, int]:
    """(count, bytes of distinct CPU storages) of every tensor Python can reach."""
    gc.collect()
    count, storages = 0, {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu":  # type(): no lazy-module __class__
            count += 1
            st = obj.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
    return count, sum(storages.values())


def _cycles(engine: SwapEngine, slot: LiveSlot, src: EncoderSource, n: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Live tensors after the second and after the last of ``n`` swap/Built-in cycles."""
    seen = []
    for i in range(n):
        engine.apply([req(slot, src)])
        engine.apply([req(slot)])
        assert len(engine._memory) == 0  # no snapshot kept after Built-in
        if i in (1, n - 1):
            seen.append(live_tensors())
    return seen[0], seen[1]


def test_swap_restore_cycles_do_not_grow_memory(tmp_path: Path) -> None:
    model = hf_clip(1, proj=True)
    path, _ = hf_file(tmp_path, 2, positions=248)  # the resize path too
    slot, engine = hf_clip_slot("clip_l", model), SwapEngine()
    early, late = _cycles(engine, slot, source(path, "long-clip-l"), 20)
    assert late == early


def test_packed_swap_restore_cycles_do_not_grow_memory(tmp_path: Path) -> None:
    model = make_t5(1)
    path, _ = _compressed_t5_file(tmp_path, make_t5(2), "scaled-fp8")
    slot, engine = t5_slot("t5xxl", model), SwapEngine()
    early, late = _cycles(engine, slot, source(path, "t5-xxl"), 20)
    assert late == early


@pytest.mark.skipif(not os.environ.get("TE_SWITCH_SLOW_TESTS"), reason="real-size CLIP-L: set TE_SWITCH_SLOW_TESTS=1")
def test_real_size_clip_l_cycles_do_not_grow_memory(tmp_path: Path, sparse_files: bool) -> None:
    from transformers import CLIPTextModel

    with torch.device("meta"):
        model = CLIPTextModel(rm.hf_clip_config(*fm.CLIP_L))
    model = model.to_empty(device="cpu").half()
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
        text_transformer(model).embeddings.position_ids.copy_(torch.arange(77))
    path = fm.write_sparse_safetensors(tmp_path / "clip_l.safetensors", fm.hf_clip_spec(768, 12))
    slot, engine = hf_clip_slot("clip_l", model), SwapEngine()
    early, late = _cycles(engine, slot, source(path, "clip-l"), 20)
    assert late == early


# ---------------------------------------------------------------------------------------------
# slots on an accelerator: CPU values go through two small staging buffers


@pytest.mark.parametrize(
    ("stored", "target"),
    [(torch.float32, torch.float16), (torch.bfloat16, torch.float16), (torch.float16, torch.float16),
     (torch.float16, torch.float32), (torch.float32, torch.bfloat16)],
)  # fmt: skip
def test_staged_copy_rounds_like_a_whole_tensor_copy(
    monkeypatch: pytest.MonkeyPatch, stored: torch.dtype, target: torch.dtype
) -> None:
    monkeypatch.setattr(engine_mod, "STAGING_BYTES", 4096)  # many slices, the last one partial
    value = (torch.randn(37, 129, generator=torch.Generator().manual_seed(0)) * 3).to(stored)
    want = torch.empty(37, 129, dtype=target)
    want.copy_(value)
    got = torch.full((37, 129), float("nan"), dtype=target)
    staging = engine_mod._Staging()
    staging.copy_into(got, value)
    staging.wait()
    assert torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8))
    assert [b.numel() for b in staging.buffers] == [4096, 4096]  # two fixed buffers, whatever the tensor size


@pytest.mark.parametrize("precision", ["auto", "fp16", "bf16"])
def test_staged_swap_and_restore_give_the_same_slot_as_a_direct_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, precision: str
) -> None:
    """No accelerator here: the staging path (what a slot on a GPU takes) is forced for the CPU slot, and
    must leave exactly what the direct copy leaves, with the host's load hooks still seeing every layer."""
    path, donor = hf_file(tmp_path, 2)
    direct = hf_clip(1).half()
    SwapEngine().apply([req(hf_clip_slot("clip_l", direct), source(path, "clip-l"), precision)])

    model = hf_clip(1).half()
    before = bits(model)
    loads: list[str] = []
    for name, module in model.named_modules():
        module.register_load_state_dict_post_hook(lambda m, r, name=name: loads.append(name))
    staged: list[int] = []
    real = engine_mod._Staging.copy_into
    monkeypatch.setattr(engine_mod, "STAGING_BYTES", 8192)
    monkeypatch.setattr(
        engine_mod, "_staged", lambda t, v: isinstance(v, torch.Tensor) and t.is_contiguous() and t.numel() == v.numel()
    )
    monkeypatch.setattr(
        engine_mod._Staging, "copy_into", lambda self, t, v: staged.append(t.numel()) or real(self, t, v)
    )
    slot, engine = hf_clip_slot("clip_l", model), SwapEngine()
    engine.apply([req(slot, source(path, "clip-l"), precision)])
    assert_bits(model, bits(direct))
    assert len(staged) >= len(hf_weights(donor)) - 2  # every tensor (position ids are rebuilt, not copied)
    assert max(staged) > 8192  # the token table went in several slices
    assert "text_model.embeddings.token_embedding" in loads or "embeddings.token_embedding" in loads
    engine.apply([req(slot)])
    assert_bits(model, before)


# ---------------------------------------------------------------------------------------------
# host hooks and wrappers survive


class CountingWrapper(nn.Module):
    """What A1111's EmbeddingsWithFixes does: wrap token_embedding, keep the original as `.wrapped`."""

    def __init__(self, wrapped: nn.Module) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.calls = 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.wrapped(ids)


def test_hooks_and_wrappers_on_the_slot_survive_swaps(tmp_path: Path) -> None:
    model = hf_clip(1)
    emb = text_transformer(model).embeddings
    original_embedding = emb.token_embedding
    wrapper = CountingWrapper(original_embedding)
    emb.token_embedding = wrapper
    calls = {"pre": 0, "block": 0}
    model.register_forward_pre_hook(lambda m, a: calls.__setitem__("pre", calls["pre"] + 1))
    text_transformer(model).encoder.layers[0].register_forward_hook(
        lambda m, a, o: calls.__setitem__("block", calls["block"] + 1)
    )
    base = hf_clip_slot("clip_l", model)

    def to_host(sd: Mapping[str, Any]) -> dict[str, Any]:
        return {
            k.replace("token_embedding.weight", "token_embedding.wrapped.weight"): v
            for k, v in base.to_host(sd).items()
        }

    slot = replace(base, to_host=to_host)
    before = bits(model)
    path, _ = hf_file(tmp_path, 2, proj=False)
    long, _ = hf_file(tmp_path, 3, proj=False, positions=248)
    engine = SwapEngine()
    for step in (req(slot, source(path, "clip-l")), req(slot, source(long, "long-clip-l")), req(slot)):
        engine.apply([step])
        assert emb.token_embedding is wrapper
        assert wrapper.wrapped is original_embedding
        clip_out(model)
    assert calls == {"pre": 3, "block": 3}
    assert wrapper.calls == 3
    assert_bits(model, before)
