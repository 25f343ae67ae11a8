"""Write small, valid GGUF files (tests, demos, bug reports) with the ``gguf`` package's writer.

Types the package can quantise (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, ...) are quantised
from the given values. For types it cannot (K-quants, IQ4_*), the blocks are random bytes with
finite float16 scale fields: meaningless as weights, but every bit pattern a decoder must handle.
:func:`write_gguf` returns what the file really holds, so a reader or decoder can be checked
against it exactly.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Mapping
from typing import Any, TypeVar

import numpy as np
import torch

# byte offsets of the float16 scale fields inside one block (ggml-common.h block_* structs)
HALF_FIELDS: dict[str, tuple[int, ...]] = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
    "IQ4_NL": (0,),
    "IQ4_XS": (0,),
}
FLOAT_TYPES = ("F32", "F16", "BF16")


def random_blocks(qtype: str, shape: tuple[int, ...], *, seed: int = 0) -> np.ndarray:
    """Random ``qtype`` blocks for a tensor of torch-order ``shape``: uint8 ``(*shape[:-1], bytes_per_row)``.

    The float16 scale fields are small finite normals (as real files have); every other byte is uniform.
    """
    import gguf

    ggml_type = gguf.GGMLQuantizationType[qtype]
    if qtype not in HALF_FIELDS:
        raise ValueError(f"no random-block layout for {qtype}")
    block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    if not shape or shape[-1] % block_size:
        raise ValueError(f"rows of shape {list(shape)} are not a whole number of {qtype} blocks ({block_size})")
    n_blocks = int(np.prod(shape)) // block_size
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for offset in HALF_FIELDS[qtype]:
        scale = (rng.standard_normal(n_blocks) * 0.02).astype(np.float16)
        data[:, offset : offset + 2] = scale.view(np.uint8).reshape(n_blocks, 2)
    return data.reshape(*shape[:-1], shape[-1] // block_size * type_size)


def _block_size(qtype: str) -> int:
    import gguf

    return 1 if qtype in FLOAT_TYPES else gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]


def _pick_type(name: str, tensor: torch.Tensor, qtypes: Mapping[str, str] | str) -> str:
    if isinstance(qtypes, str):
        # like llama.cpp's converters: vectors and rows that do not fit the blocks stay F32
        fits = tensor.ndim >= 2 and tensor.shape[-1] % _block_size(qtypes) == 0
        return qtypes if fits else "F32"
    qtype = qtypes.get(name, "F32")
    if qtype not in FLOAT_TYPES and (tensor.ndim < 1 or tensor.shape[-1] % _block_size(qtype)):
        raise ValueError(f"{name}: shape {list(tensor.shape)} cannot be stored as {qtype}")
    return qtype


def _encode(tensor: torch.Tensor, qtype: str, seed: int) -> tuple[np.ndarray, Any, torch.Tensor]:
    """(data for GGUFWriter.add_tensor, raw_dtype or None, the values the file will hold)."""
    import gguf

    t = tensor.detach().to("cpu")
    if qtype == "F32":
        data = t.to(torch.float32).contiguous().numpy().copy()
        return data, None, torch.from_numpy(data.copy())
    if qtype == "F16":
        data = t.to(torch.float16).contiguous().numpy().copy()
        return data, None, torch.from_numpy(data.copy())
    if qtype == "BF16":
        # torch rounds to nearest even like ggml; writing the bits directly keeps bf16 inputs exact
        values = t.to(torch.bfloat16).contiguous()
        data = values.view(torch.int16).numpy().view(np.uint8).copy()
        return data, gguf.GGMLQuantizationType.BF16, values.clone()
    ggml_type = gguf.GGMLQuantizationType[qtype]
    try:
        data = gguf.quants.quantize(t.to(torch.float32).contiguous().numpy(), ggml_type)
    except NotImplementedError:
        data = random_blocks(qtype, tuple(t.shape), seed=seed)
    values = torch.from_numpy(gguf.quants.dequantize(data, ggml_type).copy())
    return data, ggml_type, values


def _add_field(writer: Any, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        (writer.add_int32 if -(2**31) <= value < 2**31 else writer.add_int64)(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple, np.ndarray)):
        writer.add_array(key, list(np.asarray(value).tolist()) if isinstance(value, np.ndarray) else list(value))
    else:
        raise TypeError(f"GGUF field {key!r}: cannot store a {type(value).__name__}")


def write_gguf(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    qtypes: Mapping[str, str] | str = "F16",
    arch: str = "t5encoder",
    extra_fields: Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Write ``tensors`` (llama.cpp names, torch-order shapes) to a GGUF file at ``path``.

    ``qtypes`` is one type name for every tensor that can hold it (2-D or more, rows a whole number
    of blocks; the rest are written F32, as llama.cpp does with norms), or a per-name mapping
    (unnamed tensors are F32). ``extra_fields`` become GGUF key/values (bool, int -> INT32/INT64,
    float -> FLOAT32, str, lists -> arrays). Returns, per name, the values the file holds: F32/F16/BF16
    tensors as stored, block types as ``gguf.quants.dequantize`` reads them (float32).
    """
    import gguf

    writer = gguf.GGUFWriter(os.fspath(path), arch)
    for key, value in (extra_fields or {}).items():
        _add_field(writer, key, value)
    held: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        qtype = _pick_type(name, tensor, qtypes)
        data, raw_dtype, values = _encode(tensor, qtype, seed + zlib.crc32(name.encode()))
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
        held[name] = values
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return held


