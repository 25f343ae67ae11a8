"""Tensor vocabulary shared by every reader: stored dtype names and packed (quantised) weights.

Stored dtypes are named the way safetensors names them (``F16``, ``BF16``, ``F8_E4M3``...);
GGUF block formats keep their ggml names (``Q8_0``, ``Q4_K``...). A weight that stays compressed
until compute time is a :class:`PackedTensor`; everything else is a plain ``torch.Tensor``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch

from te_switch.core import dequant

# safetensors dtype name -> torch dtype (only what torch can hold natively)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
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
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}
FLOAT8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)

# what the user picks per slot -> torch dtype (None = keep the host's dtype)
PRECISIONS: dict[str, torch.dtype | None] = {
    "auto": None,
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


ITEMSIZES = {name: torch.empty((), dtype=dtype).element_size() for name, dtype in SAFETENSORS_DTYPES.items()}


def itemsize(name: str) -> int:
    return ITEMSIZES[name]


class TensorInfo(NamedTuple):
    """What a file's header says about one tensor, before any data is read."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# qtype -> function(raw, shape, dtype) -> dense tensor: the pure-torch GGUF decoders; the GGUF reader
# adds gguf-py's numpy fallback for any other type it opens
DEQUANTIZERS: dict[str, Callable[[torch.Tensor, torch.Size, torch.dtype], torch.Tensor]] = {}
dequant.register_decoders(DEQUANTIZERS)


