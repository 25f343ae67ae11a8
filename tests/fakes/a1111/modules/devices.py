"""Fake of modules/devices.py: the device/dtype globals, cond casts, ``manual_cast`` and ``autocast``.

One deliberate difference: the real ``autocast()`` returns ``torch.autocast("cuda")`` for half
precision. On a CPU-only machine that is a no-op, so the fake autocasts the device it runs on
(``torch.autocast(device.type, dtype=dtype)``) to let tests see what autocast does to an encode.
"""

from __future__ import annotations

import contextlib

import torch

cpu: torch.device = torch.device("cpu")
fp8: bool = False
force_fp16: bool = False
device: torch.device = cpu
device_interrogate: torch.device = cpu
dtype: torch.dtype = torch.float16
dtype_vae: torch.dtype = torch.float16
dtype_unet: torch.dtype = torch.float16
dtype_inference: torch.dtype = torch.float16
unet_needs_upcast = False
use_manual_cast = False  # fake only: what has_xpu()/has_mps()/cuda_no_autocast() would decide


def has_xpu() -> bool:
    return False


def has_mps() -> bool:
    return False


def cuda_no_autocast(device_id=None) -> bool:
    return use_manual_cast


def torch_gc():
    pass


def torch_npu_set_device():
    pass


def cond_cast_unet(input):
    if force_fp16:
        return input.to(torch.float16)
    return input.to(dtype_unet) if unet_needs_upcast else input


def cond_cast_float(input):
    return input.float() if unet_needs_upcast else input


patch_module_list = [
    torch.nn.Linear,
    torch.nn.Conv2d,
    torch.nn.MultiheadAttention,
    torch.nn.GroupNorm,
    torch.nn.LayerNorm,
]


def manual_cast_forward(target_dtype):
    def forward_wrapper(self, *args, **kwargs):
        if any(isinstance(arg, torch.Tensor) and arg.dtype != target_dtype for arg in args):
            args = [arg.to(target_dtype) if isinstance(arg, torch.Tensor) else arg for arg in args]
            kwargs = {k: v.to(target_dtype) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}

        org_dtype = target_dtype
        for param in self.parameters():
            if param.dtype != target_dtype:
                org_dtype = param.dtype
                break

        if org_dtype != target_dtype:
            self.to(target_dtype)
        result = self.org_forward(*args, **kwargs)
        if org_dtype != target_dtype:
            self.to(org_dtype)

        if target_dtype != dtype_inference:
            if isinstance(result, tuple):
                result = tuple(i.to(dtype_inference) if isinstance(i, torch.Tensor) else i for i in result)
            elif isinstance(result, torch.Tensor):
                result = result.to(dtype_inference)
        return result

    return forward_wrapper


@contextlib.contextmanager
def manual_cast(target_dtype):
    applied = False
    for module_type in patch_module_list:
        if hasattr(module_type, "org_forward"):
            continue
        applied = True
        org_forward = module_type.forward
        if module_type == torch.nn.MultiheadAttention:
            module_type.forward = manual_cast_forward(torch.float32)
        else:
            module_type.forward = manual_cast_forward(target_dtype)
        module_type.org_forward = org_forward
    try:
        yield None
    finally:
        if applied:
            for module_type in patch_module_list:
                if hasattr(module_type, "org_forward"):
                    module_type.forward = module_type.org_forward
                    delattr(module_type, "org_forward")


def autocast(disable=False):
    if disable:
        return contextlib.nullcontext()
    if force_fp16:
        return contextlib.nullcontext()
    if fp8 and device == cpu:
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=True)
    if fp8 and dtype_inference == torch.float32:
        return manual_cast(dtype)
    if dtype == torch.float32 or dtype_inference == torch.float32:
        return contextlib.nullcontext()
    if has_xpu() or has_mps() or cuda_no_autocast():
        return manual_cast(dtype)
    return torch.autocast(device.type, dtype=dtype)  # real: torch.autocast("cuda")


def without_autocast(disable=False):
    return (
        torch.autocast(device.type, enabled=False)
        if torch.is_autocast_enabled(device.type) and not disable
        else contextlib.nullcontext()
    )