# ---------------------------------------------------------------------------------------------
# HF T5 encoder names -> llama.cpp names (gguf-py tensor_mapping, arch t5 / t5encoder)

HF_T5_TOP: dict[str, str] = {
    "shared.weight": "token_embd.weight",
    "encoder.final_layer_norm.weight": "enc.output_norm.weight",
}
# per block: encoder.block.{i}.<left>  ->  enc.blk.{i}.<right>
HF_T5_BLOCK: dict[str, str] = {
    "layer.0.SelfAttention.q.weight": "attn_q.weight",
    "layer.0.SelfAttention.k.weight": "attn_k.weight",
    "layer.0.SelfAttention.v.weight": "attn_v.weight",
    "layer.0.SelfAttention.o.weight": "attn_o.weight",
    "layer.0.SelfAttention.relative_attention_bias.weight": "attn_rel_b.weight",
    "layer.0.layer_norm.weight": "attn_norm.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn_gate.weight",
    "layer.1.DenseReluDense.wi_1.weight": "ffn_up.weight",
    "layer.1.DenseReluDense.wi.weight": "ffn_up.weight",  # T5 1.0: not gated
    "layer.1.DenseReluDense.wo.weight": "ffn_down.weight",
    "layer.1.layer_norm.weight": "ffn_norm.weight",
}
HF_T5_TIED_EMBEDDING = "encoder.embed_tokens.weight"  # transformers' tied copy of shared.weight
_HF_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")

V = TypeVar("V")


def hf_t5_to_llama_names(sd: Mapping[str, V]) -> dict[str, V]:
    """Rename an HF T5/UMT5 encoder state dict to llama.cpp GGUF names (values untouched)."""
    out: dict[str, V] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        if key == HF_T5_TIED_EMBEDDING:
            if "shared.weight" not in sd:
                out["token_embd.weight"] = value
            continue
        if key in HF_T5_TOP:
            out[HF_T5_TOP[key]] = value
        elif (m := _HF_BLOCK.match(key)) and m.group(2) in HF_T5_BLOCK:
            out[f"enc.blk.{m.group(1)}.{HF_T5_BLOCK[m.group(2)]}"] = value
        else:
            unknown.append(key)
    if unknown:
        more = f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise ValueError(f"not T5 encoder names: {', '.join(unknown[:3])}{more}")
    return out
