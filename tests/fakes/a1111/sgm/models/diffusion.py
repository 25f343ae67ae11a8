"""Fake of sgm/models/diffusion.py: ``DiffusionEngine`` with the attributes A1111 reads
(``conditioner``, ``model.diffusion_model``, ``denoiser.scaling``, ``first_stage_model``)."""

from __future__ import annotations

import torch

from sgm.modules import UNCONDITIONAL_CONFIG
from sgm.util import default, instantiate_from_config


class OpenAIWrapper(torch.nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model


class DiffusionEngine(torch.nn.Module):
    def __init__(self, network_config, denoiser_config, first_stage_config, conditioner_config=None, **kwargs):
        super().__init__()
        self.model = OpenAIWrapper(instantiate_from_config(network_config))
        self.denoiser = instantiate_from_config(denoiser_config)
        self.conditioner = instantiate_from_config(default(conditioner_config, UNCONDITIONAL_CONFIG))
        self.first_stage_model = instantiate_from_config(first_stage_config)
