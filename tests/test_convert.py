"""core.convert: every layout becomes canonical names whose weights reproduce the original model.

Oracles: the reference modules in ``refmodels`` (OpenCLIP/OpenAI, GmP, Long-CLIP definitions) and
transformers' own CLIP/T5 classes. Numerical comparisons run in float64 with ``atol=1e-10``: a
fused ``in_proj`` and split q/k/v projections may sum in a different order, which in fp32 can give
~1e-7 noise; in float64 that noise is ~1e-15 while any wrong mapping is O(1e-2) or more.
GmP is the one exception: the file holds r and θ, the canonical weight r·normalize(θ) is rounded
to fp32 once (as zer0int's own converter does), ~6e-8 relative per weight, which the 2-layer test
tower turns into ≤1e-5 at the outputs (GMP_ATOL); a wrong fold (no r, wrong normalisation axis) is >1e-2.
T5 comparisons are exact (same module code, same weights, deterministic CPU kernels).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import filemakers as fm
import pytest
import refmodels as rm
import torch
import torch.nn.functional as F

from te_switch.core import convert
from te_switch.core.convert import canonical_to_openclip, load_tower
from te_switch.core.detect import TowerInfo, detect
from te_switch.core.errors import BadFileError, one_line
from te_switch.core.layouts import openclip_to_canonical
from te_switch.core.readers import open_file
from te_switch.core.tensors import PackedTensor, dense, is_compressed, materialize, weight_dtype_name

GMP_ATOL = 1e-5


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


CLIP_CANONICAL = re.compile(
    r"^(text_projection\.weight"
    r"|text_model\.embeddings\.(token|position)_embedding\.weight"
    r"|text_model\.final_layer_norm\.(weight|bias)"
    r"|text_model\.encoder\.layers\.\d+\."
    r"(self_attn\.(q|k|v|out)_proj|layer_norm1|layer_norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias))$"
)
T5_CANONICAL = re.compile(
    r"^(shared\.weight|encoder\.final_layer_norm\.weight"
    r"|encoder\.block\.\d+\.layer\.0\.SelfAttention\.(q|k|v|o|relative_attention_bias)\.weight"
    r"|encoder\.block\.\d+\.layer\.[01]\.layer_norm\.weight"
    r"|encoder\.block\.\d+\.layer\.1\.DenseReluDense\.(wi_0|wi_1|wo)\.weight)$"
)


# ---------------------------------------------------------------------------------------------
# the oracle's own conversion, written from the published rules (ComfyUI transformers_convert,
# diffusers convert_open_clip_checkpoint), checked against the reference module below


def oracle_openclip_to_canonical(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.resblocks."))
    out: dict[str, torch.Tensor] = {}
    t = "text_model."
    out[t + "embeddings.token_embedding.weight"] = sd["token_embedding.weight"]
    pe = sd["positional_embedding"]
    if "positional_embedding_res" in sd:  # Long-CLIP: pe*mask1 + pe_res*mask2
        pe = torch.cat([pe[: rm.LONG_KEEP], sd["positional_embedding_res"][rm.LONG_KEEP :]])
    out[t + "embeddings.position_embedding.weight"] = pe
    for i in range(layers):
        a, b = f"transformer.resblocks.{i}.", f"{t}encoder.layers.{i}."
        w, bias = sd[a + "attn.in_proj_weight"], sd[a + "attn.in_proj_bias"]
        d = w.shape[0] // 3
        for j, n in enumerate("qkv"):
            out[f"{b}self_attn.{n}_proj.weight"] = w[j * d : (j + 1) * d]
            out[f"{b}self_attn.{n}_proj.bias"] = bias[j * d : (j + 1) * d]
        for old, new in (
            ("attn.out_proj", "self_attn.out_proj"),
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ):
            if a + old + ".theta" in sd:  # GmP
                out[f"{b}{new}.weight"] = sd[a + old + ".r"] * F.normalize(sd[a + old + ".theta"], p=2, dim=1)
            else:
                out[f"{b}{new}.weight"] = sd[a + old + ".weight"]
            out[f"{b}{new}.bias"] = sd[a + old + ".bias"]
    out[t + "final_layer_norm.weight"] = sd["ln_final.weight"]
    out[t + "final_layer_norm.bias"] = sd["ln_final.bias"]
    if "text_projection" in sd:
        out["text_projection.weight"] = sd["text_projection"].t()  # x @ P == Linear(P.T)
    return out


def hf_for(
    ref: rm.OpenClipTextTransformer, canonical: Mapping[str, torch.Tensor], tower: TowerInfo | None = None
) -> torch.nn.Module:
    """A transformers CLIP built from the detected shapes (heads/activation are the kind's config)."""
    width = tower.width if tower else ref.width
    layers = tower.layers if tower else ref.layers
    positions = tower.positions if tower else ref.context
    proj = canonical["text_projection.weight"].shape[0] if "text_projection.weight" in canonical else None
    model = rm.make_hf_clip(
        width, layers, ref.heads, vocab=ref.vocab, positions=positions, act=ref.act, proj_dim=proj, seed=99
    )
    rm.load_canonical_into_hf(model, materialize(canonical, torch.float32))
    return model


def test_oracle_conversion_reproduces_reference_modules(
    ref_clip: rm.OpenClipTextTransformer,
    ref_clip_gelu: rm.OpenClipTextTransformer,
    ref_gmp: rm.OpenClipTextTransformer,
    ref_long: rm.OpenClipTextTransformer,
) -> None:
    """Self-check of the oracle: hand conversion + transformers == reference module (float64)."""
    for ref in (ref_clip, ref_clip_gelu, ref_gmp, ref_long):
        expected = oracle_openclip_to_canonical(fm.openclip_state(ref))
        rm.compare_clip(ref, hf_for(ref, expected), atol=GMP_ATOL if ref.gmp else 1e-10)


# ---------------------------------------------------------------------------------------------
# helpers


def towers(path: Path) -> list[TowerInfo]:
    with open_file(path) as src:
        return detect(src)


def as_usable(t: TowerInfo) -> TowerInfo:
    """Small test towers are 'unknown' only because kinds are decided by real widths; conversion is not."""
    assert t.error is None, t.error
    assert t.family in ("clip", "t5"), (t.kind, t.note)
    if t.kind != "unknown":
        return t
    if t.family == "clip":
        kind = "long-clip-l" if t.positions == 248 else "clip-l"
    else:
        kind = "umt5-xxl" if t.vocab == fm.UMT5_VOCAB else "t5-xxl"
    return dataclasses.replace(t, kind=kind)


def load(path: Path, slot: str | None = None) -> tuple[dict[str, Any], TowerInfo]:
    found = towers(path)
    t = next(t for t in found if t.tower == slot) if slot else found[0]
    if slot is None:
        assert len(found) == 1, [(x.tower, x.kind) for x in found]
    t = as_usable(t)
    with open_file(path) as src:
        return load_tower(src, t), t


def assert_canonical(sd: Mapping[str, Any], family: str) -> None:
    pattern = CLIP_CANONICAL if family == "clip" else T5_CANONICAL
    bad = sorted(k for k in sd if not pattern.match(k))
    assert not bad, f"non-canonical names: {bad[:6]}"


def assert_same_bits(got: Mapping[str, Any], want: Mapping[str, torch.Tensor]) -> None:
    assert set(got) == set(want), (
        f"missing {sorted(set(want) - set(got))[:5]}, extra {sorted(set(got) - set(want))[:5]}"
    )
    for k, w in want.items():
        g = got[k]
        assert isinstance(g, torch.Tensor), f"{k}: {type(g).__name__}"
        assert g.dtype == w.dtype, f"{k}: dtype {g.dtype} != {w.dtype}"
        assert tuple(g.shape) == tuple(w.shape), f"{k}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        gb = g.contiguous().reshape(-1).view(torch.uint8)
        wb = w.contiguous().reshape(-1).view(torch.uint8)
        assert torch.equal(gb, wb), f"{k}: values differ"


def visual_extras(width: int = 32) -> dict[str, torch.Tensor]:
    """A small OpenAI image tower + logit_scale: must be dropped, and must not confuse the layer count."""
    spec = fm.openai_visual_spec(width, 5, out=48, dtype="F32")
    gen = torch.Generator().manual_seed(11)
    out = {k: torch.randn(s, generator=gen) for k, (s, _) in spec.items()}
    out["logit_scale"] = torch.tensor(4.6052)
    return out


def hf_vision_extras(width: int = 32) -> dict[str, torch.Tensor]:
    spec = fm.hf_vision_spec(width, 5, out=48, dtype="F32")
    gen = torch.Generator().manual_seed(12)
    return {k: torch.randn(s, generator=gen) for k, (s, _) in spec.items()}


# ---------------------------------------------------------------------------------------------
# OpenCLIP / OpenAI layouts, every container


def _write(path: Path, tensors: Mapping[str, torch.Tensor], container: str) -> Path:
    if container == "safetensors":
        return fm.save_safetensors(path.with_suffix(".safetensors"), tensors)
    if container == "pt-zip":
        return fm.save_pickle(path.with_suffix(".pt"), dict(tensors))
    if container == "pt-legacy":
        return fm.save_pickle(path.with_suffix(".pt"), dict(tensors), legacy=True)
    if container == "ckpt-state-dict":
        return fm.save_pickle(path.with_suffix(".ckpt"), {"state_dict": dict(tensors), "epoch": 1})
    raise ValueError(container)


CONTAINERS = ["safetensors", "pt-zip", "pt-legacy", "ckpt-state-dict"]


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("variant", ["quick_gelu+proj", "gelu+proj-3-layers"])
def test_openclip_file_to_canonical(
    tmp_path: Path,
    ref_clip: rm.OpenClipTextTransformer,
    ref_clip_gelu: rm.OpenClipTextTransformer,
    container: str,
    variant: str,
) -> None:
    ref = ref_clip if variant.startswith("quick") else ref_clip_gelu
    stored = fm.openclip_state(ref)
    path = _write(tmp_path / "openclip", stored, container)
    sd, tower = load(path)
    assert (tower.layout, tower.layers, tower.width, tower.positions) == ("openclip", ref.layers, ref.width, 77)
    assert_canonical(sd, "clip")
    assert_same_bits(sd, oracle_openclip_to_canonical(stored))
    rm.compare_clip(ref, hf_for(ref, sd, tower))


def test_openai_full_model_drops_visual_and_logit_scale(tmp_path: Path, ref_clip: rm.OpenClipTextTransformer) -> None:
    stored = {**fm.openclip_state(ref_clip), **visual_extras()}
    path = fm.save_pickle(tmp_path / "ViT-L-14-full.pt", stored)
    sd, tower = load(path)
    assert tower.layers == ref_clip.layers  # not the image tower's 5 blocks
    assert "vision-tower" in tower.features
    assert_canonical(sd, "clip")
    assert_same_bits(sd, oracle_openclip_to_canonical(fm.openclip_state(ref_clip)))
    rm.compare_clip(ref_clip, hf_for(ref_clip, sd, tower))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=_dtype_id)
