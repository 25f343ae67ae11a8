from .diffusion import DiffusionEngine  # noqa: F401
