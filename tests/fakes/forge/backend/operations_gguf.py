"""Fake of backend/operations_gguf.py: ``ParameterGGUF`` — a Parameter holding raw quantised bytes,
recognised elsewhere by its ``gguf_cls`` attribute and reporting the logical ``real_shape``."""

import enum

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


# Forge's GGUF decoders (its vendored gguf-py, ``packages_3rdparty/gguf/quants.py``): a ParameterGGUF is
# baked once (Q8_0: the block scale converted to ``computation_dtype``), then every forward dequantises it
# in ``computation_dtype`` (fp16 on CPU), rounding after each operation. Written here from that behaviour.
class GGMLQuantizationType(enum.IntEnum):
    Q8_0 = 8


class Q8_0:
    block_size, type_size = 32, 34

    @classmethod
    def bake(cls, parameter):
        if parameter.baked:
            return
        data = parameter.data
        blocks = data.reshape((-1, data.shape[-1])).view(torch.uint8).reshape((-1, cls.type_size))
        scale = blocks[:, :2].contiguous().view(torch.float16).to(parameter.computation_dtype).view(torch.int8)
        parameter.data = torch.cat([scale, blocks[:, 2:].view(torch.int8)], dim=-1).contiguous()
        parameter.baked = True

    @classmethod
    def dequantize_pytorch(cls, x):
        scale = x.data[:, :2].contiguous().view(x.computation_dtype)
        return (x.data[:, 2:] * scale).view(x.shape)


quants_mapping = {GGMLQuantizationType.Q8_0: Q8_0}