def test_openclip_half_precision_kept_as_stored(
    tmp_path: Path, ref_clip: rm.OpenClipTextTransformer, dtype: torch.dtype
) -> None:
    stored = fm.openclip_state(ref_clip, dtype)
    sd, _ = load(fm.save_safetensors(tmp_path / "half.safetensors", stored))
    assert_same_bits(sd, oracle_openclip_to_canonical(stored))


# ---------------------------------------------------------------------------------------------
# HF layouts


@pytest.mark.parametrize("position_ids", [None, "int", "float"])
def test_hf_clip_with_projection(tmp_path: Path, hf_clip: torch.nn.Module, position_ids: str | None) -> None:
    ids = {
        None: None,
        "int": torch.arange(77).unsqueeze(0),
        "float": (torch.arange(77, dtype=torch.float32) + 1e-4).unsqueeze(0),
    }[position_ids]
    stored = fm.hf_clip_state(hf_clip, position_ids=ids)
    sd, tower = load(fm.save_safetensors(tmp_path / "te.safetensors", stored))
    assert tower.layout == "hf"
    assert_canonical(sd, "clip")
    assert_same_bits(sd, rm.hf_clip_canonical_sd(hf_clip))
    fresh = rm.make_hf_clip(64, 2, 4, vocab=rm.SMALL_VOCAB, proj_dim=48, seed=123)
    rm.load_canonical_into_hf(fresh, sd)
    rm.compare_clip(hf_clip, fresh, atol=0.0)


