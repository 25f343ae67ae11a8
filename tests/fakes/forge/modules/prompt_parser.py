"""Fake of modules/prompt_parser.py: ``SdConditioning`` and the two entry points Forge's processing uses.

Prompt editing/scheduling is not modelled: every prompt gets one conditioning for all steps, which is
all the cond cache and the text encoders see.
"""


class SdConditioning(list):
    def __init__(
        self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None, distilled_cfg_scale=None
    ):
        super().__init__()
        self.extend(prompts)
        if copy_from is None:
            copy_from = prompts
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, "is_negative_prompt", False)
        self.width = width or getattr(copy_from, "width", None)
        self.height = height or getattr(copy_from, "height", None)
        self.distilled_cfg_scale = distilled_cfg_scale or getattr(copy_from, "distilled_cfg_scale", None)


def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    return model.get_learned_conditioning(prompts)


def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    return model.get_learned_conditioning(prompts)
