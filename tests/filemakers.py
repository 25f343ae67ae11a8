"""Write weights files of every layout the core must read, at test time.

Every key name, prefix and rename here is written out explicitly from the published layouts
(HF transformers, OpenCLIP/OpenAI, ldm/sgm checkpoints, ComfyUI bundles, Comfy-Org fp8) and never
taken from te_switch's conversion code, so these files are an independent oracle.

Two kinds of files:

* **real values, small widths** (from ``refmodels``) for conversion tests;
* **real shapes, no real data** for detection, whose answer depends on width/depth/positions:
  safetensors written as a valid header plus a *sparse* zero data section (``truncate``; costs no
  disk or time on ext4/APFS/tmpfs), and pickles holding stride-0 expanded tensors (one stored
  element per tensor, real shape after ``torch.load``).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

Spec = dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, safetensors dtype name)

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPES_BY_TORCH: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
ITEMSIZE = {name: torch.empty((), dtype=dt).element_size() for name, dt in DTYPES.items()}
FP8_MAX = {"F8_E4M3": 448.0, "F8_E5M2": 57344.0}

CLIP_VOCAB = 49408
T5_VOCAB = 32128
UMT5_VOCAB = 256384

# real dimensions (width, layers, heads) of the towers whose kind depends on them
CLIP_L = (768, 12, 12)
CLIP_H = (1024, 24, 16)
CLIP_G = (1280, 32, 20)
CLIP_B = (512, 12, 8)
# d_model, d_ff, layers, heads
T5_XXL = (4096, 10240, 24, 64)
T5_XL = (2048, 5120, 24, 32)
T5_LARGE = (1024, 2816, 24, 16)
T5_BASE = (768, 2048, 12, 12)


def numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def spec_params(spec: Spec) -> int:
    return sum(numel(s) for s, _ in spec.values())


def prefixed(spec: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {prefix + k: v for k, v in spec.items()}


# ---------------------------------------------------------------------------------------------
# shape specs, one per published layout


def hf_clip_spec(
    width: int,
    layers: int,
    *,
    positions: int = 77,
    vocab: int = CLIP_VOCAB,
    proj: int | None = None,
    dtype: str = "F16",
    emb_dtype: str | None = None,
    norm_dtype: str | None = None,
    flat: bool = False,
    position_ids: str | None = None,
) -> Spec:
    """HF ``CLIPTextModel(WithProjection)`` keys; ``flat`` = transformers >= 5.6 without ``text_model.``."""
    emb_dtype = emb_dtype or dtype
    norm_dtype = norm_dtype or dtype
    p = "" if flat else "text_model."
    s: Spec = {
        f"{p}embeddings.token_embedding.weight": ((vocab, width), emb_dtype),
        f"{p}embeddings.position_embedding.weight": ((positions, width), emb_dtype),
    }
    if position_ids:
        s[f"{p}embeddings.position_ids"] = ((1, positions), position_ids)
    for i in range(layers):
        b = f"{p}encoder.layers.{i}."
        for n in ("k_proj", "v_proj", "q_proj", "out_proj"):
            s[f"{b}self_attn.{n}.weight"] = ((width, width), dtype)
            s[f"{b}self_attn.{n}.bias"] = ((width,), dtype)
        s[f"{b}layer_norm1.weight"] = ((width,), norm_dtype)
        s[f"{b}layer_norm1.bias"] = ((width,), norm_dtype)
        s[f"{b}mlp.fc1.weight"] = ((4 * width, width), dtype)
        s[f"{b}mlp.fc1.bias"] = ((4 * width,), dtype)
        s[f"{b}mlp.fc2.weight"] = ((width, 4 * width), dtype)
        s[f"{b}mlp.fc2.bias"] = ((width,), dtype)
        s[f"{b}layer_norm2.weight"] = ((width,), norm_dtype)
        s[f"{b}layer_norm2.bias"] = ((width,), norm_dtype)
    s[f"{p}final_layer_norm.weight"] = ((width,), norm_dtype)
    s[f"{p}final_layer_norm.bias"] = ((width,), norm_dtype)
    if proj:
        s["text_projection.weight"] = ((proj, width), dtype)
    return s


def canonical_clip_spec(
    width: int,
    layers: int,
    *,
    positions: int = 77,
    vocab: int = CLIP_VOCAB,
    proj: int | None = None,
    dtype: str = "F16",
) -> Spec:
    """What ``load_tower`` must return for a CLIP tower (names and shapes)."""
    return hf_clip_spec(width, layers, positions=positions, vocab=vocab, proj=proj, dtype=dtype)


def openclip_spec(
    width: int,
    layers: int,
    *,
    context: int = 77,
    vocab: int = CLIP_VOCAB,
    proj: int | None = None,
    dtype: str = "F16",
    emb_dtype: str | None = None,
    long_res: bool = False,
    gmp: bool = False,
    logit_scale: bool = False,
) -> Spec:
    """OpenCLIP / OpenAI text tower keys (``transformer.resblocks.N``, fused ``in_proj``, raw projection)."""
    emb_dtype = emb_dtype or dtype
    s: Spec = {"positional_embedding": ((context, width), emb_dtype)}
    if long_res:
        s["positional_embedding_res"] = ((context, width), emb_dtype)
    if proj:
        s["text_projection"] = ((width, proj), dtype)
    if logit_scale:
        s["logit_scale"] = ((), "F32")
    for i in range(layers):
        b = f"transformer.resblocks.{i}."
        s[f"{b}attn.in_proj_weight"] = ((3 * width, width), dtype)
        s[f"{b}attn.in_proj_bias"] = ((3 * width,), dtype)
        s[f"{b}attn.out_proj.weight"] = ((width, width), dtype)
        s[f"{b}attn.out_proj.bias"] = ((width,), dtype)
        s[f"{b}ln_1.weight"] = ((width,), dtype)
        s[f"{b}ln_1.bias"] = ((width,), dtype)
        for name, (o, i_) in (("c_fc", (4 * width, width)), ("c_proj", (width, 4 * width))):
            if gmp:
                s[f"{b}mlp.{name}.r"] = ((o, 1), dtype)
                s[f"{b}mlp.{name}.theta"] = ((o, i_), dtype)
            else:
                s[f"{b}mlp.{name}.weight"] = ((o, i_), dtype)
            s[f"{b}mlp.{name}.bias"] = ((o,), dtype)
        s[f"{b}ln_2.weight"] = ((width,), dtype)
        s[f"{b}ln_2.bias"] = ((width,), dtype)
    s["token_embedding.weight"] = ((vocab, width), emb_dtype)
    s["ln_final.weight"] = ((width,), dtype)
    s["ln_final.bias"] = ((width,), dtype)
    return s


def openai_visual_spec(width: int = 1024, layers: int = 24, *, out: int = 768, dtype: str = "F16") -> Spec:
    """OpenAI ViT-L/14 image tower: its ``visual.transformer.resblocks`` outnumber the text tower's."""
    s: Spec = {
        "visual.class_embedding": ((width,), dtype),
        "visual.positional_embedding": ((257, width), dtype),
        "visual.proj": ((width, out), dtype),
        "visual.conv1.weight": ((width, 3, 14, 14), dtype),
        "visual.ln_pre.weight": ((width,), dtype),
        "visual.ln_pre.bias": ((width,), dtype),
        "visual.ln_post.weight": ((width,), dtype),
        "visual.ln_post.bias": ((width,), dtype),
    }
    for i in range(layers):
        b = f"visual.transformer.resblocks.{i}."
        s[f"{b}attn.in_proj_weight"] = ((3 * width, width), dtype)
        s[f"{b}attn.in_proj_bias"] = ((3 * width,), dtype)
        s[f"{b}ln_1.weight"] = ((width,), dtype)
        s[f"{b}mlp.c_fc.weight"] = ((4 * width, width), dtype)
    return s