@dataclass(eq=False)
class PackedTensor:
    """A weight kept in its compressed storage form until something needs real values.

    ``raw`` is the stored data: for GGUF block formats the uint8 blocks, one row of blocks per
    logical row; for scaled fp8 the fp8 tensor itself. ``scale`` (scaled fp8 only) multiplies it.
    ``decode`` (optional) is a host's own expansion, for a swap that must compute exactly as that host
    would from the same file (Forge expands GGUF in fp16 with its own op order): it gets this weight
    (raw on the target device, no ``decode``) and its result is cast to the dtype asked for.
    """

    qtype: str
    raw: torch.Tensor
    shape: torch.Size
    scale: torch.Tensor | None = None
    decode: Callable[[PackedTensor], torch.Tensor] | None = None

    def dequantize(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        raw = self.raw if device is None else self.raw.to(device)
        if self.decode is not None:
            plain = PackedTensor(self.qtype, raw, self.shape, None if self.scale is None else self.scale.to(raw.device))
            return self.decode(plain).to(dtype)
        if self.qtype in ("F16", "BF16", "F32"):  # a dense weight kept as its bytes (core.lowbit)
            return raw.reshape(self.shape).to(dtype)
        if self.qtype in ("F8_E4M3", "F8_E5M2"):
            # compute the product in fp32 so the result does not depend on the target dtype's rounding twice
            out = raw.to(torch.float32)
            if self.scale is not None:
                out = out * self.scale.to(device=out.device, dtype=torch.float32)
            return out.reshape(self.shape).to(dtype)
        fn = DEQUANTIZERS.get(self.qtype)
        if fn is None:
            raise ValueError(f"no decoder for quantisation type {self.qtype}")
        return fn(raw, self.shape, dtype)

    @property
    def dtype(self) -> str:
        """The stored type name (for reports)."""
        return self.qtype

    @property
    def nbytes(self) -> int:
        n = self.raw.numel() * self.raw.element_size()
        if self.scale is not None:
            n += self.scale.numel() * self.scale.element_size()
        return n

    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def to(self, device: torch.device | str) -> PackedTensor:
        scale = None if self.scale is None else self.scale.to(device)
        return PackedTensor(self.qtype, self.raw.to(device), self.shape, scale, self.decode)


@dataclass(eq=False)
class LazyWeight:
    """A weight that is read from its file, and converted, only when ``load()`` asks for it.

    What a lazily loaded tower holds (``convert.load_tower(lazy=True)``): the engine checks and
    commits such a mapping one tensor at a time, so no converted tower ever sits in RAM. ``shape``
    and ``dtype`` (a stored dtype name, as :attr:`PackedTensor.dtype`) come from the file's header.
    Each ``load()`` reads again and keeps nothing — except a value :meth:`shared` by ``uses`` derived
    weights (a fused ``in_proj`` and its q, k, v): read once, held until each of them has taken it.
    """

    shape: torch.Size
    dtype: str
    produce: Callable[[], Weight]
    uses: int = 1
    at: int = 0  # where its bytes start in the file (0: unknown): the order a commit reads in
    _held: Weight | None = None
    _left: int = 0

    def load(self) -> Weight:
        held = self._held
        if held is not None:
            self._left -= 1
            if self._left <= 0:
                self._held = None
            return held
        value = self.produce()
        if self.uses > 1:
            self._held, self._left = value, self.uses - 1
        return value

    def shared(self, uses: int) -> LazyWeight:
        """This weight for ``uses`` consumers that each take it once per pass: one read per pass."""
        return LazyWeight(self.shape, self.dtype, self.load if self.uses == 1 else self.produce, uses, self.at)

    def numel(self) -> int:
        return math.prod(self.shape)


Weight = torch.Tensor | PackedTensor
Value = Weight | LazyWeight  # what a (possibly lazy) mapping of a tower holds


def realize(w: Value) -> Weight:
    """The weight itself: a lazy one is read (and converted) now."""
    return w.load() if isinstance(w, LazyWeight) else w


def derive(fn: Callable[..., Weight], *inputs: Value, shape: tuple[int, ...], dtype: str) -> Value:
    """``fn(*inputs)`` now — or, when an input is lazy, a :class:`LazyWeight` that computes it from
    the inputs' values each time it is loaded (``shape``/``dtype``: what ``fn`` returns)."""
    if not any(isinstance(i, LazyWeight) for i in inputs):
        return fn(*inputs)
    at = max(i.at for i in inputs if isinstance(i, LazyWeight))
    return LazyWeight(torch.Size(shape), dtype, lambda: fn(*(realize(i) for i in inputs)), at=at)


def as_dense(w: Value) -> Value:
    """``dense(w)`` for a compressed weight (computed when loaded, for a lazy one); others as they are."""
    return derive(dense, w, shape=tuple(w.shape), dtype="F32") if is_compressed(w) else w


def weight_dtype_name(w: Value) -> str:
    return w.qtype if isinstance(w, PackedTensor) else w.dtype if isinstance(w, LazyWeight) else dtype_name(w.dtype)


def is_compressed(w: Value) -> bool:
    """True for weights that must be expanded before a matmul (GGUF blocks, fp8)."""
    if isinstance(w, LazyWeight):
        return w.dtype not in SAFETENSORS_DTYPES or SAFETENSORS_DTYPES[w.dtype] in FLOAT8_DTYPES
    return isinstance(w, PackedTensor) or w.dtype in FLOAT8_DTYPES


def is_float(w: Value) -> bool:
    """Whether ``w`` holds float values (packed and lazy weights from their stored dtype)."""
    if isinstance(w, torch.Tensor):
        return w.is_floating_point()
    name = weight_dtype_name(w)
    return name not in SAFETENSORS_DTYPES or SAFETENSORS_DTYPES[name].is_floating_point


def dense(w: Value, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Real values of ``w``; ``dtype=None`` keeps float16/bfloat16/float32 as stored, expands the rest to fp32."""
    if isinstance(w, LazyWeight):
        w = w.load()
    if isinstance(w, PackedTensor):
        return w.dequantize(dtype or torch.float32)
    if w.dtype in FLOAT8_DTYPES:
        return w.to(dtype or torch.float32)
    return w if dtype is None or w.dtype == dtype else w.to(dtype)


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t``, in one reduction that allocates nothing the size of ``t``.

    ``aminmax`` carries any NaN/Inf into its result (and runs near memory speed, unlike a float32
    sum of fp16 or an element-wise test). fp8 has no fast float reductions: its bytes say it, as
    signed and unsigned integers (e4m3fn: NaN is 0x7F/0xFF; e5m2: Inf/NaN have all exponent bits set).
    """
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.dtype in FLOAT8_DTYPES:
        flat = t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)
        positive, negative = (0x7F, 0xFF) if t.dtype == torch.float8_e4m3fn else (0x7C, 0xFC)
        return int(flat.view(torch.int8).max()) < positive and int(flat.view(torch.uint8).max()) < negative
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def materialize(state: Mapping[str, Value], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every weight as a plain tensor (integer tensors keep their dtype)."""
    out = {}
    for k, w in state.items():
        w = realize(w)
        if isinstance(w, torch.Tensor) and not w.is_floating_point():
            out[k] = w
        else:
            out[k] = dense(w, dtype)
    return out
