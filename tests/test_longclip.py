"""core.longclip: the knowledge-preserving stretch 77 → 248, the effective table of original files, masks.

The oracle is Long-CLIP's own ``load_from_clip`` loop (beichenzbc/Long-CLIP, ``model/longclip.py``),
written out below with its operation order and its row arithmetic, one row at a time.
"""

from __future__ import annotations

import pytest
import refmodels as rm
import torch

from te_switch.core.longclip import (
    FACTOR,
    KEEP,
    LONG_POSITIONS,
    SHORT_POSITIONS,
    causal_mask,
    chunk_length,
    effective_table,
    stretch_positions,
)


def reference_stretch(positional_embedding: torch.Tensor) -> torch.Tensor:
    """Long-CLIP ``load_from_clip``: the loop as published (names kept, comments ours)."""
    positional_embedding_pre = positional_embedding
    length, dim = positional_embedding_pre.shape
    keep_len = 20
    new = torch.zeros([4 * length - 3 * keep_len, dim], dtype=positional_embedding_pre.dtype)
    for i in range(keep_len):
        new[i] = positional_embedding_pre[i]
    for i in range(length - 1 - keep_len):
        new[4 * i + keep_len] = positional_embedding_pre[i + keep_len]
        new[4 * i + 1 + keep_len] = (
            3 * positional_embedding_pre[i + keep_len] / 4 + 1 * positional_embedding_pre[i + 1 + keep_len] / 4
        )
        new[4 * i + 2 + keep_len] = (
            2 * positional_embedding_pre[i + keep_len] / 4 + 2 * positional_embedding_pre[i + 1 + keep_len] / 4
        )
        new[4 * i + 3 + keep_len] = (
            1 * positional_embedding_pre[i + keep_len] / 4 + 3 * positional_embedding_pre[i + 1 + keep_len] / 4
        )
    last, before = positional_embedding_pre[length - 1], positional_embedding_pre[length - 2]
    new[4 * length - 3 * keep_len - 4] = last + 0 * (last - before) / 4
    new[4 * length - 3 * keep_len - 3] = last + 1 * (last - before) / 4
    new[4 * length - 3 * keep_len - 2] = last + 2 * (last - before) / 4
    new[4 * length - 3 * keep_len - 1] = last + 3 * (last - before) / 4
    return new


def table(seed: int = 0, width: int = 768, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(77, width, generator=gen) * 0.02).to(dtype)


def test_constants() -> None:
    assert (SHORT_POSITIONS, LONG_POSITIONS, KEEP, FACTOR) == (77, 248, 20, 4)
    assert KEEP + FACTOR * (SHORT_POSITIONS - KEEP - 1) + FACTOR == LONG_POSITIONS


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stretch_is_bit_exact_with_the_reference_loop(seed: int) -> None:
    pe = table(seed)
    got = stretch_positions(pe)
    want = reference_stretch(pe)
    assert got.shape == (248, 768)
    assert got.dtype == torch.float32
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # bits, not closeness


def test_stretch_copies_the_first_rows_and_extrapolates_the_last_four() -> None:
    pe = table(3, width=16)
    got = stretch_positions(pe)
    assert torch.equal(got[:20], pe[:20])
    # every 4th row after the kept ones is an original row: 20 → 20, 24 → 21, ..., 240 → 75
    for i in range(56):
        assert torch.equal(got[20 + 4 * i], pe[20 + i]), i
    step = pe[76] - pe[75]
    assert torch.equal(got[244], pe[76])
    for j in range(1, 4):
        assert torch.equal(got[244 + j], pe[76] + (j * step) / 4), j
    # interpolated rows lie between their neighbours
    mid = got[21]
    lo, hi = torch.minimum(pe[20], pe[21]), torch.maximum(pe[20], pe[21])
    assert bool(((mid >= lo - 1e-7) & (mid <= hi + 1e-7)).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stretch_keeps_a_half_table_half(dtype: torch.dtype) -> None:
    pe = table(4, dtype=dtype)
    got = stretch_positions(pe)
    assert got.dtype == dtype
    assert got.shape == (248, 768)
    # computed in fp32 from the half values, rounded once
    assert torch.equal(got, reference_stretch(pe.float()).to(dtype))
    assert torch.equal(got[:20], pe[:20])


def test_stretch_does_not_modify_its_input() -> None:
    pe = table(5, width=8)
    copy = pe.clone()
    stretch_positions(pe)
    assert torch.equal(pe, copy)


def test_effective_table_matches_long_clip_masks() -> None:
    """Long-CLIP's forward adds pe*mask1 + pe_res*mask2 (rows < 20 from pe); the merged table is the same."""
    ref = rm.make_openclip(16, 1, 2, vocab=rm.SMALL_VOCAB, context=248, long_clip=True, seed=9)
    pe, res = ref.positional_embedding.detach(), ref.positional_embedding_res.detach()
    got = effective_table(pe, res)
    assert got.shape == (248, 16)
    assert torch.equal(got, ref.effective_positions().detach())
    assert torch.equal(got[:20], pe[:20])
    assert torch.equal(got[20:], res[20:])


def test_chunk_length() -> None:
    assert chunk_length(77) == 75
    assert chunk_length(248) == 246


@pytest.mark.parametrize("n", [1, 77, 248])
def test_causal_mask_is_openclips(n: int) -> None:
    mask = causal_mask(n)
    assert mask.shape == (n, n)
    assert mask.dtype == torch.float32
    assert torch.equal(mask, torch.full((n, n), float("-inf")).triu_(1))
    assert not mask.diagonal().any()
    if n > 1:
        assert mask[0, 1] == float("-inf")
        assert mask[1, 0] == 0


def test_causal_mask_dtype_and_device() -> None:
    mask = causal_mask(5, dtype=torch.float16, device=torch.device("cpu"))
    assert mask.dtype == torch.float16
    assert mask.device.type == "cpu"
    assert torch.isneginf(mask[0, 4])
    ref = rm.make_openclip(8, 1, 2, vocab=rm.SMALL_VOCAB, seed=1)
    assert torch.equal(causal_mask(77), ref.attn_mask)
