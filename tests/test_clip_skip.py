"""core.clip_skip: the per-family layer math (DESIGN "CLIP skip semantics") and the truncated forward.

The expected plans are written out here from DESIGN, not derived from the module's tables: N means
``hidden_states[-N]``; Auto = the family's native N (SD1 1; SD2, SDXL-L/G, SD3-L/G 2; Flux 1); SD1/SD2
(and Flux's unused hidden states) apply the final LayerNorm, SDXL/SD3 do not; on two-tower models the
scope picks which tower the user's N reaches. ``LayerTap`` is checked against transformers' own
``hidden_states`` (all N, both transformers generations) and by counting which blocks really run.
"""

from __future__ import annotations

from typing import Any

import pytest
import refmodels as rm
import torch
from torch import nn

from te_switch.core.clip_skip import (
    LayerTap,
    TowerPlan,
    block_for_skip,
    describe,
    missing_layers,
    plan,
    run_to_layer,
    tower_plan,
    tower_skip,
)

# family -> [(tower, depth, native N)], final LayerNorm applied
FAMILIES: dict[str, tuple[list[tuple[str, int, int]], bool]] = {
    "sd1": ([("clip_l", 12, 1)], True),
    "sd2": ([("clip_h", 24, 2)], True),
    "sdxl": ([("clip_l", 12, 2), ("clip_g", 32, 2)], False),
    "sdxl-refiner": ([("clip_g", 32, 2)], False),
    "sd3": ([("clip_l", 12, 2), ("clip_g", 32, 2)], False),
    "flux": ([("clip_l", 12, 1)], True),
}
SKIPS = [None, 1, 2, 3, 12]
SCOPES = ["both", "clip_l", "clip_g"]


def expected_plan(family: str, n: int | None, scope: str) -> list[TowerPlan]:
    towers, final_ln = FAMILIES[family]
    out = []
    for tower, depth, native in towers:
        reaches = n is not None and (len(towers) == 1 or scope in ("both", tower))
        skip = min(n, depth) if reaches else native
        out.append(TowerPlan(tower, skip, depth, final_ln, skip == native))
    return out


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("n", SKIPS, ids=lambda n: f"N={n or 'Auto'}")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_plan_matches_design(family: str, n: int | None, scope: str) -> None:
    got = plan(family, n, scope)
    assert got == expected_plan(family, n, scope)
    for p in got:
        assert p.layer == p.layers - p.skip + 1
        assert tower_skip(family, p.tower, n, scope) == p.skip


def test_auto_is_the_native_layer() -> None:
    assert [(p.tower, p.layer, p.native) for p in plan("sdxl", None)] == [("clip_l", 11, True), ("clip_g", 31, True)]
    assert [(p.layer, p.final_ln) for p in plan("sd1", None)] == [(12, True)]
    assert [(p.layer, p.final_ln) for p in plan("sd2", None)] == [(23, True)]
    # N equal to the native value is reported as native: "clip skip 2 does nothing on SDXL"
    assert all(p.native for p in plan("sdxl", 2))
    assert not any(p.native for p in plan("sdxl", 1))


def test_tower_skip_clamps_to_the_tower_depth() -> None:
    assert tower_skip("sdxl", "clip_l", 40) == 12
    assert tower_skip("sdxl", "clip_g", 40) == 32
    assert tower_skip("sd2", "clip_h", 30) == 24
    assert tower_skip("sd1", "clip_l", 0) == 1
    assert tower_skip("sd1", "clip_l", -3) == 1
    assert plan("sdxl", 30)[0] == TowerPlan("clip_l", 12, 12, False, False)
    assert plan("sdxl", 30)[1].layer == 3


def test_t5_is_never_planned() -> None:
    for family in ("sd3", "flux"):
        assert all(p.tower != "t5xxl" for p in plan(family, 3))


