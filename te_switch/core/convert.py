"""Turn any recognised tower into canonical tensors, and canonical CLIP into OpenCLIP layout.

Canonical names are HF ``CLIPTextModel`` / ``T5EncoderModel`` names (docs/ARCHITECTURE.md).
Every rename is an explicit table; splits and fusions are exact, so OpenCLIP → canonical →
OpenCLIP returns the same bytes.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from te_switch.core.detect import QUANT_SIDE_SUFFIXES, TowerInfo, tower_keys
from te_switch.core.errors import BadFileError, TESwitchError
from te_switch.core.readers import TensorSource
from te_switch.core.tensors import PackedTensor, Weight, all_finite, dense, materialize

# ---------------------------------------------------------------------------------------------
# tables

# OpenAI / OpenCLIP text tower (bare names) -> canonical
OPENCLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
# per residual block: transformer.resblocks.{i}.<left>  ->  text_model.encoder.layers.{i}.<right>
OPENCLIP_BLOCK = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
# fused attention input projection, split into thirds in q, k, v order
OPENCLIP_FUSED = {
    "attn.in_proj_weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.in_proj_bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
}
# OpenAI stores `x @ P`; HF stores Linear(P.T)
OPENCLIP_RAW_PROJECTION = "text_projection"
CANONICAL_PROJECTION = "text_projection.weight"

# llama.cpp (GGUF) T5 encoder names -> canonical (shapes are already torch order from the reader)
GGUF_T5_TOP = {
    "token_embd.weight": "shared.weight",
    "enc.output_norm.weight": "encoder.final_layer_norm.weight",
}
# per block: enc.blk.{i}.<left>  ->  encoder.block.{i}.<right>
GGUF_T5_BLOCK = {
    "attn_q.weight": "layer.0.SelfAttention.q.weight",
    "attn_k.weight": "layer.0.SelfAttention.k.weight",
    "attn_v.weight": "layer.0.SelfAttention.v.weight",
    "attn_o.weight": "layer.0.SelfAttention.o.weight",
    "attn_rel_b.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "attn_norm.weight": "layer.0.layer_norm.weight",
    "ffn_gate.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn_up.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn_down.weight": "layer.1.DenseReluDense.wo.weight",
    "ffn_norm.weight": "layer.1.layer_norm.weight",
}

LONG_CLIP_KEEP = 20  # Long-CLIP keeps the first 20 positions of the original table
_BLOCK = re.compile(r"^(transformer\.resblocks|enc\.blk)\.(\d+)\.(.+)$")


# ---------------------------------------------------------------------------------------------
# small exact operations on weights that may be packed


def _split_rows(w: Weight, parts: int) -> list[Weight]:
    """Split along the output dimension; packed weights split their block rows (exact)."""
    if isinstance(w, PackedTensor):
        rows = w.shape[0] // parts
        raws = w.raw.split(w.raw.shape[0] // parts, dim=0)
        scale = w.scale
        scales: list[torch.Tensor | None]
        if scale is not None and scale.numel() > 1:
            scales = list(scale.split(scale.shape[0] // parts, dim=0))
        else:
            scales = [scale] * parts
        return [
            PackedTensor(w.qtype, r, torch.Size((rows, *w.shape[1:])), s) for r, s in zip(raws, scales, strict=True)
        ]
    return list(w.chunk(parts, dim=0))


def _transpose(w: Weight) -> torch.Tensor:
    # plain tensors keep their stored dtype (fp8 included) so layout round trips stay bit-exact
    return (dense(w) if isinstance(w, PackedTensor) else w).t().contiguous()


def fold_gmp(sd: Mapping[str, Weight]) -> dict[str, Weight]:
    """GmP training checkpoints: ``weight = r * normalize(theta, dim=1)`` (zer0int's GeometricLinear)."""
    out: dict[str, Weight] = {}
    for key, value in sd.items():
        if key.endswith(".theta"):
            base = key[: -len(".theta")]
            r = sd.get(base + ".r")
            if r is None:
                raise ValueError(f"{key} has no matching {base}.r")
            theta = dense(value)
            weight = dense(r).float() * F.normalize(theta.float(), p=2, dim=1)
            out[base + ".weight"] = weight.to(theta.dtype)
        elif key.endswith(".r") and key[: -len(".r")] + ".theta" in sd:
            continue
        else:
            out[key] = value
    return out


def fold_scaled_fp8(sd: Mapping[str, Weight]) -> dict[str, Weight]:
    """``X.weight`` (fp8) + ``X.scale_weight`` / ``X.weight_scale`` → one PackedTensor; markers dropped."""
    out: dict[str, Weight] = {}
    for key, value in sd.items():
        if key == "scaled_fp8" or key.endswith(QUANT_SIDE_SUFFIXES):
            continue
        scale = None
        if key.endswith(".weight"):
            base = key[: -len(".weight")]
            scale = sd.get(base + ".scale_weight", sd.get(base + ".weight_scale"))
        if scale is None:
            out[key] = value
            continue
        if not isinstance(value, torch.Tensor) or value.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            # a scale beside a non-fp8 weight: apply it now, in fp32
            out[key] = (dense(value).float() * dense(scale).float()).to(dense(value).dtype)
            continue
        s = dense(scale).float()
        s = s.reshape(()) if s.numel() == 1 else s.reshape(-1, *([1] * (value.dim() - 1)))
        qtype = "F8_E4M3" if value.dtype == torch.float8_e4m3fn else "F8_E5M2"
        out[key] = PackedTensor(qtype, value, value.shape, s)
    return out


# ---------------------------------------------------------------------------------------------
# layout conversions (bare names, no prefix)


def openclip_to_canonical(sd: Mapping[str, Weight]) -> dict[str, Weight]:
    """OpenAI/OpenCLIP text tower → canonical. Long-CLIP's ``positional_embedding_res`` is merged."""
    out: dict[str, Weight] = {}
    for key, value in sd.items():
        if key in OPENCLIP_TOP:
            out[OPENCLIP_TOP[key]] = value
        elif key == OPENCLIP_RAW_PROJECTION:
            out[CANONICAL_PROJECTION] = _transpose(value)
        elif key == CANONICAL_PROJECTION:
            out[CANONICAL_PROJECTION] = value  # already a Linear weight (some re-exports)
        elif key == "positional_embedding_res":
            continue  # merged below
        elif m := _BLOCK.match(key):
            i, rest = m.group(2), m.group(3)
            head = f"text_model.encoder.layers.{i}."
            if rest in OPENCLIP_BLOCK:
                out[head + OPENCLIP_BLOCK[rest]] = value
            elif rest in OPENCLIP_FUSED:
                for name, part in zip(OPENCLIP_FUSED[rest], _split_rows(value, 3), strict=True):
                    out[head + name] = part
            else:
                out[key] = value  # left for the completeness check to report
        else:
            out[key] = value
    if "positional_embedding_res" in sd:
        # Long-CLIP adds pe*mask1 + pe_res*mask2: rows <20 from pe, rows >=20 from pe_res
        pe = dense(sd["positional_embedding"])
        res = dense(sd["positional_embedding_res"])
        out[OPENCLIP_TOP["positional_embedding"]] = torch.cat([pe[:LONG_CLIP_KEEP], res[LONG_CLIP_KEEP:]], dim=0)
    return out


def canonical_to_openclip(sd: Mapping[str, Weight]) -> dict[str, Weight]:
    """Canonical CLIP → OpenCLIP layout (what A1111's SDXL CLIP-G and SD2 CLIP-H modules hold)."""
    top = {v: k for k, v in OPENCLIP_TOP.items()}
    block = {v: k for k, v in OPENCLIP_BLOCK.items()}
    fused_parts = {part: (fused, idx) for fused, parts in OPENCLIP_FUSED.items() for idx, part in enumerate(parts)}
    out: dict[str, Weight] = {}
    pending: dict[tuple[str, str], list[Weight | None]] = {}
    layer = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")
    for key, value in sd.items():
        if key in top:
            out[top[key]] = value
        elif key == CANONICAL_PROJECTION:
            out[OPENCLIP_RAW_PROJECTION] = _transpose(value)
        elif m := layer.match(key):
            i, rest = m.group(1), m.group(2)
            head = f"transformer.resblocks.{i}."
            if rest in block:
                out[head + block[rest]] = value
            elif rest in fused_parts:
                fused, idx = fused_parts[rest]
                pending.setdefault((head, fused), [None, None, None])[idx] = value
            else:
                raise KeyError(f"no OpenCLIP name for {key}")
        else:
            raise KeyError(f"no OpenCLIP name for {key}")
    for (head, fused), parts in pending.items():
        if any(p is None for p in parts):
            raise KeyError(f"{head}{fused}: q, k and v are not all present")
        out[head + fused] = torch.cat([dense(p) if isinstance(p, PackedTensor) else p for p in parts], dim=0)  # type: ignore[misc]
    return out


def hf_flat_to_canonical(sd: Mapping[str, Weight]) -> dict[str, Weight]:
    """transformers ≥ 5.6 / old SD1 names (``embeddings.*``) → canonical (``text_model.embeddings.*``)."""
    return {(k if k.startswith("text_projection") else "text_model." + k): v for k, v in sd.items()}


def gguf_t5_to_canonical(sd: Mapping[str, Weight]) -> dict[str, Weight]:
    out: dict[str, Weight] = {}
    for key, value in sd.items():
        if key in GGUF_T5_TOP:
            out[GGUF_T5_TOP[key]] = value
        elif (m := _BLOCK.match(key)) and m.group(3) in GGUF_T5_BLOCK:
            out[f"encoder.block.{m.group(2)}.{GGUF_T5_BLOCK[m.group(3)]}"] = value
        else:
            out[key] = value
    # non-gated T5 1.0 has only ffn_up: it is `wi`, not `wi_1`
    if not any(k.endswith(".wi_0.weight") for k in out):
        out = {k.replace(".DenseReluDense.wi_1.", ".DenseReluDense.wi."): v for k, v in out.items()}
    return out


def t5_to_canonical(sd: Mapping[str, Weight]) -> dict[str, Weight]:
    """HF T5 names: ``encoder.embed_tokens.weight`` is the tied ``shared.weight``."""
    out = dict(sd)
    embed = out.pop("encoder.embed_tokens.weight", None)
    if "shared.weight" not in out and embed is not None:
        out["shared.weight"] = embed
    return out


# ---------------------------------------------------------------------------------------------
# completeness and consistency


def expected_shapes(kind_family: str, sd: Mapping[str, Weight]) -> dict[str, tuple[int, ...]]:
    """Every canonical key a complete tower of this family needs, with the shape it must have.

    Sizes are read from a few anchor tensors of ``sd`` itself, so a file that disagrees with itself
    (a truncated layer, a mis-sized bias) is caught before anything is loaded anywhere.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    if kind_family == "clip":
        vocab, width = _shape(sd, "text_model.embeddings.token_embedding.weight")
        positions = _shape(sd, "text_model.embeddings.position_embedding.weight")[0]
        ff = _shape(sd, "text_model.encoder.layers.0.mlp.fc1.weight")[0]
        layers = _count(sd, "text_model.encoder.layers.")
        shapes["text_model.embeddings.token_embedding.weight"] = (vocab, width)
        shapes["text_model.embeddings.position_embedding.weight"] = (positions, width)
        for i in range(layers):
            h = f"text_model.encoder.layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                shapes[f"{h}self_attn.{proj}.weight"] = (width, width)
                shapes[f"{h}self_attn.{proj}.bias"] = (width,)
            for ln in ("layer_norm1", "layer_norm2"):
                shapes[f"{h}{ln}.weight"] = (width,)
                shapes[f"{h}{ln}.bias"] = (width,)
            shapes[f"{h}mlp.fc1.weight"] = (ff, width)
            shapes[f"{h}mlp.fc1.bias"] = (ff,)
            shapes[f"{h}mlp.fc2.weight"] = (width, ff)
            shapes[f"{h}mlp.fc2.bias"] = (width,)
        shapes["text_model.final_layer_norm.weight"] = (width,)
        shapes["text_model.final_layer_norm.bias"] = (width,)
        if CANONICAL_PROJECTION in sd:
            shapes[CANONICAL_PROJECTION] = (_shape(sd, CANONICAL_PROJECTION)[0], width)
        return shapes
    vocab, d_model = _shape(sd, "shared.weight")
    inner = _shape(sd, "encoder.block.0.layer.0.SelfAttention.q.weight")[0]
    buckets, heads = _shape(sd, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    ff = _shape(sd, "encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight")[0]
    blocks = _count(sd, "encoder.block.")
    per_block_bias = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in sd
    shapes["shared.weight"] = (vocab, d_model)
    for i in range(blocks):
        h = f"encoder.block.{i}."
        for proj in ("q", "k", "v"):
            shapes[f"{h}layer.0.SelfAttention.{proj}.weight"] = (inner, d_model)
        shapes[f"{h}layer.0.SelfAttention.o.weight"] = (d_model, inner)
        if i == 0 or per_block_bias:
            shapes[f"{h}layer.0.SelfAttention.relative_attention_bias.weight"] = (buckets, heads)
        shapes[f"{h}layer.0.layer_norm.weight"] = (d_model,)
        for wi in ("wi_0", "wi_1") if gated else ("wi",):
            shapes[f"{h}layer.1.DenseReluDense.{wi}.weight"] = (ff, d_model)
        shapes[f"{h}layer.1.DenseReluDense.wo.weight"] = (d_model, ff)
        shapes[f"{h}layer.1.layer_norm.weight"] = (d_model,)
    shapes["encoder.final_layer_norm.weight"] = (d_model,)
    return shapes


def _shape(sd: Mapping[str, Weight], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise KeyError(key)
    return tuple(sd[key].shape)


def _count(sd: Mapping[str, Weight], head: str) -> int:
    idx = {int(k[len(head) :].split(".", 1)[0]) for k in sd if k.startswith(head) and k[len(head) :][:1].isdigit()}
    return max(idx) + 1 if idx else 0


def check_complete(sd: Mapping[str, Weight], family: str, path: str) -> None:
    """Raise BadFileError unless ``sd`` is exactly one complete, self-consistent tower."""
    try:
        want = expected_shapes(family, sd)
    except KeyError as e:
        raise BadFileError(path, f"incomplete {family.upper()} encoder: no {e.args[0]}") from None
    missing = [k for k in want if k not in sd]
    if missing:
        raise BadFileError(
            path, f"incomplete {family.upper()} encoder: {len(missing)} tensors missing (first: {missing[0]})"
        )
    extra = [k for k in sd if k not in want]
    if extra:
        raise BadFileError(path, f"unexpected tensor {extra[0]} in a {family.upper()} encoder")
    for key, shape in want.items():
        if tuple(sd[key].shape) != shape:
            raise BadFileError(path, f"{key} has shape {list(sd[key].shape)}, expected {list(shape)}")


def first_non_finite(sd: Mapping[str, Weight]) -> str | None:
    """Name of the first tensor holding NaN or Inf (packed weights are expanded one at a time)."""
    for key, w in sd.items():
        if isinstance(w, torch.Tensor) and not w.is_floating_point():
            continue
        if not all_finite(dense(w)):
            return key
    return None


# ---------------------------------------------------------------------------------------------
# entry points


def load_tower(
    src: TensorSource, tower: TowerInfo, *, check: bool = True, as_stored: bool = False
) -> dict[str, Weight]:
    """Read one tower of ``src`` and return it under canonical names (values as stored).

    ``as_stored``: no folding of scaled-fp8 scales or GmP factors (how a host that loaded the file as
    it is holds it: Forge keeps ``scale_weight`` beside the fp8 weight); implies no completeness check.
    """
    if not tower.usable and check:
        raise BadFileError(src.path, tower.error or tower.note or f"not a usable text encoder ({tower.kind})")
    p = tower.prefix
    local = {k[len(p) :]: src.load(k) for k in tower_keys(src.keys(), p, tower.layout or "")}
    try:
        local = local if as_stored else fold_gmp(fold_scaled_fp8(local))
    except ValueError as e:
        raise BadFileError(src.path, str(e)) from None
    if tower.layout == "openclip":
        sd = openclip_to_canonical(local)
    elif tower.layout == "hf-flat":
        sd = hf_flat_to_canonical(local)
    elif tower.layout == "llama.cpp":
        sd = gguf_t5_to_canonical(local)
    elif tower.family == "t5":
        sd = t5_to_canonical(local)
    else:
        sd = dict(local)
    # derived or unused: adapters write arange(positions) themselves; logit_scale is CLIP's loss temperature
    sd = {k: v for k, v in sd.items() if not k.endswith(("position_ids", "logit_scale"))}
    if check and not as_stored:
        check_complete(sd, tower.family or "clip", src.path)
    return sd


def save_canonical(
    path: str,
    sd: Mapping[str, Weight],
    *,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a plain safetensors file (packed weights expanded); atomic via a temporary file."""
    from safetensors.torch import save_file

    tensors = {k: v.contiguous().clone() for k, v in materialize(sd, dtype).items()}
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=dict(metadata or {}))
        os.replace(tmp, path)
    except Exception as e:  # safetensors reports I/O problems as its own error type
        raise TESwitchError(f"{path}: cannot write ({' '.join(str(e).split())})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