@pytest.mark.parametrize("container", ["safetensors", "pt-zip"])
def test_hf_flat_clip(tmp_path: Path, hf_clip_noproj: torch.nn.Module, container: str) -> None:
    """transformers >= 5.6 ``CLIPTextModel`` state dict (no ``text_model.``) → canonical keeps ``text_model.``."""
    stored = dict(hf_clip_noproj.state_dict())
    assert not any(k.startswith("text_model.") for k in stored)  # really the flat layout
    path = _write(tmp_path / "flat", stored, container)
    sd, tower = load(path)
    assert tower.layout == "hf-flat"
    assert_canonical(sd, "clip")
    assert_same_bits(sd, rm.hf_clip_canonical_sd(hf_clip_noproj))
    assert "text_projection.weight" not in sd


def test_hf_full_clipmodel_keeps_text_tower_only(tmp_path: Path, hf_clip: torch.nn.Module) -> None:
    stored = {**fm.hf_clip_state(hf_clip), **hf_vision_extras()}
    sd, tower = load(fm.save_safetensors(tmp_path / "model.safetensors", stored))
    assert tower.layers == 2
    assert "vision-tower" in tower.features
    assert_same_bits(sd, rm.hf_clip_canonical_sd(hf_clip))


def test_hf_mixed_precision_file(tmp_path: Path, hf_clip: torch.nn.Module) -> None:
    """zer0int TE-only files: fp32 embeddings and norms, fp16 Linear weights; each kept as stored."""
    stored = {k: v if ("embedding" in k or "norm" in k) else v.half() for k, v in fm.hf_clip_state(hf_clip).items()}
    sd, tower = load(fm.save_safetensors(tmp_path / "mixed.safetensors", stored))
    assert tower.dtypes == ["F16", "F32"]
    assert_same_bits(sd, stored)