@pytest.mark.parametrize(
    ("family", "n", "scope", "line"),
    [
        ("sd1", None, "both", "SD1 · CLIP-L layer 12/12 · native"),
        ("sd1", 3, "both", "SD1 · CLIP-L layer 10/12"),
        ("sd2", None, "both", "SD2 · CLIP-H layer 23/24 · native"),
        ("sdxl", None, "both", "SDXL · CLIP-L layer 11/12 · CLIP-G layer 31/32 · native"),
        ("sdxl", 3, "clip_g", "SDXL · CLIP-L layer 11/12 · CLIP-G layer 30/32"),
        ("sdxl-refiner", 1, "both", "SDXL refiner · CLIP-G layer 32/32"),
        ("sd3", 2, "both", "SD3 · CLIP-L layer 11/12 · CLIP-G layer 31/32 · native"),
        ("flux", 2, "both", "Flux uses only CLIP-L's pooled output: clip skip has no effect"),
    ],
)
def test_describe(family: str, n: int | None, scope: str, line: str) -> None:
    assert describe(family, plan(family, n, scope)) == line


def test_describe_note_and_empty_plans() -> None:
    assert describe("sd1", plan("sd1", None), note="host limit") == "SD1 · CLIP-L layer 12/12 · native · host limit"
    assert describe("sd1", []) == "SD1"


def test_tower_plan_is_native_only_with_the_familys_layer_norm() -> None:
    assert tower_plan("sdxl", "clip_l", 2) == TowerPlan("clip_l", 2, 12, False, True)
    # A1111's "last" CLIP-L of SDXL: layer 12 with the final LN is not SDXL's native conditioning
    assert tower_plan("sdxl", "clip_l", 1, final_ln=True) == TowerPlan("clip_l", 1, 12, True, False)
    assert tower_plan("sdxl", "clip_l", 2, final_ln=True).native is False
    assert tower_plan("sd1", "clip_l", 1, final_ln=True).native is True
    assert tower_plan("sd1", "clip_l", 40).skip == 12


def test_a_shortened_copy_cannot_reach_its_missing_layers() -> None:
    """Forge's and diffusers' SD2 CLIP-H has 23 of 24 layers: N=1 becomes the deepest layer there, 23."""
    assert missing_layers("clip_h", 23) == 1
    assert missing_layers("clip_h", 24) == 0
    assert missing_layers("clip_l", 2) == 0  # a small test tower is not a shortened CLIP-L
    assert tower_plan("sd2", "clip_h", 1, missing=1) == TowerPlan("clip_h", 2, 24, True, True)
    assert tower_plan("sd2", "clip_h", 5, missing=1).layer == 20
    assert [p.layer for p in plan("sd2", 1, missing={"clip_h": 1})] == [23]
    assert [p.layer for p in plan("sd2", 1)] == [24]
    assert [p.layer for p in plan("sdxl", 1, missing={"clip_h": 1})] == [12, 32]  # other towers untouched


# ---------------------------------------------------------------------------------------------
# block_for_skip


def test_block_for_skip_indices() -> None:
    assert block_for_skip(12, 1) == 11
    assert block_for_skip(12, 2) == 10
    assert block_for_skip(12, 12) == 0
    assert block_for_skip(32, 2) == 30


def test_block_for_skip_with_a_shortened_copy() -> None:
    """Forge's SD2 text encoder keeps 23 of OpenCLIP-H's 24 layers: N still counts in the original 24."""
    assert block_for_skip(23, 2, layer_offset=1) == 22  # native SD2: the copy's last block
    assert block_for_skip(23, 24, layer_offset=1) == 0
    with pytest.raises(ValueError, match="24 layers") as err:
        block_for_skip(23, 1, layer_offset=1)  # the missing final layer
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="24 layers"):
        block_for_skip(23, 25, layer_offset=1)


@pytest.mark.parametrize("skip", [0, -1, 13])
def test_block_for_skip_out_of_range(skip: int) -> None:
    with pytest.raises(ValueError, match=f"clip skip {skip} is out of range for a tower of 12 layers"):
        block_for_skip(12, skip)


# ---------------------------------------------------------------------------------------------
# LayerTap on a real transformers CLIPTextModel


@pytest.fixture(scope="module")
def deep_clip() -> nn.Module:
    """12 blocks like CLIP-L, narrow: every N from 1 to 12 has its own block."""
    return rm.make_hf_clip(32, 12, 2, vocab=rm.SMALL_VOCAB, seed=11)


