"""Turn any recognised tower into canonical tensors, and canonical CLIP into OpenCLIP layout.

Canonical names are HF ``CLIPTextModel`` / ``T5EncoderModel`` names (docs/ARCHITECTURE.md). The
stored key schemes and their rename tables are ``core.layouts``; splits and fusions are exact, so
OpenCLIP → canonical → OpenCLIP returns the same bytes.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from te_switch.core.detect import QUANT_SIDE_SUFFIXES, TowerInfo
from te_switch.core.errors import BadFileError, TESwitchError
from te_switch.core.layouts import (
    CANONICAL_PROJECTION,
    OPENCLIP_BLOCK,
    OPENCLIP_FUSED,
    OPENCLIP_RAW_PROJECTION,
    OPENCLIP_TOP,
    dense_name,
    layout_of,
    split_of,
    transpose,
)
from te_switch.core.readers import TensorSource
from te_switch.core.tensors import (
    LazyWeight,
    PackedTensor,
    Value,
    Weight,
    all_finite,
    dense,
    derive,
    materialize,
    weight_dtype_name,
)

# ---------------------------------------------------------------------------------------------
# folding training-time and quantisation forms into plain weights


def _gmp_weight(r: Weight, theta: Weight) -> torch.Tensor:
    theta = dense(theta)
    return (dense(r).float() * F.normalize(theta.float(), p=2, dim=1)).to(theta.dtype)


def fold_gmp(sd: Mapping[str, Value]) -> dict[str, Value]:
    """GmP training checkpoints: ``weight = r * normalize(theta, dim=1)`` (zer0int's GeometricLinear).

    Lazy inputs give lazy weights: each is computed from its ``r`` and ``theta`` when it is loaded."""
    out: dict[str, Value] = {}
    for key, value in sd.items():
        if key.endswith(".theta"):
            base = key[: -len(".theta")]
            r = sd.get(base + ".r")
            if r is None:
                raise ValueError(f"{key} has no matching {base}.r")
            if tuple(r.shape) != (value.shape[0], 1):
                raise ValueError(f"{base}.r has shape {list(r.shape)}, expected [{value.shape[0]}, 1]")
            out[base + ".weight"] = derive(_gmp_weight, r, value, shape=tuple(value.shape), dtype=dense_name(value))
        elif key.endswith(".r") and key[: -len(".r")] + ".theta" in sd:
            continue
        else:
            out[key] = value
    return out


def _apply_scale(value: Weight, scale: Weight) -> torch.Tensor:
    """A scale beside a non-fp8 weight: applied now, in fp32."""
    return (dense(value).float() * dense(scale).float()).to(dense(value).dtype)


def _scaled_fp8(value: torch.Tensor, scale: Weight) -> PackedTensor:
    s = dense(scale).float()
    s = s.reshape(()) if s.numel() == 1 else s.reshape(-1, *([1] * (value.dim() - 1)))
    qtype = "F8_E4M3" if value.dtype == torch.float8_e4m3fn else "F8_E5M2"
    return PackedTensor(qtype, value, value.shape, s)


def fold_scaled_fp8(sd: Mapping[str, Value]) -> dict[str, Value]:
    """``X.weight`` (fp8) + ``X.scale_weight`` / ``X.weight_scale`` → one PackedTensor; markers dropped."""
    out: dict[str, Value] = {}
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
        shape = tuple(value.shape)
        if isinstance(value, PackedTensor) or weight_dtype_name(value) not in ("F8_E4M3", "F8_E5M2"):
            out[key] = derive(_apply_scale, value, scale, shape=shape, dtype=dense_name(value))
        else:
            out[key] = derive(_scaled_fp8, value, scale, shape=shape, dtype=weight_dtype_name(value))
    return out


# ---------------------------------------------------------------------------------------------
# layout conversions (bare names, no prefix)


def _fused(parts: list[Value]) -> Value:
    """q, k and v as one ``in_proj``: the file's own fused tensor where they were cut from it."""
    whole = split_of(parts)
    if whole is not None:
        return whole
    rows = sum(p.shape[0] for p in parts)
    name = dense_name(parts[0]) if isinstance(parts[0], PackedTensor | LazyWeight) else weight_dtype_name(parts[0])
    return derive(_cat_rows, *parts, shape=(rows, *parts[0].shape[1:]), dtype=name)


def _cat_rows(*parts: Weight) -> torch.Tensor:
    return torch.cat([dense(p) if isinstance(p, PackedTensor) else p for p in parts], dim=0)


def canonical_to_openclip(sd: Mapping[str, Value]) -> dict[str, Value]:
    """Canonical CLIP → OpenCLIP layout (what A1111's SDXL CLIP-G and SD2 CLIP-H modules hold).

    The exact inverse of ``layouts.openclip_to_canonical``: the same tables read backwards; q, k and v
    are fused again into ``in_proj``.
    """
    top = {v: k for k, v in OPENCLIP_TOP.items()}
    top[CANONICAL_PROJECTION] = OPENCLIP_RAW_PROJECTION
    block = {v: k for k, v in OPENCLIP_BLOCK.items()}
    fused_parts = {part: (fused, idx) for fused, parts in OPENCLIP_FUSED.items() for idx, part in enumerate(parts)}
    layer = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")
    out: dict[str, Value] = {}
    pending: dict[tuple[str, str], list[Value | None]] = {}
    for key, value in sd.items():
        m = layer.match(key)
        rest = m.group(2) if m else ""
        if m is None and key in top:
            # OpenAI keeps the projection as the raw `x @ P` matrix: HF's Linear weight transposed
            out[top[key]] = transpose(value) if key == CANONICAL_PROJECTION else value
        elif m is not None and rest in block:
            out[f"transformer.resblocks.{m.group(1)}.{block[rest]}"] = value
        elif m is not None and rest in fused_parts:
            fused, idx = fused_parts[rest]
            pending.setdefault((f"transformer.resblocks.{m.group(1)}.", fused), [None, None, None])[idx] = value
        else:
            raise KeyError(f"no OpenCLIP name for {key}")
    for (head, fused), parts in pending.items():
        if any(p is None for p in parts):
            raise KeyError(f"{head}{fused}: q, k and v are not all present")
        out[head + fused] = _fused(parts)  # type: ignore[arg-type]
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


def lazy_load(src: TensorSource, key: str) -> LazyWeight:
    """``src.load(key)`` when it is needed; shape and dtype from the header now."""
    info = src.info(key)
    span = getattr(src, "span", None)  # safetensors: where the bytes lie (the commit's order)
    return LazyWeight(
        torch.Size(info.shape), info.dtype, functools.partial(src.load, key), at=span(key)[0] if span else 0
    )


def load_tower(
    src: TensorSource, tower: TowerInfo, *, check: bool = True, as_stored: bool = False, lazy: bool = False
) -> dict[str, Value]:
    """Read one tower of ``src`` and return it under canonical names (values as stored).

    ``as_stored``: no folding of scaled-fp8 scales or GmP factors (how a host that loaded the file as
    it is holds it: Forge keeps ``scale_weight`` beside the fp8 weight); implies no completeness check.
    ``lazy``: read nothing yet — every value is a :class:`LazyWeight` that reads its tensor(s) from
    ``src`` (which must stay open) and converts them when loaded, one at a time.
    """
    if not tower.usable and check:
        raise BadFileError(src.path, tower.error or tower.note or f"not a usable text encoder ({tower.kind})")
    p = tower.prefix
    layout = layout_of(tower.layout, tower.family)
    keys = layout.keys(src.keys(), p)
    local = {k[len(p) :]: lazy_load(src, k) if lazy else src.load(k) for k in keys}
    try:
        local = local if as_stored else fold_gmp(fold_scaled_fp8(local))
        sd = layout.to_canonical(local)
    except ValueError as e:
        raise BadFileError(src.path, str(e)) from None
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
        reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())
        raise TESwitchError(f"{path}: cannot write ({reason.replace(tmp, path)})") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
