"""Fake first-stage model: ``encode``/``decode`` exist (lowvram wraps them), nothing more."""

import torch


class AutoencoderKL(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.decoder = torch.nn.Conv2d(4, 3, 1)
        self.encoder = torch.nn.Conv2d(3, 4, 1)

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return self.decoder(z)
