"""Fake of sgm/modules/diffusionmodules/denoiser_scaling.py: the classes extend_sdxl tests for."""


class EpsScaling:
    pass


class VScaling:
    pass
