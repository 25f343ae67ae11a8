"""Fake of modules/models/sd3/sd3_model.py: ``SD3Inferencer`` around ``SD3Cond`` (``text_encoders``,
``cond_stage_model`` property, ``before_load_weights``, ``medvram_fields``). The MMDiT is a stand-in
holding the ``x_embedder.proj`` key A1111 recognises SD3 checkpoints by."""

from __future__ import annotations

import contextlib

import torch
from modules import devices
from modules.models.sd3.sd3_cond import SD3Cond


class _XEmbedder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(16, 8, 2, stride=2)


class _MMDiT(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.x_embedder = _XEmbedder()


class BaseModel(torch.nn.Module):
    def __init__(self, shift=1.0, device=None, dtype=torch.float32, state_dict=None, prefix=""):
        super().__init__()
        self.diffusion_model = _MMDiT().to(device=device, dtype=dtype)


class SDVAE(torch.nn.Module):
    def __init__(self, dtype=torch.float32, device=None):
        super().__init__()
        self.decoder = torch.nn.Conv2d(16, 3, 1)
        self.encoder = torch.nn.Conv2d(3, 16, 1)

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return self.decoder(z)


class SD3Inferencer(torch.nn.Module):
    def __init__(self, state_dict, shift=3, use_ema=False):
        super().__init__()
        self.shift = shift
        with torch.no_grad():
            self.model = BaseModel(
                shift=shift, state_dict=state_dict, prefix="model.diffusion_model.", device="cpu", dtype=devices.dtype
            )
            self.first_stage_model = SDVAE(device="cpu", dtype=devices.dtype_vae)
        self.alphas_cumprod = torch.linspace(0.99, 0.01, 10)
        self.text_encoders = SD3Cond()
        self.cond_stage_key = "txt"
        self.parameterization = "eps"
        self.model.conditioning_key = "crossattn"
        self.latent_channels = 16

    @property
    def cond_stage_model(self):
        return self.text_encoders

    def before_load_weights(self, state_dict):
        self.cond_stage_model.before_load_weights(state_dict)

    def ema_scope(self):
        return contextlib.nullcontext()

    def get_learned_conditioning(self, batch: list[str]):
        return self.cond_stage_model(batch)

    def medvram_fields(self):
        return [(self, "first_stage_model"), (self, "text_encoders"), (self, "model")]