def hf_vision_spec(width: int = 1024, layers: int = 24, *, out: int = 768, dtype: str = "F16") -> Spec:
    """HF ``CLIPModel`` extras: ``vision_model.encoder.layers.N`` (more layers than the text tower)."""
    s: Spec = {
        "vision_model.embeddings.class_embedding": ((width,), dtype),
        "vision_model.embeddings.patch_embedding.weight": ((width, 3, 14, 14), dtype),
        "vision_model.embeddings.position_embedding.weight": ((257, width), dtype),
        "vision_model.pre_layrnorm.weight": ((width,), dtype),
        "vision_model.post_layernorm.weight": ((width,), dtype),
        "visual_projection.weight": ((out, width), dtype),
        "logit_scale": ((), "F32"),
    }
    for i in range(layers):
        b = f"vision_model.encoder.layers.{i}."
        s[f"{b}self_attn.q_proj.weight"] = ((width, width), dtype)
        s[f"{b}layer_norm1.weight"] = ((width,), dtype)
        s[f"{b}mlp.fc1.weight"] = ((4 * width, width), dtype)
    return s


def t5_spec(
    d_model: int,
    d_ff: int,
    layers: int,
    heads: int,
    *,
    vocab: int = T5_VOCAB,
    umt5: bool = False,
    dtype: str = "BF16",
    linear_dtype: str | None = None,
    emb_dtype: str | None = None,
    shared: bool = True,
    embed_tokens: bool = False,
) -> Spec:
    """HF ``T5EncoderModel`` / ``UMT5EncoderModel`` keys (v1.1 gated FFN, relative bias in block 0 / every block)."""
    lin = linear_dtype or dtype
    emb = emb_dtype or dtype
    inner = d_model  # d_kv * heads == d_model for every v1.1 size
    s: Spec = {}
    if shared:
        s["shared.weight"] = ((vocab, d_model), emb)
    if embed_tokens:
        s["encoder.embed_tokens.weight"] = ((vocab, d_model), emb)
    for i in range(layers):
        b = f"encoder.block.{i}.layer."
        for n in "qkv":
            s[f"{b}0.SelfAttention.{n}.weight"] = ((inner, d_model), lin)
        s[f"{b}0.SelfAttention.o.weight"] = ((d_model, inner), lin)
        if i == 0 or umt5:
            s[f"{b}0.SelfAttention.relative_attention_bias.weight"] = ((32, heads), dtype)
        s[f"{b}0.layer_norm.weight"] = ((d_model,), dtype)
        s[f"{b}1.DenseReluDense.wi_0.weight"] = ((d_ff, d_model), lin)
        s[f"{b}1.DenseReluDense.wi_1.weight"] = ((d_ff, d_model), lin)
        s[f"{b}1.DenseReluDense.wo.weight"] = ((d_model, d_ff), lin)
        s[f"{b}1.layer_norm.weight"] = ((d_model,), dtype)
    s["encoder.final_layer_norm.weight"] = ((d_model,), dtype)
    return s


def t5_decoder_spec(
    d_model: int, d_ff: int, layers: int, heads: int, *, vocab: int = T5_VOCAB, dtype: str = "BF16"
) -> Spec:
    """The seq2seq half an encoder loader must never need: ``decoder.*`` and ``lm_head``."""
    s: Spec = {}
    for i in range(layers):
        b = f"decoder.block.{i}.layer."
        for n in "qkvo":
            s[f"{b}0.SelfAttention.{n}.weight"] = ((d_model, d_model), dtype)
            s[f"{b}1.EncDecAttention.{n}.weight"] = ((d_model, d_model), dtype)
        if i == 0:
            s[f"{b}0.SelfAttention.relative_attention_bias.weight"] = ((32, heads), dtype)
        s[f"{b}0.layer_norm.weight"] = ((d_model,), dtype)
        s[f"{b}1.layer_norm.weight"] = ((d_model,), dtype)
        s[f"{b}2.DenseReluDense.wi_0.weight"] = ((d_ff, d_model), dtype)
        s[f"{b}2.DenseReluDense.wi_1.weight"] = ((d_ff, d_model), dtype)
        s[f"{b}2.DenseReluDense.wo.weight"] = ((d_model, d_ff), dtype)
        s[f"{b}2.layer_norm.weight"] = ((d_model,), dtype)
    s["decoder.final_layer_norm.weight"] = ((d_model,), dtype)
    s["lm_head.weight"] = ((vocab, d_model), dtype)
    return s


