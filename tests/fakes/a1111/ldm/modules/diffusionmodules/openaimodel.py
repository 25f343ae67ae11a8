"""Fake of the ldm/sgm UNet: only the attribute names A1111 touches around text encoding
(``time_embed``, ``input_blocks``, ``middle_block``, ``output_blocks`` for lowvram; the
``input_blocks.0.0.weight`` key A1111's config guess reads). It computes nothing useful."""

import torch


class UNetModel(torch.nn.Module):
    def __init__(self, in_channels=4, model_channels=4, **kwargs):
        super().__init__()
        self.time_embed = torch.nn.Sequential(torch.nn.Linear(model_channels, model_channels))
        self.input_blocks = torch.nn.ModuleList(
            [torch.nn.ModuleList([torch.nn.Conv2d(in_channels, model_channels, 1)])]
        )
        self.middle_block = torch.nn.Sequential(torch.nn.Conv2d(model_channels, model_channels, 1))
        self.output_blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Conv2d(model_channels, in_channels, 1))])