# ---------------------------------------------------------------------------------------------
# GmP and Long-CLIP


@pytest.mark.parametrize("container", ["pt-zip", "ckpt-state-dict", "safetensors"])
def test_gmp_checkpoint_folds_to_weights(tmp_path: Path, ref_gmp: rm.OpenClipTextTransformer, container: str) -> None:
    stored = fm.openclip_state(ref_gmp)
    assert any(k.endswith(".mlp.c_fc.theta") for k in stored)
    assert any(k.endswith(".mlp.c_proj.r") for k in stored)
    sd, tower = load(_write(tmp_path / "clip_ft_5_dict_as-gmp", stored, container))
    assert "gmp" in tower.features
    assert_canonical(sd, "clip")
    want = oracle_openclip_to_canonical(stored)
    for i in range(ref_gmp.layers):
        for ours, module in (("fc1", "c_fc"), ("fc2", "c_proj")):
            key = f"text_model.encoder.layers.{i}.mlp.{ours}.weight"
            lin = ref_gmp.transformer.resblocks[i].mlp.get_submodule(module)
            effective = (lin.r * F.normalize(lin.theta, p=2, dim=1)).detach()  # GeometricLinear.forward's weight
            # fp32: r * normalize(theta) may round differently if computed as theta * (r / |theta|)
            torch.testing.assert_close(sd[key], effective, rtol=2e-7, atol=1e-7)
    assert set(sd) == set(want)
    rm.compare_clip(ref_gmp, hf_for(ref_gmp, sd, tower), atol=GMP_ATOL)


@pytest.mark.parametrize("container", ["pt-legacy", "safetensors"])
def test_long_clip_original_merges_res_table(
    tmp_path: Path, ref_long: rm.OpenClipTextTransformer, container: str
) -> None:
    stored = {**fm.openclip_state(ref_long), **visual_extras()}
    sd, tower = load(_write(tmp_path / "longclip-L", stored, container))
    assert tower.positions == 248
    assert "long-clip-res" in tower.features
    pe = sd["text_model.embeddings.position_embedding.weight"]
    want = torch.cat([stored["positional_embedding"][:20], stored["positional_embedding_res"][20:]])
    assert torch.equal(pe, want)
    assert not torch.equal(pe, stored["positional_embedding"])  # rows 20+ really come from _res
    assert_same_bits(sd, oracle_openclip_to_canonical(fm.openclip_state(ref_long)))
    rm.compare_clip(ref_long, hf_for(ref_long, sd, tower))


def test_hf_long_clip_keeps_248_positions(tmp_path: Path) -> None:
    model = rm.make_hf_clip(64, 2, 4, vocab=rm.SMALL_VOCAB, positions=248, proj_dim=64, seed=21)
    sd, tower = load(fm.save_safetensors(tmp_path / "long.safetensors", fm.hf_clip_state(model)))
    assert tower.positions == 248
    assert sd["text_model.embeddings.position_embedding.weight"].shape == (248, 64)
    fresh = rm.make_hf_clip(64, 2, 4, vocab=rm.SMALL_VOCAB, positions=248, proj_dim=64, seed=3)
    rm.load_canonical_into_hf(fresh, sd)
    rm.compare_clip(model, fresh, atol=0.0)


# ---------------------------------------------------------------------------------------------
# whole checkpoints and bundles: one tower taken, under its prefix


def _unet_vae() -> dict[str, torch.Tensor]:
    return {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.randn(8, 64),
        "first_stage_model.encoder.conv_in.weight": torch.randn(8, 3, 3, 3),
        "first_stage_model.decoder.conv_out.weight": torch.randn(3, 8, 3, 3),
    }


