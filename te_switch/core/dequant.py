"""Pure-torch decoders for GGUF (ggml) block formats.

Every decoder has the signature ``fn(raw, shape, dtype) -> Tensor``: ``raw`` is a uint8 tensor whose
bytes are the ggml blocks in storage order (any leading shape, e.g. ``(rows, bytes_per_row)``),
``shape`` the logical torch-order shape and ``dtype`` the result's dtype. Decoding runs on whatever
device ``raw`` is on, with whole-tensor ops (no Python loop over blocks; on the CPU the blocks are
processed in cache-sized chunks, see :func:`dequantize`).

Values are computed in float32 with the same operations, in the same order, as the ggml / gguf-py
reference, then cast once to ``dtype``: a float32 result is bit-identical to
``gguf.quants.dequantize`` and a float16/bfloat16 result is that reference rounded once.

The layouts below follow ggml's ``block_*`` structs (ggml-common.h). Within a block, "nibbles"
means: the low nibbles of all packed bytes come first, then the high nibbles.

This module never imports ``gguf``; only :func:`numpy_fallback` does, when it is called.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping

import torch

Decoder = Callable[[torch.Tensor, torch.Size, torch.dtype], torch.Tensor]

QK_K = 256  # elements per K-quant super-block

# qtype -> (elements per block, bytes per block), as ggml's GGML_QUANT_SIZES
BLOCK_SIZES: dict[str, tuple[int, int]] = {
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q8_0": (32, 34),
    "Q2_K": (QK_K, 84),
    "Q3_K": (QK_K, 110),
    "Q4_K": (QK_K, 144),
    "Q5_K": (QK_K, 176),
    "Q6_K": (QK_K, 210),
    "IQ4_NL": (32, 18),
    "IQ4_XS": (QK_K, 136),
}

# elements decoded per step on the CPU (see dequantize)
CPU_CHUNK_ELEMENTS = 1 << 18

# the non-linear 4-bit codebook shared by IQ4_NL and IQ4_XS (ggml's kvalues_iq4nl)
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


# ---------------------------------------------------------------------------------------------
# helpers


def _blocks(raw: torch.Tensor, qtype: str, shape: torch.Size) -> torch.Tensor:
    """``raw`` as ``(n_blocks, bytes_per_block)`` after checking it holds exactly ``shape``."""
    if raw.dtype != torch.uint8:
        raise ValueError(f"{qtype} data must be uint8 bytes, got {raw.dtype}")
    block_size, type_size = BLOCK_SIZES[qtype]
    numel = 1
    for d in shape:
        numel *= d
    if raw.numel() % type_size or raw.numel() // type_size * block_size != numel:
        raise ValueError(f"{raw.numel()} bytes of {qtype} do not hold a tensor of shape {list(shape)}")
    return raw.reshape(-1, type_size)


def _split(blocks: torch.Tensor, *sizes: int) -> tuple[torch.Tensor, ...]:
    return torch.split(blocks, list(sizes), dim=-1)


def _half(field: torch.Tensor) -> torch.Tensor:
    """A 2-byte little-endian float16 field ``(n, 2)`` as float32 ``(n, 1)``."""
    return field.contiguous().view(torch.float16).to(torch.float32)


def _unpack(packed: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Split each byte of ``packed (n, k)`` into ``8 // bits`` fields, lowest bits first.

    The bytes are taken in groups of ``group`` consecutive bytes; field ``j`` of a group comes out
    as a run of ``group`` values, runs in order of ``j``. Result: ``(n, k // group, 8 // bits, group)``.
    """
    n, k = packed.shape
    grouped = packed.reshape(n, k // group, group)
    mask = (1 << bits) - 1
    # scalar shifts + stack: several times faster on the CPU than one broadcast tensor shift
    fields = [grouped & mask]
    fields += [(grouped >> shift) & mask for shift in range(bits, 8 - bits, bits)]
    fields.append(grouped >> (8 - bits))
    return torch.stack(fields, dim=2)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """``(n, k)`` bytes -> ``(n, 2k)`` 4-bit values: all low nibbles, then all high nibbles."""
    return _unpack(packed, 4, packed.shape[-1]).reshape(packed.shape[0], -1)


def _k_scales_mins(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes of packed 6-bit scales and mins -> two ``(n, 8)`` uint8 tensors.

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same for
    the mins; bytes 8-11 hold the low 4 bits of scales 4-7 (low nibble) and mins 4-7 (high nibble).
    """
    n = scales.shape[0]
    s = scales.reshape(n, 3, 4)
    sc_lo, mn_lo, mixed = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat((sc_lo & 0x3F, (mixed & 0x0F) | ((sc_lo >> 2) & 0x30)), dim=-1)
    mn = torch.cat((mn_lo & 0x3F, (mixed >> 4) | ((mn_lo >> 2) & 0x30)), dim=-1)
    return sc, mn


_IQ4_TABLES: dict[torch.device, torch.Tensor] = {}


def _iq4_lookup(codes: torch.Tensor) -> torch.Tensor:
    table = _IQ4_TABLES.get(codes.device)
    if table is None:
        table = _IQ4_TABLES[codes.device] = torch.tensor(IQ4_VALUES, dtype=torch.float32, device=codes.device)
    return table[codes.long()]


# ---------------------------------------------------------------------------------------------
# kernels: (n_blocks, bytes_per_block) uint8 -> (n_blocks, elements_per_block) float32


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    # block: f16 d, 16 bytes of nibbles; x = d * (q - 8)
    d, qs = _split(blocks, 2, 16)
    q = (_nibbles(qs).to(torch.int8) - 8).to(torch.float32)
    return q.mul_(_half(d))


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    # block: f16 d, f16 m, 16 bytes of nibbles; x = d * q + m
    d, m, qs = _split(blocks, 2, 2, 16)
    return _nibbles(qs).to(torch.float32).mul_(_half(d)).add_(_half(m))


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1's little-endian uint32 of high bits ``(n, 4)`` -> ``(n, 32)``, element i = bit i."""
    return _unpack(qh, 1, 1).reshape(qh.shape[0], 32)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    # block: f16 d, u32 of fifth bits, 16 bytes of nibbles; x = d * (q - 16)
    d, qh, qs = _split(blocks, 2, 4, 16)
    q = ((_nibbles(qs) | (_fifth_bits(qh) << 4)).to(torch.int8) - 16).to(torch.float32)
    return q.mul_(_half(d))


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    # block: f16 d, f16 m, u32 of fifth bits, 16 bytes of nibbles; x = d * q + m
    d, m, qh, qs = _split(blocks, 2, 2, 4, 16)
    q = (_nibbles(qs) | (_fifth_bits(qh) << 4)).to(torch.float32)
    return q.mul_(_half(d)).add_(_half(m))


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    # block: f16 d, 32 int8; x = q * d
    d, qs = _split(blocks, 2, 32)
    return qs.view(torch.int8).to(torch.float32).mul_(_half(d))


def _iq4_nl(blocks: torch.Tensor) -> torch.Tensor:
    # block: f16 d, 16 bytes of nibbles indexing the IQ4 codebook; x = d * value
    d, qs = _split(blocks, 2, 16)
    return _iq4_lookup(_nibbles(qs)).mul_(_half(d))


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    # super-block: 16 bytes of 4-bit (scale | min << 4), 64 bytes of 2-bit q, f16 d, f16 dmin;
    # 16 groups of 16: x = d * scale * q - dmin * min
    n = blocks.shape[0]
    scales, qs, d, dmin = _split(blocks, 16, 64, 2, 2)
    dl = (_half(d) * (scales & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (_half(dmin) * (scales >> 4).to(torch.float32)).reshape(n, 16, 1)
    q = _unpack(qs, 2, 32).reshape(n, 16, 16).to(torch.float32)
    return q.mul_(dl).sub_(ml).reshape(n, QK_K)


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    # super-block: 32 bytes of high-bit mask, 64 bytes of 2-bit low q, 12 bytes of 6-bit scales, f16 d;
    # 16 groups of 16: x = d * (scale - 32) * (low - (4 if the mask bit is clear else 0))
    n = blocks.shape[0]
    hmask, qs, scales, d = _split(blocks, 32, 64, 12, 2)
    # scale i: low 4 bits from nibble (i // 8) of byte i % 8, high 2 bits from crumb (i // 4) of byte 8 + i % 4
    low = _unpack(scales[:, :8], 4, 8).reshape(n, 16)
    high = _unpack(scales[:, 8:], 2, 4).reshape(n, 16)
    sc = (low | (high << 4)).to(torch.int8) - 32
    dl = (_half(d) * sc.to(torch.float32)).reshape(n, 16, 1)
    q_low = _unpack(qs, 2, 32).reshape(n, 16, 16)
    q_high = _unpack(hmask, 1, 32).reshape(n, 16, 16)
    q = (q_low.to(torch.int8) - ((q_high ^ 1) << 2).to(torch.int8)).to(torch.float32)
    return q.mul_(dl).reshape(n, QK_K)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # super-block: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles;
    # 8 groups of 32: x = d * scale * q - dmin * min
    n = blocks.shape[0]
    d, dmin, scales, qs = _split(blocks, 2, 2, 12, 128)
    sc, mn = _k_scales_mins(scales)
    dl = (_half(d) * sc.to(torch.float32)).reshape(n, 8, 1)
    ml = (_half(dmin) * mn.to(torch.float32)).reshape(n, 8, 1)
    q = _unpack(qs, 4, 32).reshape(n, 8, 32).to(torch.float32)
    return q.mul_(dl).sub_(ml).reshape(n, QK_K)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    # Q4_K plus 32 bytes of fifth bits (bit j of byte i is the high bit of element 32 * j + i)
    n = blocks.shape[0]
    d, dmin, scales, qh, qs = _split(blocks, 2, 2, 12, 32, 128)
    sc, mn = _k_scales_mins(scales)
    dl = (_half(d) * sc.to(torch.float32)).reshape(n, 8, 1)
    ml = (_half(dmin) * mn.to(torch.float32)).reshape(n, 8, 1)
    q_low = _unpack(qs, 4, 32).reshape(n, 8, 32)
    q_high = _unpack(qh, 1, 32).reshape(n, 8, 32)
    q = (q_low | (q_high << 4)).to(torch.float32)
    return q.mul_(dl).sub_(ml).reshape(n, QK_K)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # super-block: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, f16 d;
    # 16 groups of 16: x = d * scale * (q - 32)
    n = blocks.shape[0]
    ql, qh, scales, d = _split(blocks, 128, 64, 16, 2)
    dl = (_half(d) * scales.view(torch.int8).to(torch.float32)).reshape(n, 16, 1)
    # each 128-element half uses 64 bytes of ql (low nibbles first) and 32 bytes of qh (4 crumbs)
    q_low = _unpack(ql, 4, 64).reshape(n, 8, 32)
    q_high = _unpack(qh, 2, 32).reshape(n, 8, 32)
    q = ((q_low | (q_high << 4)).to(torch.int8) - 32).to(torch.float32)
    return q.reshape(n, 16, 16).mul_(dl).reshape(n, QK_K)


def _iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    # super-block: f16 d, u16 of 2-bit scale highs, 4 bytes of 4-bit scale lows, 128 bytes of nibbles
    # indexing the IQ4 codebook; 8 groups of 32: x = d * (scale - 32) * value
    n = blocks.shape[0]
    d, scales_h, scales_l, qs = _split(blocks, 2, 2, 4, 128)
    low = _unpack(scales_l, 4, 1).reshape(n, 8)  # byte i holds scales 2i (low nibble) and 2i + 1
    high = _unpack(scales_h, 2, 1).reshape(n, 8)  # little-endian u16: crumb i is scale i's top bits
    sc = (low | (high << 4)).to(torch.int8) - 32
    dl = (_half(d) * sc.to(torch.float32)).reshape(n, 8, 1)
    values = _iq4_lookup(_unpack(qs, 4, 16).reshape(n, 8, 32))
    return values.mul_(dl).reshape(n, QK_K)


KERNELS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
    "IQ4_NL": _iq4_nl,
    "IQ4_XS": _iq4_xs,
}


def dequantize(qtype: str, raw: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Decode ``raw`` (``qtype`` blocks) into a ``shape`` tensor of ``dtype`` on ``raw``'s device."""
    kernel = KERNELS[qtype]
    blocks = _blocks(raw, qtype, shape)
    n_blocks = blocks.shape[0]
    block_size = BLOCK_SIZES[qtype][0]
    chunk = max(1, CPU_CHUNK_ELEMENTS // block_size)
    if blocks.device.type != "cpu" or n_blocks <= chunk:
        return kernel(blocks).reshape(shape).to(dtype)
    # On the CPU, each kernel makes several passes over float32 temporaries; doing them chunk by
    # chunk keeps the temporaries in cache and skips page-faulting fresh memory (2-3x faster).
    out = torch.empty((n_blocks, block_size), dtype=dtype)
    for start in range(0, n_blocks, chunk):
        out[start : start + chunk] = kernel(blocks[start : start + chunk])
    return out.reshape(shape)


# byte offsets of each block's float16 fields (ggml-common.h): every other field is an integer, so a
# block decodes (in float32) to finite values exactly when these are finite — NaN/Inf times anything,
# zero included, stays non-finite, and finite halves times the small integers cannot overflow
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
_HALF_EXPONENT = 0x7C00  # all exponent bits set: Inf or NaN


def blocks_finite(qtype: str, raw: torch.Tensor) -> bool | None:
    """Whether ``raw`` (``qtype`` blocks) decodes to finite values, from its scale fields alone (about
    1/16 of its bytes); None for a type without a known layout (decode it to tell)."""
    offsets = HALF_FIELDS.get(qtype)
    if offsets is None or raw.dtype != torch.uint8:
        return None
    blocks = raw.reshape(-1, BLOCK_SIZES[qtype][1])
    for offset in offsets:
        field = blocks[:, offset : offset + 2].contiguous().view(torch.int16)
        if bool(((field & _HALF_EXPONENT) == _HALF_EXPONENT).any()):
            return False
    return True


def _decoder(qtype: str) -> Decoder:
    def decode(raw: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(qtype, raw, shape, dtype)

    decode.__name__ = decode.__qualname__ = f"dequantize_{qtype.lower()}"
    return decode


TORCH_DECODERS: dict[str, Decoder] = {qtype: _decoder(qtype) for qtype in KERNELS}


def numpy_fallback(qtype: str) -> Decoder:
    """A decoder for any other ggml type via ``gguf.quants.dequantize`` on the CPU (correct, slow)."""

    def decode(raw: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        import gguf

        ggml_type = gguf.GGMLQuantizationType[qtype]
        _, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
        data = raw.detach().to("cpu").contiguous().numpy().reshape(-1, type_size)
        values = torch.from_numpy(gguf.quants.dequantize(data, ggml_type))
        if values.numel() != torch.Size(shape).numel():
            raise ValueError(f"{raw.numel()} bytes of {qtype} do not hold a tensor of shape {list(shape)}")
        return values.reshape(shape).to(device=raw.device, dtype=dtype)

    decode.__name__ = f"dequantize_{qtype.lower()}_numpy"
    return decode


def register_decoders(registry: MutableMapping[str, Decoder]) -> None:
    """Put the pure-torch decoders into ``registry`` (normally ``tensors.DEQUANTIZERS``)."""
    registry.update(TORCH_DECODERS)


def register_fallback(registry: MutableMapping[str, Decoder], qtype: str) -> None:
    """Give ``qtype`` the numpy decoder unless something faster is registered already."""
    registry.setdefault(qtype, numpy_fallback(qtype))
