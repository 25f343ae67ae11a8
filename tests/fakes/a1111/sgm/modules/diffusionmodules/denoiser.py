"""Fake of sgm's denoiser: holds the scaling extend_sdxl inspects."""

import torch
from sgm.util import instantiate_from_config


class DiscreteDenoiser(torch.nn.Module):
    def __init__(self, scaling_config, **kwargs):
        super().__init__()
        self.scaling = instantiate_from_config(scaling_config)
