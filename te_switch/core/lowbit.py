"""Keep a Linear/Embedding weight compressed and expand it only while the module computes; undoable.

``attach(module, weight)`` takes a GGUF :class:`PackedTensor`, a scaled-fp8 :class:`PackedTensor` or a
plain fp8 tensor. Each forward then expands the weight on the input's device, in the compute dtype,
runs ``F.linear`` / ``F.embedding`` and drops the expanded copy. ``detach(module)`` puts everything
back: the original ``weight`` Parameter object, the instance attributes, buffers and hooks.

How an attached module looks
----------------------------
* ``module.weight`` is a *placeholder* Parameter with the logical shape, the compute dtype and the
  module's device, so code that inspects ``.weight.shape/.dtype/.device`` keeps working
  (transformers' T5 casts hidden states to ``wo.weight.dtype``; ``model.dtype``/``model.device``
  come from the first parameter; A1111 moves token ids to ``token_embedding.weight.device``) and
  ``named_parameters()`` / ``state_dict()`` keep their keys. It is a stride-0 view of a single NaN
  element: it costs one element of memory, and code that reads weight *values* directly instead
  of calling the module gets NaNs rather than plausible zeros. Writes into it fail (several
  elements share one memory location), so in-place weight patching (LoRA "apply to weights",
  ``load_state_dict``) raises instead of being silently ignored: detach first.
  Rejected alternatives: the packed uint8 data as ``.weight`` (wrong shape and dtype: T5 would cast
  activations to uint8); a meta tensor (wrong device); a tensor subclass (fragile under
  ``__torch_function__`` and every host's casting code).
* The compressed data lives in non-persistent uint8 buffers (``weight_lowbit_raw``,
  ``weight_lowbit_scale``; fp8 data and fp32 scales are stored as their bytes), so
  ``module.to(device)``/``.cuda()``/``.cpu()`` move it with the module and ``.half()``/``.to(dtype)``
  never convert it. The instance's ``_apply`` is overridden so such calls retarget the placeholder's
  device/dtype without materialising it (``Tensor.to`` would expand a stride-0 tensor to full size).
* ``state_dict()`` holds the expanded weight (in the placeholder's dtype and device) under
  ``weight``: correct values, paid for only when someone asks.
* The *instance's* ``forward`` is replaced; class-level patches of ``forward`` (A1111's built-in
  Lora extension patches ``torch.nn.Linear.forward``) do not run for attached modules.
* Compute dtype: Linear computes in the input's float dtype; Embedding returns the placeholder's
  dtype (the ``dtype`` given to :func:`attach`, else the previous weight's dtype; ``.half()`` etc.
  change it like they would change a dense weight).
* The original Parameter is kept (optionally moved to ``offload``, e.g. ``"cpu"``, to free GPU
  memory) and restored by :func:`detach` onto the module's current device.

The forward/_apply overrides are bound methods in the module's ``__dict__`` (so ``copy.deepcopy``
rebinds them to the copy); they form a reference cycle that :func:`detach` breaks.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from te_switch.core.tensors import DEQUANTIZERS, FLOAT8_DTYPES, SAFETENSORS_DTYPES, PackedTensor, dtype_name

RAW_BUFFER = "weight_lowbit_raw"
SCALE_BUFFER = "weight_lowbit_scale"
_STATE = "_te_switch_lowbit"
_OVERRIDDEN = ("forward", "_apply")
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FP8_QTYPES = ("F8_E4M3", "F8_E5M2")
DENSE_QTYPES = ("F16", "BF16", "F32")  # a dense weight kept as its bytes, for a layer only its host can hold


@dataclass(eq=False)
class _Lowbit:
    kind: str  # 'linear' | 'embedding'
    qtype: str
    shape: torch.Size
    raw_dtype: torch.dtype  # what the uint8 raw buffer really holds (uint8 blocks or an fp8 dtype)
    scale_dtype: torch.dtype | None
    scale_shape: torch.Size | None
    placeholder: nn.Parameter
    attach_dtype: torch.dtype
    original: nn.Parameter | None
    saved_attrs: dict[str, Any] = field(default_factory=dict)  # instance forward/_apply from before attach
    hook: Any = None
    decode: Any = None  # the weight's own expansion (PackedTensor.decode), kept with its bytes


# ---------------------------------------------------------------------------------------------
# public API


def attach(
    module: nn.Module,
    weight: PackedTensor | torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    kind: str | None = None,
    offload: torch.device | str | None = None,
    release: bool = False,
    copy: bool = True,
) -> None:
    """Make ``module`` compute with ``weight`` kept compressed (see the module docstring).

    ``dtype``: compute dtype reported by the placeholder and used by Embedding (default: the current
    weight's dtype, which must then be float16/bfloat16/float32/float64). ``kind``: ``'linear'`` or
    ``'embedding'`` for modules that are neither ``nn.Linear`` nor ``nn.Embedding`` but use their
    ``weight`` the same way. ``offload``: where to park the original weight while attached.
    ``release``: the original Parameter keeps its identity but gives up its storage (an empty tensor of
    its dtype on its device) — for a caller that writes it back after :func:`detach` (the swap engine
    re-reads the built-in weights from their file), so the slot's own weights cost nothing meanwhile.
    ``copy=False``: ``weight``'s bytes are already owned memory (another attached module's
    :func:`packed_weight`, for a tied table) and are shared as they are instead of copied.
    Attaching to an attached module swaps the compressed weight and keeps what ``detach`` restores.
    """
    packed = _as_packed(weight)
    kind = _kind(module, kind)
    if "weight" not in module._parameters:
        raise ValueError(f"{type(module).__name__} has no `weight` parameter to replace")
    state: _Lowbit | None = module.__dict__.get(_STATE)
    if state is not None:
        if packed.shape != state.shape:
            raise ValueError(f"weight shape {list(packed.shape)} does not match the module's {list(state.shape)}")
        _install(module, state, packed, *_to_bytes(packed, state.placeholder.device, copy))
        return

    original = module._parameters["weight"]
    released = original is not None and original.numel() == 0  # a tied weight another module released
    if original is not None and not released and tuple(original.shape) != tuple(packed.shape):
        raise ValueError(f"weight shape {list(packed.shape)} does not match the module's {list(original.shape)}")
    if dtype is None and original is not None and original.dtype in COMPUTE_DTYPES:
        dtype = original.dtype
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"pass dtype= (float16/bfloat16/float32/float64): got {dtype}, no compute dtype to keep")
    if kind == "embedding" and getattr(module, "max_norm", None) is not None:
        raise ValueError("Embedding(max_norm=...) renormalises its stored weight in place; it cannot stay compressed")
    on_meta = original is None or original.device.type == "meta"
    device = packed.raw.device if on_meta else original.device

    placeholder = nn.Parameter(_placeholder(packed.shape, dtype, device), requires_grad=False)
    state = _Lowbit(kind, packed.qtype, packed.shape, packed.raw.dtype, None, None, placeholder, dtype, original)
    # copies that can run out of memory happen before the module is touched, so a failure leaves it as it was
    data, scale = _to_bytes(packed, device, copy)
    if release and not on_meta:
        original.data = torch.empty(0, dtype=original.dtype, device=original.device)
    elif offload is not None and not on_meta:
        original.data = original.data.to(offload)
    module._parameters["weight"] = placeholder  # same key, same position in named_parameters()
    _install(module, state, packed, data, scale)
    state.saved_attrs = {name: module.__dict__[name] for name in _OVERRIDDEN if name in module.__dict__}
    module.__dict__["forward"] = types.MethodType(_FORWARDS[kind], module)
    module.__dict__["_apply"] = types.MethodType(_lowbit_apply, module)
    state.hook = module._register_state_dict_hook(_state_dict_hook)
    module.__dict__[_STATE] = state


def detach(module: nn.Module) -> None:
    """Undo :func:`attach`: the original Parameter, forward and buffers come back. No-op if not attached."""
    state: _Lowbit | None = module.__dict__.pop(_STATE, None)
    if state is None:
        return
    state.hook.remove()
    for name in _OVERRIDDEN:
        module.__dict__.pop(name, None)
    module.__dict__.update(state.saved_attrs)
    for name in (RAW_BUFFER, SCALE_BUFFER):
        if name in module._buffers:
            delattr(module, name)
    original = state.original
    if original is not None and original.device.type != "meta":
        # follow the module if it was moved or converted while attached; otherwise this is a no-op
        now = state.placeholder
        dtype = now.dtype if now.dtype != state.attach_dtype and original.is_floating_point() else original.dtype
        if original.device != now.device or original.dtype != dtype:
            moved = original.data.to(device=now.device, dtype=dtype)
            if torch._has_compatible_shallow_copy_type(original, moved):
                original.data = moved
            else:  # e.g. onto the meta device: a new Parameter, as Module._apply would have made
                original = nn.Parameter(moved, requires_grad=original.requires_grad)
    module._parameters["weight"] = original


def is_attached(module: nn.Module) -> bool:
    return _STATE in module.__dict__


def packed_weight(module: nn.Module) -> PackedTensor | None:
    """The compressed weight an attached module computes with (views of its buffers), else None."""
    state = module.__dict__.get(_STATE)
    return None if state is None else _packed(module, state)


def compressed_bytes(tree: nn.Module) -> int:
    """Bytes held by the compressed weights attached under ``tree`` (data and scales)."""
    total = 0
    for m in tree.modules():
        if is_attached(m):
            total += sum(m._buffers[n].nbytes for n in (RAW_BUFFER, SCALE_BUFFER) if m._buffers.get(n) is not None)
    return total


def dense_bytes(tree: nn.Module) -> int:
    """Bytes the attached weights under ``tree`` would take expanded in their compute dtype."""
    total = 0
    for m in tree.modules():
        state = m.__dict__.get(_STATE)
        if state is not None:
            total += state.shape.numel() * state.placeholder.element_size()
    return total


# ---------------------------------------------------------------------------------------------
# internals


def _as_packed(weight: PackedTensor | torch.Tensor) -> PackedTensor:
    if isinstance(weight, PackedTensor):
        if weight.qtype in FP8_QTYPES:
            if weight.raw.dtype not in FLOAT8_DTYPES:
                raise ValueError(f"{weight.qtype} PackedTensor holds {weight.raw.dtype}, not fp8 data")
        elif weight.qtype in DENSE_QTYPES:
            if weight.raw.dtype != SAFETENSORS_DTYPES[weight.qtype]:
                raise ValueError(f"{weight.qtype} PackedTensor holds {weight.raw.dtype}")
        elif weight.qtype not in DEQUANTIZERS:
            raise ValueError(f"no decoder for quantisation type {weight.qtype}")
        return weight
    if isinstance(weight, torch.Tensor) and weight.dtype in FLOAT8_DTYPES:
        return PackedTensor(dtype_name(weight.dtype), weight, weight.shape)
    what = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
    raise TypeError(f"not a compressed weight ({what}): attach GGUF/fp8 weights, load dense ones normally")


def _kind(module: nn.Module, kind: str | None) -> str:
    if kind is not None:
        if kind not in ("linear", "embedding"):
            raise ValueError(f"kind must be 'linear' or 'embedding', not {kind!r}")
        return kind
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Linear):
        return "linear"
    raise ValueError(f"{type(module).__name__} is neither Linear nor Embedding: pass kind='linear' or 'embedding'")


def _placeholder(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full((), float("nan"), dtype=dtype, device=device).expand(shape)


def _to_bytes(
    packed: PackedTensor, device: torch.device, copy: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``packed``'s data and scale as uint8 tensors on ``device``; copies unless told the bytes are owned
    already: the source may be a view into a memory-mapped file that can change or vanish after the swap."""
    raw = packed.raw.contiguous().view(torch.uint8).to(device, copy=copy)
    if packed.scale is None:
        return raw, None
    return raw, packed.scale.contiguous().reshape(-1).view(torch.uint8).to(device, copy=copy)