def unet_spec(prefix: str = "model.diffusion_model.", dtype: str = "F16") -> Spec:
    """A few ldm UNet keys, cross-attention context 768 (SD1)."""
    return {
        f"{prefix}input_blocks.0.0.weight": ((320, 4, 3, 3), dtype),
        f"{prefix}input_blocks.0.0.bias": ((320,), dtype),
        f"{prefix}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": ((320, 768), dtype),
        f"{prefix}input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight": ((320, 768), dtype),
        f"{prefix}middle_block.1.proj_in.weight": ((1280, 1280, 1, 1), dtype),
        f"{prefix}out.2.weight": ((4, 320, 3, 3), dtype),
        f"{prefix}time_embed.0.weight": ((1280, 320), dtype),
    }


def diffusers_unet_spec(dtype: str = "F16") -> Spec:
    return {
        "conv_in.weight": ((320, 4, 3, 3), dtype),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": ((320, 768), dtype),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": ((320, 320), dtype),
        "mid_block.resnets.0.conv1.weight": ((1280, 1280, 3, 3), dtype),
        "time_embedding.linear_1.weight": ((1280, 320), dtype),
        "conv_out.weight": ((4, 320, 3, 3), dtype),
    }


def vae_spec(prefix: str = "", dtype: str = "F32") -> Spec:
    """ldm VAE keys: ``encoder.down.N.block.M`` looks a little like T5's ``encoder.block.N``."""
    return {
        f"{prefix}encoder.conv_in.weight": ((128, 3, 3, 3), dtype),
        f"{prefix}encoder.down.0.block.0.norm1.weight": ((128,), dtype),
        f"{prefix}encoder.down.0.block.0.conv1.weight": ((128, 128, 3, 3), dtype),
        f"{prefix}encoder.mid.attn_1.q.weight": ((512, 512, 1, 1), dtype),
        f"{prefix}encoder.norm_out.weight": ((512,), dtype),
        f"{prefix}decoder.conv_out.weight": ((3, 128, 3, 3), dtype),
        f"{prefix}decoder.up.0.block.0.conv1.weight": ((128, 128, 3, 3), dtype),
        f"{prefix}quant_conv.weight": ((8, 8, 1, 1), dtype),
        f"{prefix}post_quant_conv.weight": ((4, 4, 1, 1), dtype),
    }


def lora_kohya_spec(rank: int = 8, width: int = 768, dtype: str = "F16") -> Spec:
    s: Spec = {}
    for i in range(12):
        b = f"lora_te_text_model_encoder_layers_{i}_self_attn_q_proj"
        s[f"{b}.lora_down.weight"] = ((rank, width), dtype)
        s[f"{b}.lora_up.weight"] = ((width, rank), dtype)
        s[f"{b}.alpha"] = ((), dtype)
    u = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    s[f"{u}.lora_down.weight"] = ((rank, 768), dtype)
    s[f"{u}.lora_up.weight"] = ((320, rank), dtype)
    s[f"{u}.alpha"] = ((), dtype)
    return s


def lora_peft_spec(rank: int = 4, width: int = 768, dtype: str = "F16") -> Spec:
    """diffusers/peft LoRA: contains ``text_model.encoder.layers.N`` inside its names."""
    s: Spec = {}
    for i in range(12):
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            b = f"text_encoder.text_model.encoder.layers.{i}.self_attn.{n}"
            s[f"{b}.lora_A.weight"] = ((rank, width), dtype)
            s[f"{b}.lora_B.weight"] = ((width, rank), dtype)
    s["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"] = ((rank, 768), dtype)
    s["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_B.weight"] = ((320, rank), dtype)
    return s


# ---------------------------------------------------------------------------------------------
# writers


def write_sparse_safetensors(
    path: str | os.PathLike[str], spec: Spec, metadata: Mapping[str, str] | None = None
) -> Path:
    """A valid safetensors file with the spec's real shapes; the data section is a sparse run of zeros."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, (shape, dtype) in spec.items():
        nbytes = numel(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = _pad_header(json.dumps(header, separators=(",", ":")).encode())
    path = Path(path)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)
    return path


def _pad_header(raw: bytes) -> bytes:
    """Pad to 8 bytes like the safetensors library, but never to a length whose low byte is 0x80.

    Such a file starts with b'\\x80' like a pickle; the reader's handling of that is pinned by its own
    test in test_readers.py, so the other fixtures stay clear of it and fail only for their own reasons.
    """
    raw += b" " * (-len(raw) % 8)
    if len(raw) & 0xFF == 0x80:
        raw += b" " * 8
    return raw


def write_sparse_gguf(
    path: str | os.PathLike[str], spec: Mapping[str, tuple[tuple[int, ...], str]], arch: str = "t5encoder"
) -> Path:
    """A valid GGUF file (llama.cpp names, torch-order shapes, ggml type names) whose data is a sparse hole."""
    import gguf
    import numpy as np

    path = Path(path)
    writer = gguf.GGUFWriter(os.fspath(path), arch)
    total = 0
    for name, (shape, qtype) in spec.items():
        qt = gguf.GGMLQuantizationType[qtype]
        block, size = gguf.GGML_QUANT_SIZES[qt]
        nbytes = numel(shape) // block * size
        writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qt)
        total += gguf.GGUFWriter.ggml_pad(nbytes, writer.data_alignment)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]
    writer.write_padding(fout, fout.tell())
    start = fout.tell()
    writer.close()
    with open(path, "r+b") as f:
        f.truncate(start + total)
    return path


def gguf_t5_spec(
    d_model: int, d_ff: int, layers: int, heads: int, *, vocab: int = T5_VOCAB, umt5: bool = False, qtype: str = "Q8_0"
) -> dict[str, tuple[tuple[int, ...], str]]:
    """city96-style T5 encoder GGUF: block-quantised matrices, F16 relative bias, F32 norms."""
    out = {}
    for name, (shape, _) in hf_t5_to_gguf_names(t5_spec(d_model, d_ff, layers, heads, vocab=vocab, umt5=umt5)).items():
        if len(shape) == 1:
            out[name] = (shape, "F32")
        elif "attn_rel_b" in name:
            out[name] = (shape, "F16")
        else:
            out[name] = (shape, qtype)
    return out


def expanded_tensors(spec: Spec) -> dict[str, torch.Tensor]:
    """Real-shape tensors backed by one element each (stride 0): tiny pickles with real headers."""
    return {
        name: torch.zeros(1, dtype=DTYPES[dt]).reshape([1] * len(shape)).expand(shape)
        for name, (shape, dt) in spec.items()
    }


def save_pickle(path: str | os.PathLike[str], obj: Any, *, legacy: bool = False) -> Path:
    """``torch.save``: zip container by default, the pre-1.6 format with ``legacy``."""
    path = Path(path)
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def save_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    save_file(
        {k: v.detach().contiguous().clone() for k, v in tensors.items()},
        str(path),
        metadata=dict(metadata) if metadata else None,
    )
    blob = path.read_bytes()
    n = header_len(blob)
    if n & 0xFF == 0x80:  # see _pad_header; offsets are relative to the data start, so only the header moves
        raw = _pad_header(blob[8 : 8 + n])
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n :])
    return path


def write_sharded(
    folder: str | os.PathLike[str],
    shards: list[Mapping[str, Any]],
    *,
    fmt: str = "safetensors",
    sparse: bool = False,
) -> Path:
    """An HF sharded checkpoint: ``model-0000N-of-0000M.safetensors`` (or ``pytorch_model-*.bin``) + index.

    ``shards`` holds one mapping per shard: tensors, or a ``Spec`` when ``sparse``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    total = len(shards)
    weight_map: dict[str, str] = {}
    size = 0
    for n, content in enumerate(shards, 1):
        if fmt == "safetensors":
            name = f"model-{n:05d}-of-{total:05d}.safetensors"
            if sparse:
                write_sparse_safetensors(folder / name, content)  # type: ignore[arg-type]
            else:
                save_safetensors(folder / name, content)
        else:
            name = f"pytorch_model-{n:05d}-of-{total:05d}.bin"
            tensors = expanded_tensors(content) if sparse else dict(content)  # type: ignore[arg-type]
            save_pickle(folder / name, tensors)
        size += os.path.getsize(folder / name)
        weight_map.update(dict.fromkeys(content, name))
    index_name = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (folder / index_name).write_text(json.dumps(index, indent=2))
    return folder / index_name


