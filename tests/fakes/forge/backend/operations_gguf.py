"""Fake of backend/operations_gguf.py: ``ParameterGGUF`` — a Parameter holding raw quantised bytes,
recognised elsewhere by its ``gguf_cls`` attribute and reporting the logical ``real_shape``."""

import torch


class ParameterGGUF(torch.nn.Parameter):
    def __new__(cls, data=None, requires_grad=False, no_init=False, gguf_cls=None, real_shape=None):
        return super().__new__(cls, data, requires_grad=requires_grad)

    def __init__(self, data=None, requires_grad=False, no_init=False, gguf_cls=None, real_shape=None):
        super().__init__()
        self.gguf_cls = gguf_cls
        self.real_shape = torch.Size(real_shape) if real_shape is not None else torch.Size(self.data.shape)
        self.computation_dtype = torch.float16
        self.baked = False

    @property
    def shape(self):
        return self.real_shape


def dequantize_tensor(tensor):
    if tensor is None or getattr(tensor, "gguf_cls", None) is None:
        return tensor
    return tensor.gguf_cls.dequantize_pytorch(tensor)