def _install(
    module: nn.Module, state: _Lowbit, packed: PackedTensor, data: torch.Tensor, scale: torch.Tensor | None
) -> None:
    """Make ``data``/``scale`` (from :func:`_to_bytes`) the module's compressed weight."""
    state.qtype = packed.qtype
    state.raw_dtype = packed.raw.dtype
    state.decode = packed.decode
    for name in (RAW_BUFFER, SCALE_BUFFER):
        if name in module._buffers:
            delattr(module, name)
    module.register_buffer(RAW_BUFFER, data, persistent=False)
    if scale is None:
        state.scale_dtype = state.scale_shape = None
    else:
        state.scale_dtype, state.scale_shape = packed.scale.dtype, packed.scale.shape
        module.register_buffer(SCALE_BUFFER, scale, persistent=False)


def _packed(module: nn.Module, state: _Lowbit) -> PackedTensor:
    raw = module._buffers[RAW_BUFFER].view(state.raw_dtype)
    scale = None
    if state.scale_dtype is not None:
        scale = module._buffers[SCALE_BUFFER].view(state.scale_dtype).reshape(state.scale_shape)
    return PackedTensor(state.qtype, raw, state.shape, scale, state.decode)


def _live_state(module: nn.Module) -> _Lowbit:
    state: _Lowbit = module.__dict__[_STATE]
    weight = module._parameters.get("weight")
    if weight is not state.placeholder or any(weight.stride()):
        raise RuntimeError(
            f"{type(module).__name__}.weight was replaced while a compressed weight is attached; call detach() first"
        )
    return state