def _prefixed(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


def test_sd1_checkpoint(tmp_path: Path, hf_clip_noproj: torch.nn.Module) -> None:
    te = fm.hf_clip_state(hf_clip_noproj, position_ids=torch.arange(77).unsqueeze(0))
    stored = {**_prefixed(te, "cond_stage_model.transformer."), **_unet_vae()}
    path = fm.save_pickle(tmp_path / "sd15.ckpt", {"state_dict": stored, "global_step": 840000})
    sd, tower = load(path, "clip_l")
    assert tower.prefix == "cond_stage_model.transformer."
    assert_same_bits(sd, rm.hf_clip_canonical_sd(hf_clip_noproj))


def test_sd1_old_layout_without_text_model(tmp_path: Path, hf_clip_noproj: torch.nn.Module) -> None:
    te = fm.hf_clip_state(hf_clip_noproj, flat=True, position_ids=torch.arange(77.0).unsqueeze(0))
    stored = {**_prefixed(te, "cond_stage_model.transformer."), **_unet_vae()}
    sd, _ = load(fm.save_safetensors(tmp_path / "sd14.safetensors", stored), "clip_l")
    assert_canonical(sd, "clip")
    assert_same_bits(sd, rm.hf_clip_canonical_sd(hf_clip_noproj))


def test_sd2_checkpoint_openclip_h(tmp_path: Path, ref_clip_gelu: rm.OpenClipTextTransformer) -> None:
    oc = {**fm.openclip_state(ref_clip_gelu), "logit_scale": torch.tensor(4.6)}
    stored = {**_prefixed(oc, "cond_stage_model.model."), **_unet_vae()}
    sd, tower = load(fm.save_safetensors(tmp_path / "sd21.safetensors", stored), "clip_h")
    assert (tower.layout, tower.prefix) == ("openclip", "cond_stage_model.model.")
    assert_same_bits(sd, oracle_openclip_to_canonical(fm.openclip_state(ref_clip_gelu)))
    rm.compare_clip(ref_clip_gelu, hf_for(ref_clip_gelu, sd, tower))


@pytest.mark.parametrize("refiner", [False, True])
def test_sdxl_checkpoint_both_towers(
    tmp_path: Path, hf_clip_noproj: torch.nn.Module, ref_clip_gelu: rm.OpenClipTextTransformer, refiner: bool
) -> None:
    g = {**fm.openclip_state(ref_clip_gelu), "logit_scale": torch.tensor(4.6)}
    stored = dict(_unet_vae())
    if refiner:
        stored |= _prefixed(g, "conditioner.embedders.0.model.")
    else:
        l_te = fm.hf_clip_state(hf_clip_noproj, position_ids=torch.arange(77).unsqueeze(0))
        stored |= _prefixed(l_te, "conditioner.embedders.0.transformer.")
        stored |= _prefixed(g, "conditioner.embedders.1.model.")
    path = fm.save_safetensors(tmp_path / "sdxl.safetensors", stored)
    assert sorted(t.tower for t in towers(path)) == (["clip_g"] if refiner else ["clip_g", "clip_l"])
    g_sd, g_tower = load(path, "clip_g")
    assert_same_bits(g_sd, oracle_openclip_to_canonical(fm.openclip_state(ref_clip_gelu)))
    rm.compare_clip(ref_clip_gelu, hf_for(ref_clip_gelu, g_sd, g_tower))
    if not refiner:
        l_sd, _ = load(path, "clip_l")
        assert_same_bits(l_sd, rm.hf_clip_canonical_sd(hf_clip_noproj))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_sd3_and_flux_bundles(
    tmp_path: Path, hf_clip_noproj: torch.nn.Module, hf_clip: torch.nn.Module, t5_small: torch.nn.Module, family: str
) -> None:
    stored = {
        **_prefixed(fm.hf_clip_state(hf_clip_noproj), "text_encoders.clip_l.transformer."),
        **_prefixed(fm.t5_state(t5_small), "text_encoders.t5xxl.transformer."),
        "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.randn(24, 8),
    }
    if family == "sd3":
        stored |= _prefixed(fm.hf_clip_state(hf_clip), "text_encoders.clip_g.transformer.")
    path = fm.save_safetensors(tmp_path / "bundle.safetensors", stored)
    want_slots = ["clip_g", "clip_l", "t5xxl"] if family == "sd3" else ["clip_l", "t5xxl"]
    assert sorted(t.tower for t in towers(path)) == want_slots
    l_sd, _ = load(path, "clip_l")
    assert_same_bits(l_sd, rm.hf_clip_canonical_sd(hf_clip_noproj))
    t_sd, t_tower = load(path, "t5xxl")
    assert t_tower.prefix == "text_encoders.t5xxl.transformer."
    assert_canonical(t_sd, "t5")
    assert_same_bits(t_sd, rm.t5_canonical_sd(t5_small))
    if family == "sd3":
        g_sd, _ = load(path, "clip_g")
        assert_same_bits(g_sd, rm.hf_clip_canonical_sd(hf_clip))


# ---------------------------------------------------------------------------------------------
# T5 family


def _t5_into_fresh(sd: Mapping[str, Any], like: torch.nn.Module, umt5: bool = False) -> torch.nn.Module:
    cfg = like.config
    fresh = rm.make_t5(cfg.d_model, cfg.d_ff, cfg.num_layers, cfg.num_heads, vocab=cfg.vocab_size, umt5=umt5, seed=77)
    rm.load_canonical_into_hf(fresh, materialize(sd, torch.float32))
    return fresh


@pytest.mark.parametrize(
    ("shared", "embed_tokens"),
    [(True, False), (False, True), (True, True)],
    ids=["shared", "embed-tokens-only", "both"],
)
def test_t5_embedding_aliases(tmp_path: Path, t5_small: torch.nn.Module, shared: bool, embed_tokens: bool) -> None:
    stored = fm.t5_state(t5_small, shared=shared, embed_tokens=embed_tokens)
    sd, tower = load(fm.save_safetensors(tmp_path / "t5.safetensors", stored))
    assert tower.family == "t5"
    assert tower.layout == "hf"
    assert_canonical(sd, "t5")
    assert "encoder.embed_tokens.weight" not in sd
    assert_same_bits(sd, rm.t5_canonical_sd(t5_small))
    rm.compare_t5(t5_small, _t5_into_fresh(sd, t5_small), atol=0.0)


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2], ids=_dtype_id
)
def test_t5_stored_dtype_kept(tmp_path: Path, t5_small: torch.nn.Module, dtype: torch.dtype) -> None:
    stored = fm.t5_state(t5_small, dtype=dtype)
    sd, tower = load(fm.save_safetensors(tmp_path / "t5.safetensors", stored))
    assert tower.quant == ("fp8" if dtype.itemsize == 1 else None)
    assert_same_bits(sd, stored)


