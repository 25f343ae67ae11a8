"""Fake of ldm/models/diffusion/ddpm.py: ``LatentDiffusion`` as A1111 sees it for SD1/SD2: a
``cond_stage_model`` built from ``cond_stage_config`` and ``get_learned_conditioning``."""

from __future__ import annotations

import torch
from ldm.util import instantiate_from_config


class DiffusionWrapper(torch.nn.Module):
    def __init__(self, diff_model_config, conditioning_key=None):
        super().__init__()
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key


class LatentDiffusion(torch.nn.Module):
    def __init__(
        self,
        first_stage_config,
        cond_stage_config,
        unet_config,
        cond_stage_key="txt",
        conditioning_key="crossattn",
        parameterization="eps",
        **kwargs,
    ):
        super().__init__()
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.first_stage_model = instantiate_from_config(first_stage_config)
        self.cond_stage_model = instantiate_from_config(cond_stage_config)
        self.cond_stage_key = cond_stage_key
        self.cond_stage_forward = None
        self.parameterization = parameterization
        self.register_buffer("alphas_cumprod", torch.linspace(0.99, 0.01, 10))

    def get_learned_conditioning(self, c):
        if self.cond_stage_forward is None:
            if hasattr(self.cond_stage_model, "encode") and callable(self.cond_stage_model.encode):
                return self.cond_stage_model.encode(c)
            return self.cond_stage_model(c)
        return getattr(self.cond_stage_model, self.cond_stage_forward)(c)
