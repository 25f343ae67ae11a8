from ldm.modules.diffusionmodules.openaimodel import UNetModel  # noqa: F401  (same stand-in)
