"""Fake of backend/operations.py: Forge's manual-cast layers and ``using_forge_operations``.

What matters for text encoders, as in Forge:

* ``ForgeOperations.Linear`` is a plain ``nn.Module`` (not an ``nn.Linear``): ``weight`` is None
  until the first ``load_state_dict``, which creates it from the file cast to a ``dummy``
  parameter's dtype (and picks up ``scale_weight`` for scaled fp8). A Linear the file never fills
  keeps its ``dummy`` (SD1/SDXL CLIP-L's ``text_projection``). Later loads copy in place.
* With ``parameters_manual_cast`` every forward casts weight (× ``scale_weight``) and bias to the
  input's dtype/device; ``LayerNorm``/``Embedding`` are torch subclasses doing the same (Embedding
  keeps its weight dtype).
* ``using_forge_operations`` swaps those classes into ``torch.nn`` while a model is built.
"""

import contextlib

import torch

current_device = None
current_dtype = None
current_manual_cast_enabled = False
current_bnb_dtype = None


def get_weight_and_bias(layer, weight_args=None, bias_args=None, weight_fn=None, bias_fn=None):
    scale_weight = getattr(layer, "scale_weight", None)
    weight = layer.weight
    if weight is not None:
        if weight_fn is not None:
            weight = weight_fn(weight)
        if weight_args is not None:
            weight = weight.to(**weight_args)
        if scale_weight is not None:
            weight = weight * scale_weight.to(device=weight.device, dtype=weight.dtype)
    bias = layer.bias
    if bias is not None:
        if bias_fn is not None:
            bias = bias_fn(bias)
        if bias_args is not None:
            bias = bias.to(**bias_args)
    return weight, bias


def weights_manual_cast(layer, x, skip_weight_dtype=False, skip_bias_dtype=False, weight_fn=None, bias_fn=None):
    weight_args = {"device": x.device} if skip_weight_dtype else {"device": x.device, "dtype": x.dtype}
    bias_args = {"device": x.device} if skip_bias_dtype else {"device": x.device, "dtype": x.dtype}
    weight, bias = get_weight_and_bias(layer, weight_args, bias_args, weight_fn=weight_fn, bias_fn=bias_fn)
    return weight, bias, None


class ForgeOperations:
    class Linear(torch.nn.Module):
        def __init__(self, in_features, out_features, *args, **kwargs):
            super().__init__()
            self.in_features = in_features
            self.out_features = out_features
            self.dummy = torch.nn.Parameter(torch.empty(1, device=current_device, dtype=current_dtype))
            self.weight = None
            self.scale_weight = None
            self.bias = None
            self.parameters_manual_cast = current_manual_cast_enabled

        def _load_from_state_dict(
            self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        ):
            if hasattr(self, "dummy"):
                if prefix + "weight" in state_dict:
                    self.weight = torch.nn.Parameter(state_dict[prefix + "weight"].to(self.dummy))
                if prefix + "scale_weight" in state_dict:
                    self.scale_weight = torch.nn.Parameter(state_dict[prefix + "scale_weight"])
                if prefix + "bias" in state_dict:
                    self.bias = torch.nn.Parameter(state_dict[prefix + "bias"].to(self.dummy))
                del self.dummy
            else:
                super()._load_from_state_dict(
                    state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
                )

        def forward(self, x):
            if self.parameters_manual_cast:
                weight, bias, _ = weights_manual_cast(self, x)
            else:
                weight, bias = get_weight_and_bias(self)
            return torch.nn.functional.linear(x, weight, bias)

    class LayerNorm(torch.nn.LayerNorm):
        def __init__(self, *args, **kwargs):
            kwargs["device"] = current_device
            kwargs["dtype"] = current_dtype
            super().__init__(*args, **kwargs)
            self.parameters_manual_cast = current_manual_cast_enabled

        def reset_parameters(self):
            return None

        def forward(self, x):
            if self.parameters_manual_cast:
                weight, bias, _ = weights_manual_cast(self, x)
                return torch.nn.functional.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
            return super().forward(x)

    class Embedding(torch.nn.Embedding):
        def __init__(self, *args, **kwargs):
            kwargs["device"] = current_device
            super().__init__(*args, **kwargs)
            self.parameters_manual_cast = current_manual_cast_enabled
            self.bias = None

        def reset_parameters(self):
            self.bias = None
            return None

        def forward(self, x):
            if self.parameters_manual_cast:
                weight, _, _ = weights_manual_cast(self, x, skip_weight_dtype=True, skip_bias_dtype=True)
                return torch.nn.functional.embedding(
                    x, weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
                )
            return super().forward(x)


