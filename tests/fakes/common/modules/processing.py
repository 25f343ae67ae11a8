"""Fake of modules/processing.py: the processing object and ``process_images`` in the real order
(A1111 1.10.1 / Forge 2): before_process -> override_settings applied (no onchange) -> setup_prompts ->
process -> per batch: stop if interrupted, process_batch, conds -> postprocess -> overrides restored."""

from __future__ import annotations

from typing import ClassVar

from modules import shared
from modules.shared import opts, state


class StableDiffusionProcessing:
    cached_c: ClassVar[list] = [None, None]  # class-level, shared by every p (as in the WebUI)
    cached_uc: ClassVar[list] = [None, None]

    def __init__(
        self,
        prompt="",
        negative_prompt="",
        n_iter=1,
        override_settings=None,
        override_settings_restore_afterwards=True,
        extra_generation_params=None,
        **kwargs,
    ):
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.n_iter = n_iter
        self.override_settings = dict(override_settings or {})
        self.override_settings_restore_afterwards = override_settings_restore_afterwards
        self.extra_generation_params = dict(extra_generation_params or {})
        self.comments = {}
        self.scripts = None
        self.script_args = []
        self.sd_model = shared.sd_model
        self.conds_made = 0
        self.closed = False
        for k, v in kwargs.items():
            setattr(self, k, v)

    def comment(self, text):
        self.comments[text] = 1

    def setup_prompts(self):
        """The real one also applies styles; every batch gets its prompt (a list gives one per image)."""
        n = self.n_iter * getattr(self, "batch_size", 1)
        self.all_prompts = list(self.prompt) if isinstance(self.prompt, list) else [self.prompt] * n
        negative = self.negative_prompt
        self.all_negative_prompts = list(negative) if isinstance(negative, list) else [negative] * n

    def setup_conds(self):
        self.conds_made += 1

    def close(self):
        self.closed = True
        self.c = None
        self.uc = None


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    def close(self):
        super().close()
        self.hr_c = None
        self.hr_uc = None


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    pass


class Processed:
    def __init__(self, p, images_list, info=""):
        self.images = images_list
        self.info = info
        self.comments = "".join(f"{comment}\n" for comment in p.comments)
        self.extra_generation_params = p.extra_generation_params


def process_images(p):
    if p.scripts is not None:
        p.scripts.before_process(p)
    stored_opts = {
        k: opts.data[k] if k in opts.data else opts.get_default(k) for k in p.override_settings if k in opts.data
    }
    try:
        for k, v in p.override_settings.items():
            opts.set(k, v, is_api=True, run_callbacks=False)
        res = process_images_inner(p)
    finally:
        if p.override_settings_restore_afterwards:
            for k, v in stored_opts.items():
                setattr(opts, k, v)
    return res


def process_images_inner(p):
    p.setup_prompts()
    if p.scripts is not None:
        p.scripts.process(p)
    images = []
    for n in range(p.n_iter):
        if state.interrupted or state.stopping_generation:
            break
        if p.scripts is not None:
            p.scripts.process_batch(p, batch_number=n)
        p.setup_conds()
        images.append(f"image-{n}")
    res = Processed(p, images)
    if p.scripts is not None:
        p.scripts.postprocess(p, res)
    return res