# ---------------------------------------------------------------------------------------------
# state dicts with real values, written from the reference modules' own state dicts


def openclip_state(ref: torch.nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The reference module's own state dict: exactly OpenCLIP/OpenAI key names."""
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    return {k: v.to(dtype) for k, v in sd.items()} if dtype else sd


def hf_clip_state(
    model: torch.nn.Module,
    *,
    flat: bool = False,
    position_ids: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """HF key names: ``text_model.*`` (+ ``text_projection.weight``), or without ``text_model.`` if ``flat``."""
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if k.endswith("position_ids"):
            continue
        if not k.startswith(("text_model.", "text_projection.")):
            k = "text_model." + k  # transformers >= 5.6 CLIPTextModel has no text_model level
        if flat:
            k = k.removeprefix("text_model.")
        out[k] = v.detach().clone().to(dtype) if dtype else v.detach().clone()
    if position_ids is not None:
        out[("" if flat else "text_model.") + "embeddings.position_ids"] = position_ids
    return out


def t5_state(
    model: torch.nn.Module, *, shared: bool = True, embed_tokens: bool = False, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    emb = sd.pop("encoder.embed_tokens.weight", None)
    if emb is None:
        emb = sd["shared.weight"]
    if not shared:
        del sd["shared.weight"]
    if embed_tokens:
        sd["encoder.embed_tokens.weight"] = emb.clone()
    return {k: v.to(dtype) for k, v in sd.items()} if dtype else sd


def scaled_fp8_state(
    sd: Mapping[str, torch.Tensor], fp8: str = "F8_E4M3", *, input_scale: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Comfy-Org ``*_fp8_scaled`` layout: fp8 Linear weights + fp32 ``scale_weight`` scalars + ``scaled_fp8`` marker.

    Returns (stored tensors, the dense fp32 values a reader must reconstruct = fp8.float() * scale).
    Only 2-D attention/FFN weights are scaled (as Comfy does); norms, embeddings and biases stay as they are.
    """
    dt = DTYPES[fp8]
    stored: dict[str, torch.Tensor] = {"scaled_fp8": torch.empty(0, dtype=dt)}
    dense: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if v.dim() == 2 and (".SelfAttention." in k or ".DenseReluDense." in k) and "relative_attention" not in k:
            scale = (v.float().abs().max() / FP8_MAX[fp8]).reshape(())
            q = (v.float() / scale).to(dt)
            stored[k] = q
            stored[k.removesuffix(".weight") + ".scale_weight"] = scale.clone()
            if input_scale:
                stored[k.removesuffix(".weight") + ".scale_input"] = torch.tensor(1.0)
            dense[k] = q.float() * scale
        else:
            stored[k] = v.clone()
            dense[k] = v.float()
    return stored, dense


def hf_t5_to_gguf_names(sd: Mapping[str, Any]) -> dict[str, Any]:
    """HF T5 encoder names -> llama.cpp names, as gguf-py's own tensor map spells them."""
    import gguf

    blocks = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.block."))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, blocks)
    out = {}
    for k, v in sd.items():
        base, _, suffix = k.rpartition(".")
        new = names.get_name(base)
        if new is None:
            raise KeyError(k)
        out[f"{new}.{suffix}"] = v
    return out


# ---------------------------------------------------------------------------------------------
# non-encoders and hostile/broken inputs


def textual_inversion_pt(path: str | os.PathLike[str], vectors: int = 2, width: int = 768) -> Path:
    """A1111 embedding .pt: ``string_to_param`` with one ``*`` tensor, plus bookkeeping."""
    obj = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": torch.randn(vectors, width)},
        "name": "my-style",
        "step": 3000,
        "sd_checkpoint": "abcdef12",
        "sd_checkpoint_name": "v1-5-pruned",
    }
    return save_pickle(path, obj)


def ti_sdxl_spec(vectors: int = 2) -> Spec:
    """SDXL textual inversion safetensors: keys named like the towers themselves."""
    return {"clip_l": ((vectors, 768), "F32"), "clip_g": ((vectors, 1280), "F32")}


class Hostile:
    """Unpickling this creates ``marker`` (stands in for arbitrary code execution)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., Any], tuple[Any, ...]]:
        return (open, (self.marker, "w"))


def hostile_pickle(
    path: str | os.PathLike[str], marker: str | os.PathLike[str], *, legacy: bool = False, wrapped: bool = True
) -> Path:
    """A checkpoint that looks ordinary (real tensors) but runs code when unpickled without weights_only."""
    payload = Hostile(os.fspath(marker))
    obj: Any = (
        {"state_dict": {"text_model.final_layer_norm.weight": torch.ones(4)}, "hook": payload} if wrapped else payload
    )
    return save_pickle(path, obj, legacy=legacy)


def safetensors_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()})


def raw_safetensors(header: Mapping[str, Any] | bytes, data: bytes = b"", *, claimed_len: int | None = None) -> bytes:
    """Hand-built safetensors bytes (for malformed headers)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if claimed_len is None else claimed_len
    return struct.pack("<Q", n) + raw + data


def header_len(blob: bytes) -> int:
    return struct.unpack("<Q", blob[:8])[0]


# ---------------------------------------------------------------------------------------------
# the detection catalogue: real-shape files with what detect() must say about them


@dataclass
class Expect:
    """What ``detect`` must report for one tower (``None`` fields are not checked)."""

    kind: str
    tower: str | None = None
    layout: str | None = None
    prefix: str | None = None
    layers: int | None = None
    width: int | None = None
    positions: int | None = None
    vocab: int | None = None
    dtypes: tuple[str, ...] | None = None
    # the canonical tower's weight count; ``params_alt`` lists other counts the contract leaves open
    # (e.g. whether ``position_ids``, ``positional_embedding_res`` or GmP radii are counted)
    params: int | None = None
    params_alt: tuple[int, ...] = ()
    dtypes_extra: tuple[str, ...] = ()  # dtypes that may additionally appear (position_ids, scale scalars)
    quant: str | None = None
    check_quant: bool = True
    features: frozenset[str] = frozenset()
    no_features: frozenset[str] = frozenset()


@dataclass
class Case:
    name: str
    filename: str
    make: Callable[[Path], Path]  # folder -> the path to pass to open_file
    towers: list[Expect] = field(default_factory=list)
    fmt: str = "safetensors"


def _clip_expect(
    dims: tuple[int, int, int],
    kind: str,
    *,
    positions: int = 77,
    proj: int | None = None,
    dtypes: tuple[str, ...] = ("F16",),
    **kw: Any,
) -> Expect:
    width, layers, _ = dims
    params = spec_params(canonical_clip_spec(width, layers, positions=positions, proj=proj))
    return Expect(
        kind=kind,
        layers=layers,
        width=width,
        positions=positions,
        vocab=CLIP_VOCAB,
        dtypes=dtypes,
        params=params,
        quant=None,
        **kw,
    )


def _t5_expect(
    dims: tuple[int, int, int, int],
    kind: str,
    *,
    vocab: int = T5_VOCAB,
    umt5: bool = False,
    dtypes: tuple[str, ...] = ("BF16",),
    quant: str | None = None,
    **kw: Any,
) -> Expect:
    d, ff, layers, heads = dims
    params = spec_params(t5_spec(d, ff, layers, heads, vocab=vocab, umt5=umt5))
    return Expect(
        kind=kind, layers=layers, width=d, positions=None, vocab=vocab, dtypes=dtypes, params=params, quant=quant, **kw
    )


def _sparse(
    spec_fn: Callable[[], Spec], filename: str, metadata: Mapping[str, str] | None = None
) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        return write_sparse_safetensors(folder / filename, spec_fn(), metadata)

    return make


def _pickled(
    spec_fn: Callable[[], Spec], filename: str, *, legacy: bool = False, wrap: str | None = None
) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        tensors: Any = expanded_tensors(spec_fn())
        if wrap:
            tensors = {wrap: tensors, "epoch": 3, "global_step": 1200}
        return save_pickle(folder / filename, tensors, legacy=legacy)

    return make


def _sharded(enc: Callable[[], Spec], dec: Callable[[], Spec], fmt: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        return write_sharded(folder / "flan-t5-xxl", [enc(), dec()], fmt=fmt, sparse=True).parent

    return make


def catalogue() -> list[Case]:
    """Every real-shape file kind with the towers detect() must find in it."""
    L, H, G, B = CLIP_L, CLIP_H, CLIP_G, CLIP_B
    cases: list[Case] = []
    add = cases.append

    def hf(dims: tuple[int, int, int], **kw: Any) -> Callable[[], Spec]:
        return lambda: hf_clip_spec(dims[0], dims[1], **kw)

    def oc(dims: tuple[int, int, int], **kw: Any) -> Callable[[], Spec]:
        return lambda: openclip_spec(dims[0], dims[1], **kw)

    # --- bare CLIP files
    add(
        Case(
            "hf-clip-l",
            "model.safetensors",
            _sparse(hf(L), "model.safetensors"),
            [_clip_expect(L, "clip-l", layout="hf", prefix="", no_features=frozenset({"projection", "long-clip-res"}))],
        )
    )
    add(
        Case(
            "hf-clip-l-proj-mixed",
            "ViT-L-14-GmP-TE-only-HF.safetensors",
            _sparse(hf(L, proj=768, emb_dtype="F32", norm_dtype="F32"), "te.safetensors"),
            [
                _clip_expect(
                    L,
                    "clip-l",
                    proj=768,
                    dtypes=("F16", "F32"),
                    layout="hf",
                    prefix="",
                    features=frozenset({"projection"}),
                )
            ],
        )
    )
    add(
        Case(
            "hf-clip-l-position-ids",
            "te.safetensors",
            _sparse(hf(L, position_ids="I64"), "te.safetensors"),
            [
                _clip_expect(
                    L,
                    "clip-l",
                    layout="hf",
                    prefix="",
                    dtypes_extra=("I64",),
                    params_alt=(spec_params(hf_clip_spec(768, 12, position_ids="I64")),),
                    features=frozenset({"position-ids"}),
                )
            ],
        )
    )
    add(
        Case(
            "hf-flat-clip-l",
            "te.safetensors",
            _sparse(hf(L, flat=True), "te.safetensors"),
            [_clip_expect(L, "clip-l", layout="hf-flat", prefix="")],
        )
    )
    add(
        Case(
            "hf-clipmodel-full",
            "model.safetensors",
            _sparse(lambda: {**hf_clip_spec(768, 12, proj=768), **hf_vision_spec()}, "model.safetensors"),
            [
                _clip_expect(
                    L, "clip-l", proj=768, layout="hf", prefix="", features=frozenset({"projection", "vision-tower"})
                )
            ],
        )
    )
    add(
        Case(
            "openai-clip-l",
            "ViT-L-14.safetensors",
            _sparse(
                lambda: {**openclip_spec(768, 12, proj=768, logit_scale=True), **openai_visual_spec()},
                "ViT-L-14.safetensors",
            ),
            [
                _clip_expect(
                    L,
                    "clip-l",
                    proj=768,
                    layout="openclip",
                    prefix="",
                    features=frozenset({"projection", "vision-tower"}),
                )
            ],
        )
    )
    add(
        Case(
            "openai-clip-l-pt",
            "ViT-L-14.pt",
            _pickled(
                lambda: {**openclip_spec(768, 12, proj=768, logit_scale=True), **openai_visual_spec()}, "ViT-L-14.pt"
            ),
            [
                _clip_expect(
                    L,
                    "clip-l",
                    proj=768,
                    layout="openclip",
                    prefix="",
                    features=frozenset({"projection", "vision-tower"}),
                )
            ],
            fmt="pickle",
        )
    )
    long_res_extra = 248 * 768
    add(
        Case(
            "longclip-original-pt",
            "longclip-L.pt",
            _pickled(
                lambda: {
                    **openclip_spec(768, 12, context=248, proj=768, long_res=True, logit_scale=True),
                    **openai_visual_spec(),
                },
                "longclip-L.pt",
                legacy=True,
            ),
            [
                _clip_expect(
                    L,
                    "long-clip-l",
                    positions=248,
                    proj=768,
                    layout="openclip",
                    prefix="",
                    params_alt=(spec_params(canonical_clip_spec(768, 12, positions=248, proj=768)) + long_res_extra,),
                    features=frozenset({"long-clip-res", "vision-tower", "projection"}),
                )
            ],
            fmt="pickle",
        )
    )
    add(
        Case(
            "longclip-original-safetensors",
            "Long-ViT-L-14-BEST-GmP-smooth-ft.safetensors",
            _sparse(
                lambda: {
                    **openclip_spec(768, 12, context=248, proj=768, long_res=True, emb_dtype="F32", logit_scale=True),
                    **openai_visual_spec(),
                },
                "long.safetensors",
            ),
            [
                _clip_expect(
                    L,
                    "long-clip-l",
                    positions=248,
                    proj=768,
                    layout="openclip",
                    prefix="",
                    dtypes=("F16", "F32"),
                    params_alt=(spec_params(canonical_clip_spec(768, 12, positions=248, proj=768)) + long_res_extra,),
                    features=frozenset({"long-clip-res"}),
                )
            ],
        )
    )
    add(
        Case(
            "hf-longclip",
            "model.safetensors",
            _sparse(hf(L, positions=248, proj=768), "model.safetensors"),
            [
                _clip_expect(
                    L,
                    "long-clip-l",
                    positions=248,
                    proj=768,
                    layout="hf",
                    prefix="",
                    no_features=frozenset({"long-clip-res"}),
                )
            ],
        )
    )
    gmp_radii = 12 * (3072 + 768)
    add(
        Case(
            "gmp-checkpoint-pt",
            "clip_ft_10_dict_as-gmp.pt",
            _pickled(lambda: openclip_spec(768, 12, proj=768, gmp=True, dtype="F32"), "ft.pt", wrap="state_dict"),
            [
                _clip_expect(
                    L,
                    "clip-l",
                    proj=768,
                    layout="openclip",
                    prefix="",
                    dtypes=("F32",),
                    params_alt=(spec_params(canonical_clip_spec(768, 12, proj=768)) + gmp_radii,),
                    features=frozenset({"gmp"}),
                )
            ],
            fmt="pickle",
        )
    )
    add(
        Case(
            "hf-clip-g",
            "clip_g.safetensors",
            _sparse(hf(G, proj=1280), "clip_g.safetensors"),
            [_clip_expect(G, "clip-g", proj=1280, layout="hf", prefix="")],
        )
    )
    add(
        Case(
            "openclip-bigg-bin",
            "open_clip_pytorch_model.bin",
            _pickled(lambda: openclip_spec(1280, 32, proj=1280, logit_scale=True), "open_clip_pytorch_model.bin"),
            [_clip_expect(G, "clip-g", proj=1280, layout="openclip", prefix="")],
            fmt="pickle",
        )
    )
    add(
        Case(
            "openclip-h",
            "open_clip_h.safetensors",
            _sparse(oc(H, proj=1024), "h.safetensors"),
            [_clip_expect(H, "clip-h", proj=1024, layout="openclip", prefix="")],
        )
    )
    add(
        Case(
            "hf-clip-h",
            "te.safetensors",
            _sparse(hf(H, proj=1024), "te.safetensors"),
            [_clip_expect(H, "clip-h", proj=1024, layout="hf", prefix="")],
        )
    )

    # --- whole checkpoints and bundles
    def sd1() -> Spec:
        return {
            **prefixed(hf_clip_spec(768, 12, position_ids="I64"), "cond_stage_model.transformer."),
            **unet_spec(),
            **vae_spec("first_stage_model."),
        }

    sd1_ids = spec_params(hf_clip_spec(768, 12, position_ids="I64"))
    add(
        Case(
            "sd1-checkpoint",
            "v1-5-pruned-emaonly.safetensors",
            _sparse(sd1, "v1-5.safetensors"),
            [
                _clip_expect(
                    L,
                    "clip-l",
                    tower="clip_l",
                    layout="hf",
                    prefix="cond_stage_model.transformer.",
                    dtypes_extra=("I64",),
                    params_alt=(sd1_ids,),
                )
            ],
        )
    )
    add(
        Case(
            "sd1-checkpoint-ckpt",
            "v1-5-pruned.ckpt",
            _pickled(sd1, "v1-5.ckpt", wrap="state_dict"),
            [
                _clip_expect(
                    L,
                    "clip-l",
                    tower="clip_l",
                    layout="hf",
                    prefix="cond_stage_model.transformer.",
                    dtypes_extra=("I64",),
                    params_alt=(sd1_ids,),
                )
            ],
            fmt="pickle",
        )
    )

    def sd1_old() -> Spec:
        # pre-transformers-4.x SD1: cond_stage_model.transformer.embeddings.* (no text_model.), float position_ids
        return {
            **prefixed(hf_clip_spec(768, 12, flat=True, position_ids="F32"), "cond_stage_model.transformer."),
            **unet_spec(),
            **vae_spec("first_stage_model."),
        }

    add(
        Case(
            "sd1-old-layout",
            "sd-v1-4.safetensors",
            _sparse(sd1_old, "sd14.safetensors"),
            [
                _clip_expect(
                    L,
                    "clip-l",
                    tower="clip_l",
                    prefix="cond_stage_model.transformer.",
                    dtypes_extra=("F32",),
                    params_alt=(spec_params(hf_clip_spec(768, 12, position_ids="F32")),),
                )
            ],
        )
    )

    def sd2() -> Spec:
        return {
            **prefixed(openclip_spec(1024, 24, proj=1024, logit_scale=True), "cond_stage_model.model."),
            **unet_spec(),
            **vae_spec("first_stage_model."),
        }

    add(
        Case(
            "sd2-checkpoint",
            "v2-1_768-ema-pruned.safetensors",
            _sparse(sd2, "sd2.safetensors"),
            [_clip_expect(H, "clip-h", proj=1024, tower="clip_h", layout="openclip", prefix="cond_stage_model.model.")],
        )
    )

    def sdxl() -> Spec:
        return {
            **prefixed(hf_clip_spec(768, 12, position_ids="I64"), "conditioner.embedders.0.transformer."),
            **prefixed(openclip_spec(1280, 32, proj=1280, logit_scale=True), "conditioner.embedders.1.model."),
            **unet_spec(),
            **vae_spec("first_stage_model."),
        }

    add(
        Case(
            "sdxl-checkpoint",
            "sd_xl_base_1.0.safetensors",
            _sparse(sdxl, "sdxl.safetensors"),
            [
                _clip_expect(
                    L,
                    "clip-l",
                    tower="clip_l",
                    layout="hf",
                    prefix="conditioner.embedders.0.transformer.",
                    dtypes_extra=("I64",),
                    params_alt=(sd1_ids,),
                ),
                _clip_expect(
                    G, "clip-g", proj=1280, tower="clip_g", layout="openclip", prefix="conditioner.embedders.1.model."
                ),
            ],
        )
    )

    def refiner() -> Spec:
        return {
            **prefixed(openclip_spec(1280, 32, proj=1280, logit_scale=True), "conditioner.embedders.0.model."),
            **unet_spec(),
            **vae_spec("first_stage_model."),
        }

    add(
        Case(
            "sdxl-refiner",
            "sd_xl_refiner_1.0.safetensors",
            _sparse(refiner, "refiner.safetensors"),
            [
                _clip_expect(
                    G, "clip-g", proj=1280, tower="clip_g", layout="openclip", prefix="conditioner.embedders.0.model."
                )
            ],
        )
    )

    def sd3() -> Spec:
        return {
            **prefixed(hf_clip_spec(768, 12), "text_encoders.clip_l.transformer."),
            **prefixed(hf_clip_spec(1280, 32, proj=1280), "text_encoders.clip_g.transformer."),
            **prefixed(t5_spec(*T5_XXL, dtype="F16"), "text_encoders.t5xxl.transformer."),
            **unet_spec("model.diffusion_model."),
            **vae_spec("first_stage_model."),
        }

    add(
        Case(
            "sd3-bundle",
            "sd3_medium_incl_clips_t5xxlfp16.safetensors",
            _sparse(sd3, "sd3.safetensors"),
            [
                _clip_expect(L, "clip-l", tower="clip_l", layout="hf", prefix="text_encoders.clip_l.transformer."),
                _clip_expect(
                    G, "clip-g", proj=1280, tower="clip_g", layout="hf", prefix="text_encoders.clip_g.transformer."
                ),
                _t5_expect(
                    T5_XXL,
                    "t5-xxl",
                    tower="t5xxl",
                    layout="hf",
                    prefix="text_encoders.t5xxl.transformer.",
                    dtypes=("F16",),
                ),
            ],
        )
    )

    def flux() -> Spec:
        return {
            **prefixed(hf_clip_spec(768, 12), "text_encoders.clip_l.transformer."),
            **prefixed(t5_spec(*T5_XXL, dtype="BF16"), "text_encoders.t5xxl.transformer."),
            "model.diffusion_model.double_blocks.0.img_attn.qkv.weight": ((9216, 3072), "BF16"),
            **vae_spec("vae."),
        }

    add(
        Case(
            "flux-bundle",
            "flux1-dev-fp8-all-in-one.safetensors",
            _sparse(flux, "flux.safetensors"),
            [
                _clip_expect(L, "clip-l", tower="clip_l", layout="hf", prefix="text_encoders.clip_l.transformer."),
                _t5_expect(T5_XXL, "t5-xxl", tower="t5xxl", layout="hf", prefix="text_encoders.t5xxl.transformer."),
            ],
        )
    )

    # --- T5 family
    add(
        Case(
            "t5xxl-bf16",
            "t5xxl_bf16.safetensors",
            _sparse(lambda: t5_spec(*T5_XXL), "t5.safetensors"),
            [_t5_expect(T5_XXL, "t5-xxl", layout="hf", prefix="")],
        )
    )
    add(
        Case(
            "t5xxl-fp16-with-embed-tokens",
            "t5xxl_fp16.safetensors",
            _sparse(lambda: t5_spec(*T5_XXL, dtype="F16", embed_tokens=True), "t5.safetensors"),
            [
                _t5_expect(
                    T5_XXL,
                    "t5-xxl",
                    layout="hf",
                    prefix="",
                    dtypes=("F16",),
                    params_alt=(spec_params(t5_spec(*T5_XXL, embed_tokens=True)),),
                )
            ],
        )
    )
    add(
        Case(
            "t5xxl-embed-tokens-only",
            "t5xxl_fp32.safetensors",
            _sparse(lambda: t5_spec(*T5_XXL, dtype="F32", shared=False, embed_tokens=True), "t5.safetensors"),
            [_t5_expect(T5_XXL, "t5-xxl", layout="hf", prefix="", dtypes=("F32",))],
        )
    )
    for fp8, name in (("F8_E4M3", "e4m3fn"), ("F8_E5M2", "e5m2")):
        add(
            Case(
                f"t5xxl-fp8-{name}",
                f"t5xxl_fp8_{name}.safetensors",
                _sparse(
                    lambda fp8=fp8: t5_spec(*T5_XXL, dtype="F16", linear_dtype=fp8, emb_dtype=fp8), "t5.safetensors"
                ),
                [_t5_expect(T5_XXL, "t5-xxl", layout="hf", prefix="", dtypes=tuple(sorted(("F16", fp8))), quant="fp8")],
            )
        )

    def scaled(input_scale: bool) -> Spec:
        base = t5_spec(*T5_XXL, dtype="F16", linear_dtype="F8_E4M3")
        s: Spec = {"scaled_fp8": ((0,), "F8_E4M3")}
        for k, v in base.items():
            s[k] = v
            if v[1] == "F8_E4M3":
                s[k.removesuffix(".weight") + ".scale_weight"] = ((), "F32")
                if input_scale:
                    s[k.removesuffix(".weight") + ".scale_input"] = ((), "F32")
        return s

    scale_count = 24 * 7
    for input_scale in (False, True):
        add(
            Case(
                f"t5xxl-scaled-fp8{'-input' if input_scale else ''}",
                "t5xxl_fp8_e4m3fn_scaled.safetensors",
                _sparse(lambda i=input_scale: scaled(i), "t5.safetensors"),
                [
                    _t5_expect(
                        T5_XXL,
                        "t5-xxl",
                        layout="hf",
                        prefix="",
                        dtypes=("F16", "F8_E4M3"),
                        dtypes_extra=("F32",),
                        quant="scaled-fp8",
                        params_alt=tuple(spec_params(t5_spec(*T5_XXL)) + scale_count * n for n in (1, 2)),
                    )
                ],
            )
        )
    add(
        Case(
            "t5-xl",
            "t5xl.safetensors",
            _sparse(lambda: t5_spec(*T5_XL), "t5.safetensors"),
            [_t5_expect(T5_XL, "t5-xl", layout="hf", prefix="")],
        )
    )
    add(
        Case(
            "t5-base",
            "t5base.safetensors",
            _sparse(lambda: t5_spec(*T5_BASE, dtype="F32"), "t5.safetensors"),
            [_t5_expect(T5_BASE, "t5-base", layout="hf", prefix="", dtypes=("F32",))],
        )
    )
    add(
        Case(
            "umt5-xxl",
            "umt5_xxl_fp16.safetensors",
            _sparse(lambda: t5_spec(*T5_XXL, vocab=UMT5_VOCAB, umt5=True, dtype="F16"), "umt5.safetensors"),
            [_t5_expect(T5_XXL, "umt5-xxl", vocab=UMT5_VOCAB, umt5=True, layout="hf", prefix="", dtypes=("F16",))],
        )
    )
    for fmt in ("safetensors", "bin"):
        add(
            Case(
                f"t5xxl-sharded-{fmt}",
                "flan-t5-xxl",
                _sharded(lambda: t5_spec(*T5_XXL, dtype="F32"), lambda: t5_decoder_spec(*T5_XXL, dtype="F32"), fmt),
                [_t5_expect(T5_XXL, "t5-xxl", layout="hf", prefix="", dtypes=("F32",))],
                fmt="sharded",
            )
        )

    # --- GGUF (llama.cpp names; data is a sparse hole)
    add(
        Case(
            "t5xxl-gguf-q8_0",
            "t5-v1_1-xxl-encoder-Q8_0.gguf",
            lambda folder: write_sparse_gguf(folder / "t5.gguf", gguf_t5_spec(*T5_XXL)),
            [_t5_expect(T5_XXL, "t5-xxl", layout="llama.cpp", prefix="", dtypes=("F16", "F32", "Q8_0"), quant="gguf")],
            fmt="gguf",
        )
    )
    add(
        Case(
            "umt5-xxl-gguf-q4_k",
            "umt5-xxl-encoder-Q4_K_M.gguf",
            lambda folder: write_sparse_gguf(
                folder / "umt5.gguf", gguf_t5_spec(*T5_XXL, vocab=UMT5_VOCAB, umt5=True, qtype="Q4_K")
            ),
            [
                _t5_expect(
                    T5_XXL,
                    "umt5-xxl",
                    vocab=UMT5_VOCAB,
                    umt5=True,
                    layout="llama.cpp",
                    prefix="",
                    dtypes=("F16", "F32", "Q4_K"),
                    quant="gguf",
                )
            ],
            fmt="gguf",
        )
    )

    # --- not text encoders, and text encoders the product does not know
    nte = Expect(kind="not-a-text-encoder", tower=None, check_quant=False)
    add(Case("unet-only", "unet.safetensors", _sparse(lambda: unet_spec(), "u.safetensors"), [nte]))
    add(
        Case(
            "diffusers-unet",
            "diffusion_pytorch_model.safetensors",
            _sparse(diffusers_unet_spec, "u.safetensors"),
            [nte],
        )
    )
    add(Case("vae", "vae-ft-mse-840000-ema-pruned.safetensors", _sparse(lambda: vae_spec(), "v.safetensors"), [nte]))
    add(Case("lora-kohya", "lora.safetensors", _sparse(lora_kohya_spec, "l.safetensors"), [nte]))
    add(Case("lora-peft", "pytorch_lora_weights.safetensors", _sparse(lora_peft_spec, "l.safetensors"), [nte]))
    add(Case("ti-sdxl", "embedding.safetensors", _sparse(ti_sdxl_spec, "ti.safetensors"), [nte]))
    add(Case("ti-sd1-pt", "embedding.pt", lambda folder: textual_inversion_pt(folder / "emb.pt"), [nte], fmt="pickle"))
    # image encoders (IP-Adapter's CLIP-H vision is 32 x 1280, the shape of CLIP-G's text tower)
    add(
        Case(
            "clip-vision-hf",
            "model.safetensors",
            _sparse(
                lambda: {k: v for k, v in hf_vision_spec(1280, 32, out=1024).items() if k != "logit_scale"},
                "image_encoder.safetensors",
            ),
            [nte],
        )
    )
    add(
        Case(
            "clip-vision-openai",
            "ViT-bigG-visual.safetensors",
            _sparse(lambda: openai_visual_spec(1280, 32, out=1280), "visual.safetensors"),
            [nte],
        )
    )
    unk = Expect(kind="unknown", tower=None, check_quant=False)
    add(Case("clip-b", "clip_l.safetensors", _sparse(hf(B, proj=512), "b.safetensors"), [unk]))
    add(Case("t5-large", "t5xxl.safetensors", _sparse(lambda: t5_spec(*T5_LARGE), "t.safetensors"), [unk]))
    return cases


CATALOGUE = {c.name: c for c in catalogue()}