def _linear_forward(self: nn.Module, input: torch.Tensor) -> torch.Tensor:
    state = _live_state(self)
    dtype = input.dtype if input.dtype in COMPUTE_DTYPES else state.placeholder.dtype
    weight = _packed(self, state).dequantize(dtype, input.device)
    bias = getattr(self, "bias", None)
    if bias is not None:
        bias = bias.to(device=input.device, dtype=dtype)
    out = F.linear(input, weight, bias)
    del weight  # the expanded copy goes now, before the caller's next allocation
    return out


def _embedding_forward(self: nn.Module, input: torch.Tensor) -> torch.Tensor:
    state = _live_state(self)
    dtype = state.placeholder.dtype
    packed = _packed(self, state)
    if _rows_addressable(packed):
        return _embedding_rows(packed, input, dtype)
    weight = packed.dequantize(dtype, input.device)
    return F.embedding(
        input,
        weight,
        getattr(self, "padding_idx", None),
        None,
        getattr(self, "norm_type", 2.0),
        getattr(self, "scale_grad_by_freq", False),
        getattr(self, "sparse", False),
    )


def _rows_addressable(packed: PackedTensor) -> bool:
    """True when raw row i holds exactly embedding row i (GGUF rows, fp8 with one scale)."""
    return (
        len(packed.shape) == 2
        and packed.raw.dim() == 2
        and packed.raw.shape[0] == packed.shape[0]
        and (packed.scale is None or packed.scale.numel() == 1)
    )


