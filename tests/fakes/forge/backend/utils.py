"""Fake of backend/utils.py: attribute helpers used by the LoRA loader and memory management, and
``load_torch_file``."""

import gguf
import safetensors.torch
import torch


def set_attr_raw(obj, attr, value):
    *parents, name = attr.split(".")
    for p in parents:
        obj = getattr(obj, p)
    setattr(obj, name, value)


def get_attr(obj, attr):
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def get_attr_with_parent(obj, attr):
    parent, name = obj, None
    for name in attr.split("."):
        parent = obj
        obj = getattr(obj, name)
    return parent, name, obj


def tensor2parameter(x):
    return x if isinstance(x, torch.nn.Parameter) else torch.nn.Parameter(x, requires_grad=False)


def load_torch_file(ckpt, safe_load=False, device=None):
    """safetensors through their mmap, GGUF as ``ParameterGGUF`` per tensor (Forge's own reader)."""
    from backend.operations_gguf import ParameterGGUF

    if ckpt.lower().endswith(".gguf"):
        return {str(t.name): ParameterGGUF(t) for t in gguf.GGUFReader(ckpt).tensors}
    return safetensors.torch.load_file(ckpt, device="cpu")