def blocks_of(model: nn.Module) -> nn.ModuleList:
    return getattr(model, "text_model", model).encoder.layers


class CallCounter:
    """Counts forward calls per block and of the final LayerNorm."""

    def __init__(self, model: nn.Module) -> None:
        inner = getattr(model, "text_model", model)
        self.calls = [0] * len(blocks_of(model))
        self.final_ln = 0
        self.handles = [
            b.register_forward_pre_hook(lambda m, a, i=i: self._count(i)) for i, b in enumerate(blocks_of(model))
        ]
        self.handles.append(inner.final_layer_norm.register_forward_pre_hook(lambda m, a: self._ln()))

    def _count(self, i: int) -> None:
        self.calls[i] += 1

    def _ln(self) -> None:
        self.final_ln += 1

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def hook_ids(blocks: nn.ModuleList) -> list[set[int]]:
    """Forward hooks per block (transformers 5 installs its own output-capturing ones: compare, don't expect none)."""
    return [set(b._forward_hooks) for b in blocks]


def full_hidden_states(model: nn.Module, tokens: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(model(input_ids=tokens, output_hidden_states=True).hidden_states)


def test_layer_tap_stop_returns_hidden_states_minus_n_and_runs_no_later_block(deep_clip: nn.Module) -> None:
    tokens = rm.clip_tokens(2, 77, rm.SMALL_VOCAB)
    hidden = full_hidden_states(deep_clip, tokens)
    blocks = blocks_of(deep_clip)
    hooks = hook_ids(blocks)
    for n in range(1, 13):
        index = block_for_skip(len(blocks), n)
        counter = CallCounter(deep_clip)
        after_forward = False
        try:
            with torch.no_grad(), LayerTap(blocks[index], stop=True) as tap:
                deep_clip(input_ids=tokens)
                after_forward = True
        finally:
            counter.remove()
        assert not after_forward  # the forward ended at the tapped block
        assert counter.calls == [1] * (index + 1) + [0] * (len(blocks) - index - 1), n
        assert counter.final_ln == 0
        assert torch.equal(tap.output, hidden[-n]), n
        assert hook_ids(blocks) == hooks  # the tap's hook is gone after the `with`


def test_layer_tap_without_stop_lets_the_forward_finish(deep_clip: nn.Module) -> None:
    tokens = rm.clip_tokens(1, 77, rm.SMALL_VOCAB, seed=3)
    hidden = full_hidden_states(deep_clip, tokens)
    counter = CallCounter(deep_clip)
    try:
        with torch.no_grad(), LayerTap(blocks_of(deep_clip)[9], stop=False) as tap:
            out = deep_clip(input_ids=tokens)
    finally:
        counter.remove()
    assert counter.calls == [1] * 12
    assert counter.final_ln == 1
    assert torch.equal(tap.output, hidden[-3])
    assert torch.equal(out.last_hidden_state, getattr(deep_clip, "text_model", deep_clip).final_layer_norm(hidden[-1]))


def test_nested_taps_each_swallow_only_their_own_stop(deep_clip: nn.Module) -> None:
    tokens = rm.clip_tokens(1, 77, rm.SMALL_VOCAB, seed=4)
    hidden = full_hidden_states(deep_clip, tokens)
    blocks = blocks_of(deep_clip)
    hooks = hook_ids(blocks)
    steps: list[str] = []
    with torch.no_grad(), LayerTap(blocks[7], stop=True) as outer:
        with LayerTap(blocks[2], stop=True) as inner:
            deep_clip(input_ids=tokens)  # stops at block 2: the inner tap's own stop
            steps.append("not reached")
        steps.append("after inner")
        deep_clip(input_ids=tokens)  # the inner hook is gone: runs on to block 7
        steps.append("not reached either")
    assert steps == ["after inner"]
    assert torch.equal(inner.output, hidden[3])
    assert torch.equal(outer.output, hidden[8])

    # the outer tap's stop fires first: the inner `with` must let it through, not swallow it
    steps.clear()
    with torch.no_grad(), LayerTap(blocks[1], stop=True) as outer:
        with LayerTap(blocks[6], stop=True) as inner:
            deep_clip(input_ids=tokens)
        steps.append("inner swallowed the outer stop")
    assert steps == []
    assert inner.output is None
    assert torch.equal(outer.output, hidden[2])
    assert hook_ids(blocks) == hooks


def test_exceptions_from_the_model_pass_through(deep_clip: nn.Module) -> None:
    blocks = blocks_of(deep_clip)
    full_hidden_states(deep_clip, rm.clip_tokens(1, 77, rm.SMALL_VOCAB))
    hooks = hook_ids(blocks)

    def boom(module: nn.Module, args: Any, output: Any) -> None:
        raise ValueError("boom in block 8")

    handle = blocks[8].register_forward_hook(boom)
    try:
        with pytest.raises(ValueError, match="boom"), torch.no_grad(), LayerTap(blocks[10], stop=True):
            deep_clip(input_ids=rm.clip_tokens(1, 77, rm.SMALL_VOCAB))
        with pytest.raises(ValueError, match="boom"), torch.no_grad(), LayerTap(blocks[3], stop=False) as tap:
            deep_clip(input_ids=rm.clip_tokens(1, 77, rm.SMALL_VOCAB))
        assert tap.output is not None  # captured before the failure
    finally:
        handle.remove()
    assert hook_ids(blocks) == hooks


def test_layer_tap_on_openclip_resblocks() -> None:
    """OpenCLIP blocks return a bare tensor in [seq, batch, width] order."""
    ref = rm.make_openclip(32, 4, 2, vocab=rm.SMALL_VOCAB, seed=5)
    tokens = rm.clip_tokens(2, 77, rm.SMALL_VOCAB)
    with torch.no_grad():
        hidden = ref(tokens)["hidden_states"]
        for n in range(1, 5):
            with LayerTap(ref.transformer.resblocks[block_for_skip(4, n)], stop=True) as tap:
                ref(tokens)
            assert torch.equal(tap.output.permute(1, 0, 2), hidden[-n]), n


def test_run_to_layer_returns_the_planned_block_and_stops_there(deep_clip: nn.Module) -> None:
    tokens = rm.clip_tokens(1, 77, rm.SMALL_VOCAB, seed=6)
    hidden = full_hidden_states(deep_clip, tokens)
    blocks = blocks_of(deep_clip)
    counter = CallCounter(deep_clip)
    try:
        with torch.no_grad():
            out, result = run_to_layer(blocks, 3, lambda: deep_clip(input_ids=tokens), stop=True)
            assert counter.calls == [1] * 10 + [0] * 2
            assert result is None  # the forward was stopped
            full, result = run_to_layer(blocks, 3, lambda: deep_clip(input_ids=tokens), stop=False)
    finally:
        counter.remove()
    assert torch.equal(out, hidden[-3])
    assert torch.equal(full, hidden[-3])
    assert counter.calls == [2] * 10 + [1] * 2
    assert torch.equal(
        result.last_hidden_state, getattr(deep_clip, "text_model", deep_clip).final_layer_norm(hidden[-1])
    )


def test_run_to_layer_counts_in_the_original_depth_of_a_shortened_copy(deep_clip: nn.Module) -> None:
    """11 of 12 blocks, one missing at the end: N=2 is the copy's last block, N=1 does not exist."""
    tokens = rm.clip_tokens(1, 77, rm.SMALL_VOCAB, seed=7)
    hidden = full_hidden_states(deep_clip, tokens)
    blocks = blocks_of(deep_clip)[:11]
    with torch.no_grad():
        out, _ = run_to_layer(blocks, 2, lambda: deep_clip(input_ids=tokens), stop=True, missing=1)
    assert torch.equal(out, hidden[-2])
    with pytest.raises(ValueError, match="12 layers"):
        run_to_layer(blocks, 1, lambda: deep_clip(input_ids=tokens), stop=True, missing=1)


def test_run_to_layer_says_when_the_block_never_ran(deep_clip: nn.Module) -> None:
    with pytest.raises(RuntimeError, match="layer 10 of the text encoder never ran"):
        run_to_layer(blocks_of(deep_clip), 3, lambda: None, stop=True)