def _embedding_rows(packed: PackedTensor, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Embedding lookup that expands only the rows ``ids`` uses (a prompt touches ~100 of 32k rows).

    Rows are decoded independently in every format, so the result equals a lookup in the fully
    expanded table. ``padding_idx`` and friends only affect gradients, which never reach ``packed``.
    """
    num = packed.shape[0]
    used, position = torch.unique(ids.reshape(-1), return_inverse=True)
    if used.numel() and (int(used[0]) < 0 or int(used[-1]) >= num):
        raise IndexError(f"index out of range in self (ids must lie in [0, {num}))")
    raw_rows = packed.raw.index_select(0, used.to(packed.raw.device))
    rows = PackedTensor(
        packed.qtype, raw_rows, torch.Size((used.numel(), packed.shape[1])), packed.scale, packed.decode
    )
    return F.embedding(position.reshape(ids.shape), rows.dequantize(dtype, ids.device))


_FORWARDS = {"linear": _linear_forward, "embedding": _embedding_forward}


def _lowbit_apply(self: nn.Module, fn: Any, *args: Any, **kwargs: Any) -> nn.Module:
    """``Module._apply`` that moves the compressed bytes and retargets the placeholder without expanding it."""
    state: _Lowbit = self.__dict__[_STATE]
    placeholder = self._parameters.get("weight")
    ours = placeholder is state.placeholder
    hidden = {n: self._buffers[n] for n in (RAW_BUFFER, SCALE_BUFFER) if self._buffers.get(n) is not None}
    if ours:
        self._parameters["weight"] = None  # Module._apply skips None entries
    for name in hidden:
        self._buffers[name] = None
    saved = state.saved_attrs.get("_apply")
    try:
        result = saved(fn, *args, **kwargs) if saved is not None else type(self)._apply(self, fn, *args, **kwargs)
    finally:
        if ours:
            self._parameters["weight"] = placeholder
        self._buffers.update(hidden)
    # learn the target device/dtype from what fn does to an empty tensor like the placeholder
    with torch.no_grad():
        probe = fn(torch.empty(0, dtype=state.placeholder.dtype, device=state.placeholder.device))
    if isinstance(probe, torch.Tensor):
        for name, buf in hidden.items():
            if buf.device != probe.device:
                self._buffers[name] = buf.to(probe.device)
        if (
            ours
            and probe.is_floating_point()
            and (probe.device, probe.dtype) != (placeholder.device, placeholder.dtype)
        ):
            moved = _placeholder(state.shape, probe.dtype, probe.device)
            if torch._has_compatible_shallow_copy_type(placeholder, moved):
                placeholder.data = moved  # keep the Parameter object, as Module._apply does
            else:  # e.g. to/from the meta device: Module._apply makes a new Parameter too
                state.placeholder = nn.Parameter(moved, requires_grad=False)
                self._parameters["weight"] = state.placeholder
    return result


def _state_dict_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    state = module.__dict__.get(_STATE)
    key = prefix + "weight"
    if state is not None and key in state_dict and module._parameters.get("weight") is state.placeholder:
        ph = state.placeholder
        state_dict[key] = _packed(module, state).dequantize(ph.dtype, ph.device)