@pytest.mark.parametrize("fp8", ["F8_E4M3", "F8_E5M2"])
@pytest.mark.parametrize("input_scale", [False, True])
def test_t5_scaled_fp8(tmp_path: Path, t5_small: torch.nn.Module, fp8: str, input_scale: bool) -> None:
    stored, want = fm.scaled_fp8_state(fm.t5_state(t5_small), fp8, input_scale=input_scale)
    sd, tower = load(fm.save_safetensors(tmp_path / "t5xxl_fp8_scaled.safetensors", stored))
    assert tower.quant == "scaled-fp8"
    assert_canonical(sd, "t5")
    assert set(sd) == set(want)
    scaled = [k for k in sd if k.removesuffix(".weight") + ".scale_weight" in stored]
    assert scaled
    for k in scaled:
        # kept compressed (fp8 + scale) until compute time; the stored type is still reported
        assert is_compressed(sd[k]), f"{k}: expanded at load time"
        assert weight_dtype_name(sd[k]) == fp8
    real = materialize(sd, torch.float32)
    for k, w in want.items():
        assert torch.equal(real[k], w), f"{k}: not fp8 × scale"
    reference = _t5_into_fresh(want, t5_small)
    rm.compare_t5(reference, _t5_into_fresh(sd, t5_small), atol=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dtype_id)
def test_umt5_keeps_every_blocks_relative_bias(tmp_path: Path, umt5_small: torch.nn.Module, dtype: torch.dtype) -> None:
    stored = fm.t5_state(umt5_small, dtype=dtype)
    layers = umt5_small.config.num_layers
    assert sum(k.endswith("relative_attention_bias.weight") for k in stored) == layers  # one per block
    sd, tower = load(fm.save_safetensors(tmp_path / "umt5.safetensors", stored))
    assert tower.layers == layers
    assert_canonical(sd, "t5")
    assert_same_bits(sd, stored)
    if dtype == torch.float32:
        rm.compare_t5(umt5_small, _t5_into_fresh(sd, umt5_small, umt5=True), atol=0.0)


def _seq2seq_shards(t5: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    """Encoder split over two shards, decoder + lm_head alone in the third."""
    enc = fm.t5_state(t5)
    first = {k: v for k, v in enc.items() if k == "shared.weight" or k.startswith("encoder.block.0.")}
    second = {k: v for k, v in enc.items() if k not in first}
    gen = torch.Generator().manual_seed(5)
    d = t5.config.d_model
    dec_spec = fm.t5_decoder_spec(d, t5.config.d_ff, 2, t5.config.num_heads, vocab=t5.config.vocab_size, dtype="F32")
    third = {k: torch.randn(s, generator=gen) for k, (s, _) in dec_spec.items()}
    return [first, second, third]


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_sharded_t5_reads_only_encoder_shards(tmp_path: Path, t5_small: torch.nn.Module, fmt: str, damage: str) -> None:
    index = fm.write_sharded(tmp_path / "flan-t5", _seq2seq_shards(t5_small), fmt=fmt)
    folder = index.parent
    (tower,) = towers(folder)
    tower = as_usable(tower)
    decoder = next(folder.glob("*00003-of-00003*"))
    if damage == "delete":
        decoder.unlink()
    else:
        decoder.write_bytes(b"\x00not a shard at all")
    with open_file(folder) as src:
        sd = load_tower(src, tower)
    assert_canonical(sd, "t5")
    assert_same_bits(sd, rm.t5_canonical_sd(t5_small))
    rm.compare_t5(t5_small, _t5_into_fresh(sd, t5_small), atol=0.0)


# ---------------------------------------------------------------------------------------------
# OpenCLIP <-> canonical round trips (what A1111's SDXL CLIP-G / SD2 CLIP-H hold)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn], ids=_dtype_id)
def test_openclip_round_trip_bit_exact(ref_clip_gelu: rm.OpenClipTextTransformer, dtype: torch.dtype) -> None:
    oc = fm.openclip_state(ref_clip_gelu, dtype)
    canon = openclip_to_canonical(oc)
    assert_same_bits(canon, oracle_openclip_to_canonical(oc))
    back = canonical_to_openclip(canon)
    assert_same_bits(back, oc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e5m2], ids=_dtype_id)
