"""Fake of backend/operations_gguf.py: ``ParameterGGUF`` — a Parameter holding a GGUF tensor's raw bytes
(``torch.tensor(reader_tensor.data)``), recognised elsewhere by its ``gguf_cls`` attribute (None for the
F32/F16 types Forge leaves as they are) and reporting the logical ``real_shape``; and Forge's decoders.

Forge's GGUF decoders (its vendored gguf-py, ``packages_3rdparty/gguf/quants.py``): a ParameterGGUF is
baked once (Q8_0: the block scale converted to ``computation_dtype``), then dequantised in
``computation_dtype`` (fp16 unless Forge's text-encoder dtype is bf16), rounding after each operation.
Written here from that behaviour.
"""

import gguf
import torch


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
        if not x.baked:
            raise ValueError("GGUF Tensor is not baked!")
        scale = x.data[:, :2].contiguous().view(x.computation_dtype)
        return (x.data[:, 2:] * scale).view(x.shape)


quants_mapping = {gguf.GGMLQuantizationType.Q8_0: Q8_0}


class ParameterGGUF(torch.nn.Parameter):
    def __init__(self, tensor=None, requires_grad=False, no_init=False):
        super().__init__()
        if no_init:
            return
        self.gguf_cls = quants_mapping.get(tensor.tensor_type)
        self.real_shape = torch.Size(reversed([int(n) for n in tensor.shape]))
        self.computation_dtype = torch.float16
        self.baked = False

    @property
    def shape(self):
        return self.real_shape

    def __new__(cls, tensor=None, requires_grad=False, no_init=False):
        return super().__new__(cls, torch.tensor(tensor.data), requires_grad=requires_grad)

    def dequantize_as_pytorch_parameter(self):
        if self.gguf_cls is not None:
            self.gguf_cls.bake(self)
        return torch.nn.Parameter(dequantize_tensor(self), requires_grad=False)

    def copy_with_data(self, data):
        new = ParameterGGUF(data, no_init=True)
        new.gguf_cls = self.gguf_cls
        new.real_shape = self.real_shape
        new.computation_dtype = self.computation_dtype
        new.baked = self.baked
        return new

    def to(self, *args, **kwargs):
        return self.copy_with_data(self.data.to(*args, **kwargs))


def dequantize_tensor(tensor):
    if tensor is None or getattr(tensor, "gguf_cls", None) is None:
        return tensor
    return tensor.gguf_cls.dequantize_pytorch(tensor)
