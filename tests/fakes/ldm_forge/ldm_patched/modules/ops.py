"""Fake of ldm_patched/modules/ops.py: ``use_patched_ops`` swaps ``torch.nn.Linear``/``LayerNorm`` for
``manual_cast`` layers while a module is built; those cast their weights to the input's dtype per call
(``cast_bias_weight``), which is how fp16 text-encoder weights compute in fp32 there."""

import contextlib

import torch


@contextlib.contextmanager
def use_patched_ops(operations):
    op_names = ["Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm", "ConvTranspose1d", "ConvTranspose2d"]
    backups = {op_name: getattr(torch.nn, op_name) for op_name in op_names}
    try:
        for op_name in op_names:
            if hasattr(operations, op_name):
                setattr(torch.nn, op_name, getattr(operations, op_name))
        yield
    finally:
        for op_name in op_names:
            setattr(torch.nn, op_name, backups[op_name])


def cast_bias_weight(s, input=None, dtype=None, device=None, bias_dtype=None):
    if input is not None:
        dtype = input.dtype if dtype is None else dtype
        bias_dtype = dtype if bias_dtype is None else bias_dtype
        device = input.device if device is None else device
    bias = None
    if s.bias is not None:
        bias = s.bias.to(device=device, dtype=bias_dtype)
        for f in s.bias_function:
            bias = f(bias)
    weight = s.weight.to(device=device, dtype=dtype)
    for f in s.weight_function:
        weight = f(weight)
    return weight, bias


class CastWeightBiasOp:
    ldm_patched_cast_weights = False
    weight_function = []  # noqa: RUF012 (the real class shares these lists too)
    bias_function = []  # noqa: RUF012


class disable_weight_init:
    class Linear(torch.nn.Linear, CastWeightBiasOp):
        def reset_parameters(self):
            return None

        def forward_ldm_patched_cast_weights(self, input):
            weight, bias = cast_bias_weight(self, input)
            return torch.nn.functional.linear(input, weight, bias)

        def forward(self, *args, **kwargs):
            if self.ldm_patched_cast_weights or len(self.weight_function) > 0 or len(self.bias_function) > 0:
                return self.forward_ldm_patched_cast_weights(*args, **kwargs)
            return super().forward(*args, **kwargs)

    class LayerNorm(torch.nn.LayerNorm, CastWeightBiasOp):
        def reset_parameters(self):
            return None

        def forward_ldm_patched_cast_weights(self, input):
            weight, bias = cast_bias_weight(self, input) if self.weight is not None else (None, None)
            return torch.nn.functional.layer_norm(input, self.normalized_shape, weight, bias, self.eps)

        def forward(self, *args, **kwargs):
            if self.ldm_patched_cast_weights or len(self.weight_function) > 0 or len(self.bias_function) > 0:
                return self.forward_ldm_patched_cast_weights(*args, **kwargs)
            return super().forward(*args, **kwargs)


class manual_cast(disable_weight_init):
    class Linear(disable_weight_init.Linear):
        ldm_patched_cast_weights = True

    class LayerNorm(disable_weight_init.LayerNorm):
        ldm_patched_cast_weights = True
