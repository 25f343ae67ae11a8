"""TE Switch: CLIP Skip and text-encoder swap for Stable Diffusion WebUIs and diffusers."""

__version__ = "0.1.0"