class ForgeOperationsGGUF(ForgeOperations):
    """Linear layers of a GGUF model: ``weight`` is the file's ``ParameterGGUF`` itself, dequantised by its
    ``gguf_cls`` in every forward (in ``computation_dtype``), then cast to the input's dtype."""

    class Linear(torch.nn.Module):
        def __init__(self, *args, **kwargs):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.empty(1, device=current_device, dtype=current_dtype))
            self.weight = None
            self.bias = None
            self.parameters_manual_cast = current_manual_cast_enabled

        def _load_from_state_dict(
            self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        ):
            if hasattr(self, "dummy"):
                computation_dtype = self.dummy.dtype
                if computation_dtype not in (torch.float16, torch.bfloat16):
                    computation_dtype = torch.float16
                if prefix + "weight" in state_dict:
                    self.weight = state_dict[prefix + "weight"].to(device=self.dummy.device)
                    self.weight.computation_dtype = computation_dtype
                if prefix + "bias" in state_dict:
                    self.bias = state_dict[prefix + "bias"].to(device=self.dummy.device)
                    self.bias.computation_dtype = computation_dtype
                del self.dummy
            else:
                if prefix + "weight" in state_dict:
                    self.weight = state_dict[prefix + "weight"]
                if prefix + "bias" in state_dict:
                    self.bias = state_dict[prefix + "bias"]

        def _apply(self, fn, recurse=True):
            from backend import utils

            for k, p in self.named_parameters(recurse=False, remove_duplicate=True):
                setattr(self, k, utils.tensor2parameter(fn(p)))
            return self

        def forward(self, x):
            from backend import utils
            from backend.operations_gguf import dequantize_tensor

            if self.bias is not None and self.bias.dtype != x.dtype:
                self.bias = utils.tensor2parameter(dequantize_tensor(self.bias).to(x.dtype))
            if (
                self.weight is not None
                and self.weight.dtype != x.dtype
                and getattr(self.weight, "gguf_cls", None) is None
            ):
                self.weight = utils.tensor2parameter(self.weight.to(x.dtype))
            weight, bias, _ = weights_manual_cast(
                self, x, weight_fn=dequantize_tensor, bias_fn=None, skip_bias_dtype=True
            )
            return torch.nn.functional.linear(x, weight, bias)


OP_NAMES = ("Linear", "LayerNorm", "Embedding")


@contextlib.contextmanager
def using_forge_operations(operations=None, device=None, dtype=None, manual_cast_enabled=False, bnb_dtype=None):
    global current_device, current_dtype, current_manual_cast_enabled, current_bnb_dtype
    current_device, current_dtype, current_manual_cast_enabled, current_bnb_dtype = (
        device,
        dtype,
        manual_cast_enabled,
        bnb_dtype,
    )
    if operations is None:
        operations = ForgeOperationsGGUF if bnb_dtype == "gguf" else ForgeOperations
    backups = {name: getattr(torch.nn, name) for name in OP_NAMES}
    try:
        for name in OP_NAMES:
            setattr(torch.nn, name, getattr(operations, name))
        yield
    finally:
        for name in OP_NAMES:
            setattr(torch.nn, name, backups[name])
