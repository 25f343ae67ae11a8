"""Fake of modules/processing.py: the cond cache of A1111 1.10.1 and ``process_images``' order.

``cached_c``/``cached_uc`` (and txt2img's ``cached_hr_c``/``cached_hr_uc``) are class-level
``[params, conds]`` lists shared by every processing object; ``get_conds_with_caching`` reuses a
cond when ``cached_params(...)`` compares equal. ``setup_conds``/``calculate_hr_conds`` call it the
way A1111 does. ``process_images`` runs the script hooks, override settings and per-batch conds in
A1111's order (a superset of tests/fakes/common's processing, which this file shadows); no
sampling, no images, no per-batch checkpoint reload.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from modules import devices, extra_networks, prompt_parser, shared, shared_options  # noqa: F401
from modules.shared import opts, state


@dataclass(repr=False)
class StableDiffusionProcessing:
    sd_model: object = None
    prompt: str = ""
    negative_prompt: str = ""
    styles: list = None
    seed: int = -1
    sampler_name: str = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    extra_generation_params: dict = None
    override_settings: dict = None
    override_settings_restore_afterwards: bool = True
    disable_extra_networks: bool = False
    scripts: Any = None
    script_args: Any = None

    cached_uc: ClassVar = [None, None]
    cached_c: ClassVar = [None, None]

    c: Any = field(default=None, init=False)
    uc: Any = field(default=None, init=False)
    prompts: list = field(default=None, init=False)
    negative_prompts: list = field(default=None, init=False)
    all_prompts: list = field(default=None, init=False)
    all_negative_prompts: list = field(default=None, init=False)
    extra_network_data: dict = field(default=None, init=False)
    firstpass_steps: int = field(default=0, init=False)
    step_multiplier: int = field(default=1, init=False)
    comments: dict = field(default=None, init=False)
    iteration: int = field(default=0, init=False)

    def __post_init__(self):
        self.styles = self.styles or []
        self.extra_generation_params = self.extra_generation_params or {}
        self.override_settings = self.override_settings or {}
        self.script_args = self.script_args or []
        self.comments = {}
        self.sd_model = self.sd_model or shared.sd_model
        self.cached_uc = StableDiffusionProcessing.cached_uc
        self.cached_c = StableDiffusionProcessing.cached_c

    def close(self):
        self.c = None
        self.uc = None
        if not opts.persistent_cond_cache:
            StableDiffusionProcessing.cached_c = [None, None]
            StableDiffusionProcessing.cached_uc = [None, None]

    def comment(self, text):
        self.comments[text] = 1

    def setup_prompts(self):
        self.all_prompts = self.batch_size * self.n_iter * [self.prompt]
        self.all_negative_prompts = [self.negative_prompt] * len(self.all_prompts)
        self.prompts = self.all_prompts[: self.batch_size]
        self.negative_prompts = self.all_negative_prompts[: self.batch_size]
        self.extra_network_data = {}

    def cached_params(self, required_prompts, steps, extra_network_data, hires_steps=None, use_old_scheduling=False):
        """Returns parameters that invalidate the cond cache if changed"""
        return (
            required_prompts,
            steps,
            hires_steps,
            use_old_scheduling,
            opts.CLIP_stop_at_last_layers,
            shared.sd_model.sd_checkpoint_info,
            extra_network_data,
            opts.sdxl_crop_left,
            opts.sdxl_crop_top,
            self.width,
            self.height,
            opts.fp8_storage,
            opts.cache_fp16_weight,
            opts.emphasis,
        )

    def get_conds_with_caching(self, function, required_prompts, steps, caches, extra_network_data, hires_steps=None):
        cached_params = self.cached_params(
            required_prompts, steps, extra_network_data, hires_steps, opts.use_old_scheduling
        )
        for cache in caches:
            if cache[0] is not None and cached_params == cache[0]:
                return cache[1]
        cache = caches[0]
        with devices.autocast():
            cache[1] = function(shared.sd_model, required_prompts, steps, hires_steps, opts.use_old_scheduling)
        cache[0] = cached_params
        return cache[1]

    def setup_conds(self):
        prompts = prompt_parser.SdConditioning(self.prompts, width=self.width, height=self.height)
        negative_prompts = prompt_parser.SdConditioning(
            self.negative_prompts, width=self.width, height=self.height, is_negative_prompt=True
        )
        total_steps = self.steps
        self.firstpass_steps = total_steps
        self.uc = self.get_conds_with_caching(
            prompt_parser.get_learned_conditioning,
            negative_prompts,
            total_steps,
            [self.cached_uc],
            self.extra_network_data,
        )
        self.c = self.get_conds_with_caching(
            prompt_parser.get_multicond_learned_conditioning,
            prompts,
            total_steps,
            [self.cached_c],
            self.extra_network_data,
        )

    def get_conds(self):
        return self.c, self.uc


@dataclass(repr=False)
class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    enable_hr: bool = False
    hr_second_pass_steps: int = 0
    hr_prompt: str = ""
    hr_negative_prompt: str = ""

    cached_hr_uc: ClassVar = [None, None]
    cached_hr_c: ClassVar = [None, None]

    hr_c: Any = field(default=None, init=False)
    hr_uc: Any = field(default=None, init=False)
    hr_prompts: list = field(default=None, init=False)
    hr_negative_prompts: list = field(default=None, init=False)
    hr_extra_network_data: dict = field(default=None, init=False)
    is_hr_pass: bool = field(default=False, init=False)
    hr_upscale_to_x: int = field(default=0, init=False)
    hr_upscale_to_y: int = field(default=0, init=False)

    def __post_init__(self):
        super().__post_init__()
        self.cached_hr_uc = StableDiffusionProcessingTxt2Img.cached_hr_uc
        self.cached_hr_c = StableDiffusionProcessingTxt2Img.cached_hr_c

    def close(self):
        super().close()
        self.hr_c = None
        self.hr_uc = None
        if not opts.persistent_cond_cache:
            StableDiffusionProcessingTxt2Img.cached_hr_uc = [None, None]
            StableDiffusionProcessingTxt2Img.cached_hr_c = [None, None]

    def setup_prompts(self):
        super().setup_prompts()
        if self.enable_hr:
            self.hr_prompts = [self.hr_prompt or self.prompt] * self.batch_size
            self.hr_negative_prompts = [self.hr_negative_prompt or self.negative_prompt] * self.batch_size
            self.hr_extra_network_data = {}
            self.hr_upscale_to_x, self.hr_upscale_to_y = self.width * 2, self.height * 2

    def calculate_hr_conds(self):
        if self.hr_c is not None:
            return
        hr_prompts = prompt_parser.SdConditioning(
            self.hr_prompts, width=self.hr_upscale_to_x, height=self.hr_upscale_to_y
        )
        hr_negative_prompts = prompt_parser.SdConditioning(
            self.hr_negative_prompts, width=self.hr_upscale_to_x, height=self.hr_upscale_to_y, is_negative_prompt=True
        )
        total_steps = self.hr_second_pass_steps or self.steps
        self.hr_uc = self.get_conds_with_caching(
            prompt_parser.get_learned_conditioning,
            hr_negative_prompts,
            self.firstpass_steps,
            [self.cached_hr_uc, self.cached_uc],
            self.hr_extra_network_data,
            total_steps,
        )
        self.hr_c = self.get_conds_with_caching(
            prompt_parser.get_multicond_learned_conditioning,
            hr_prompts,
            self.firstpass_steps,
            [self.cached_hr_c, self.cached_c],
            self.hr_extra_network_data,
            total_steps,
        )

    def setup_conds(self):
        if self.is_hr_pass:
            self.hr_c = None
            self.calculate_hr_conds()
            return
        super().setup_conds()
        self.hr_uc = None
        self.hr_c = None


@dataclass(repr=False)
class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    denoising_strength: float = 0.75


class Processed:
    def __init__(self, p, images_list, info=""):
        self.images = images_list
        self.info = info
        self.comments = "".join(f"{comment}\n" for comment in p.comments)
        self.extra_generation_params = p.extra_generation_params


def process_images(p):
    """before_process → override settings (restored afterwards) → process_images_inner."""
    if p.scripts is not None:
        p.scripts.before_process(p)
    stored_opts = {
        k: opts.data[k] if k in opts.data else opts.get_default(k) for k in p.override_settings if k in opts.data
    }
    try:
        for k, v in p.override_settings.items():
            opts.set(k, v, is_api=True, run_callbacks=False)
        return process_images_inner(p)
    finally:
        if p.override_settings_restore_afterwards:
            for k, v in stored_opts.items():
                setattr(opts, k, v)


def process_images_inner(p):
    """setup_prompts → scripts.process → per batch: process_batch, extra networks, conds → postprocess."""
    p.setup_prompts()
    if p.scripts is not None:
        p.scripts.process(p)
    images = []
    for n in range(p.n_iter):
        p.iteration = n
        if state.interrupted or getattr(state, "stopping_generation", False):
            break
        p.prompts = p.all_prompts[n * p.batch_size : (n + 1) * p.batch_size]
        p.negative_prompts = p.all_negative_prompts[n * p.batch_size : (n + 1) * p.batch_size]
        if p.scripts is not None:
            p.scripts.process_batch(p, batch_number=n, prompts=p.prompts)
        if not p.disable_extra_networks:
            extra_networks.activate(p, p.extra_network_data)
        p.setup_conds()
        images.append(f"image-{n}")
    res = Processed(p, images)
    if p.scripts is not None:
        p.scripts.postprocess(p, res)
    return res