def test_canonical_round_trip_bit_exact(hf_clip: torch.nn.Module, dtype: torch.dtype) -> None:
    canon = {k: v.to(dtype) for k, v in rm.hf_clip_canonical_sd(hf_clip).items()}
    oc = canonical_to_openclip(canon)
    assert "transformer.resblocks.0.attn.in_proj_weight" in oc
    assert "text_projection" in oc
    assert torch.equal(dense(oc["text_projection"]).float(), canon["text_projection.weight"].float().t())
    assert_same_bits(openclip_to_canonical(oc), canon)


def test_canonical_to_openclip_feeds_reference_module(hf_clip: torch.nn.Module) -> None:
    """canonical → OpenCLIP loads strictly into the OpenCLIP reference module and computes the same."""
    oc = canonical_to_openclip(rm.hf_clip_canonical_sd(hf_clip))
    ref = rm.OpenClipTextTransformer(64, 2, 4, rm.SMALL_VOCAB, proj_dim=48)
    ref.load_state_dict(oc, strict=True)
    rm.compare_clip(ref.eval(), hf_clip)


# ---------------------------------------------------------------------------------------------
# real shapes (sparse data): names, shapes and stored dtypes of every usable catalogue entry

# GGUF is left out here: its reader copies data into memory (gigabytes at real size); small GGUF
# files are converted and compared value by value in test_gguf_t5_to_canonical
REAL = [
    name
    for name, case in fm.CATALOGUE.items()
    if case.fmt != "gguf" and all(w.kind not in ("unknown", "not-a-text-encoder") for w in case.towers)
]


def _canonical_spec(want: fm.Expect, t: TowerInfo) -> dict[str, tuple[int, ...]]:
    if want.kind in ("clip-l", "long-clip-l", "clip-h", "clip-g"):
        proj = t.width if "projection" in t.features else None
        spec = fm.canonical_clip_spec(t.width, t.layers, positions=t.positions, proj=proj)
    else:
        d, ff, layers, heads = {4096: fm.T5_XXL, 2048: fm.T5_XL, 768: fm.T5_BASE}[t.width]
        spec = fm.t5_spec(d, ff, layers, heads, vocab=t.vocab, umt5=want.kind == "umt5-xxl")
    return {k: s for k, (s, _) in spec.items()}


@pytest.mark.parametrize("name", REAL)
def test_real_shapes_load_canonical(make_case: Callable[[str], Path], name: str) -> None:
    path = make_case(name)
    case = fm.CATALOGUE[name]
    with open_file(path) as src:
        found = detect(src)
        for want in case.towers:
            t = next(x for x in found if x.tower == want.tower)
            assert t.kind == want.kind
            sd = load_tower(src, t)
            assert {k: tuple(v.shape) for k, v in sd.items()} == _canonical_spec(want, t)
            stored = set(t.dtypes)
            for k, w in sd.items():
                assert weight_dtype_name(w) in stored, f"{k}: {weight_dtype_name(w)} not among stored {stored}"


# ---------------------------------------------------------------------------------------------
# values and broken towers


def test_nan_weights_are_not_silently_changed(tmp_path: Path, hf_clip_noproj: torch.nn.Module) -> None:
    stored = fm.hf_clip_state(hf_clip_noproj)
    key = "text_model.encoder.layers.1.mlp.fc2.weight"
    stored[key][3, 5] = float("nan")
    stored["text_model.final_layer_norm.bias"][0] = float("inf")
    sd, _ = load(fm.save_safetensors(tmp_path / "nan.safetensors", stored))
    assert torch.isnan(sd[key][3, 5])
    assert torch.isinf(sd["text_model.final_layer_norm.bias"][0])
    assert convert.first_non_finite(sd) in (key, "text_model.final_layer_norm.bias")


def _broken_cases(ref: rm.OpenClipTextTransformer, t5: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    oc = fm.openclip_state(ref)
    t5sd = fm.t5_state(t5)
    gmp = {k.replace(".mlp.c_fc.weight", ".mlp.c_fc.theta"): v for k, v in oc.items()}
    return {
        "openclip-missing-ln_2": {k: v for k, v in oc.items() if k != "transformer.resblocks.1.ln_2.weight"},
        "openclip-missing-final-ln": {k: v for k, v in oc.items() if not k.startswith("ln_final.")},
        "openclip-in-proj-not-thirds": {**oc, "transformer.resblocks.0.attn.in_proj_weight": torch.randn(190, 64)},
        "openclip-bias-wrong-size": {**oc, "transformer.resblocks.1.mlp.c_fc.bias": torch.randn(255)},
        "gmp-theta-without-r": gmp,
        "t5-missing-final-norm": {k: v for k, v in t5sd.items() if k != "encoder.final_layer_norm.weight"},
        "t5-block-1-missing-wo": {
            k: v for k, v in t5sd.items() if k != "encoder.block.1.layer.1.DenseReluDense.wo.weight"
        },
        "t5-wi-wrong-shape": {**t5sd, "encoder.block.2.layer.1.DenseReluDense.wi_0.weight": torch.randn(100, 64)},
    }


@pytest.mark.parametrize(
    "case",
    [
        "openclip-missing-ln_2",
        "openclip-missing-final-ln",
        "openclip-in-proj-not-thirds",
        "openclip-bias-wrong-size",
        "gmp-theta-without-r",
        "t5-missing-final-norm",
        "t5-block-1-missing-wo",
        "t5-wi-wrong-shape",
    ],
)
def test_broken_tower_is_one_bad_file_error(
    tmp_path: Path, ref_clip: rm.OpenClipTextTransformer, t5_small: torch.nn.Module, case: str
) -> None:
    """An incomplete or inconsistent tower is refused before anything is loaded anywhere, in one line."""
    path = fm.save_safetensors(tmp_path / f"{case}.safetensors", _broken_cases(ref_clip, t5_small)[case])
    found = towers(path)
    if found[0].kind in ("unknown", "not-a-text-encoder") and found[0].family is None:
        pytest.fail(f"{case}: detect found no tower at all ({found[0].note})")
    with open_file(path) as src, pytest.raises(BadFileError) as info:
        load_tower(src, as_usable(found[0]))
    text = str(info.value)
    assert "\n" not in text
    assert path.name in text
    assert text == one_line(info.value)


def test_unusable_tower_is_refused(tmp_path: Path) -> None:
    vae = {k: torch.randn(s) for k, (s, _) in fm.vae_spec().items() if len(s) < 4 or s[0] * s[1] < 5000}
    path = fm.save_safetensors(tmp_path / "vae.safetensors", vae)
    (t,) = towers(path)
    assert t.kind == "not-a-text-encoder"
    with open_file(path) as src, pytest.raises(BadFileError) as info:
        load_tower(src, t)
    assert "vae.safetensors" in str(info.value)


def test_packed_scaled_weight_survives_openclip_split() -> None:
    """A scaled-fp8 fused in_proj splits into q/k/v that each still dequantise exactly."""
    w = torch.randn(3 * 8, 8)
    scale = torch.tensor(0.01)
    q8 = (w / scale).to(torch.float8_e4m3fn)
    packed = PackedTensor("F8_E4M3", q8, q8.shape, scale)
    oc = {"transformer.resblocks.0.attn.in_proj_weight": packed}
    out = openclip_to_canonical(oc)
    full = q8.float() * scale
    for j, n in enumerate("qkv"):
        part = out[f"text_model.encoder.layers.0.self_attn.{n}_proj.weight"]
        assert torch.equal(dense(part, torch.float32), full[j * 8 : (j + 1) * 8])


# ---------------------------------------------------------------------------------------------
# GGUF (llama.cpp names from gguf-py's own tensor map; values from tests/synth_gguf.py's writer)


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0"])
def test_gguf_t5_to_canonical(tmp_path: Path, t5_small: torch.nn.Module, qtype: str) -> None:
    pytest.importorskip("gguf")
    from synth_gguf import write_gguf

    hf = rm.t5_canonical_sd(t5_small)
    names = fm.hf_t5_to_gguf_names(hf)
    renamed = {new: hf[old] for old, new in zip(hf, names, strict=True)}
    held = write_gguf(tmp_path / "t5-encoder.gguf", renamed, qtype, arch="t5encoder")
    want = {old: held[new] for old, new in zip(hf, names, strict=True)}  # what the file really holds
    sd, tower = load(tmp_path / "t5-encoder.gguf")
    assert (tower.layout, tower.format) == ("llama.cpp", "gguf")
    assert tower.quant == ("gguf" if qtype == "Q8_0" else None)
    assert_canonical(sd, "t5")
    assert set(sd) == set(hf)
    real = materialize(sd, torch.float32)
    for k, w in want.items():
        assert tuple(real[k].shape) == tuple(hf[k].shape), k
        assert torch.equal(real[k], w.float()), f"{k}: differs from what the GGUF file holds"
    rm.compare_t5(_t5_into_fresh(want, t5_small), _t5_into_fresh(sd, t5_small), atol=0.0)
