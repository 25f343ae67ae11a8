"""Fake of modules/processing.py (Forge): cond caching, setup_conds and the process_images skeleton.

Kept as in Forge: three-element class-level caches that instances alias, ``cached_params`` without
any text-encoder identity, ``set_clip_skip(int(opts.CLIP_stop_at_last_layers))`` right before each
encode, ``clear_prompt_cache``, ``override_settings`` applied by ``set_config`` after
``before_process`` and restored afterwards, ``forge_model_reload`` per batch, infotext "Clip skip".
Sampling, images and scripts beyond ``before_process`` are not modelled.
"""

from typing import ClassVar

import modules_forge.shared_options  # noqa: F401  (Forge's options exist once processing is imported)
from modules import devices, prompt_parser, sd_models, shared
from modules.shared import opts
from modules.sysinfo import set_config

need_global_unload = False


class StableDiffusionProcessing:
    cached_uc: ClassVar[list] = [None, None, None]
    cached_c: ClassVar[list] = [None, None, None]

    def __init__(
        self,
        prompt="",
        negative_prompt="",
        width=512,
        height=512,
        steps=20,
        cfg_scale=7.0,
        batch_size=1,
        n_iter=1,
        distilled_cfg_scale=3.5,
        override_settings=None,
        override_settings_restore_afterwards=True,
        scripts=None,
    ):
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.width = width
        self.height = height
        self.steps = steps
        self.cfg_scale = cfg_scale
        self.batch_size = batch_size
        self.n_iter = n_iter
        self.distilled_cfg_scale = distilled_cfg_scale
        self.hr_distilled_cfg = distilled_cfg_scale
        self.override_settings = override_settings or {}
        self.override_settings_restore_afterwards = override_settings_restore_afterwards
        self.scripts = scripts
        self.extra_generation_params = {}
        self.extra_network_data = {}
        self.c = self.uc = None
        self.cached_uc = StableDiffusionProcessing.cached_uc
        self.cached_c = StableDiffusionProcessing.cached_c

    def clear_prompt_cache(self):
        self.cached_c = [None, None, None]
        self.cached_uc = [None, None, None]
        StableDiffusionProcessing.cached_c = [None, None, None]
        StableDiffusionProcessing.cached_uc = [None, None, None]

    def setup_prompts(self):
        self.all_prompts = self.batch_size * self.n_iter * [self.prompt]
        self.all_negative_prompts = [self.negative_prompt] * len(self.all_prompts)

    def cached_params(self, required_prompts, steps, extra_network_data, hires_steps=None, use_old_scheduling=False):
        """Returns parameters that invalidate the cond cache if changed"""
        return (
            required_prompts,
            self.distilled_cfg_scale,
            self.hr_distilled_cfg,
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
                if len(cache) > 2:
                    shared.sd_model.extra_generation_params.update(cache[2])
                return cache[1]
        cache = caches[0]
        with devices.autocast():
            shared.sd_model.set_clip_skip(int(opts.CLIP_stop_at_last_layers))
            cache[1] = function(shared.sd_model, required_prompts, steps, hires_steps, opts.use_old_scheduling)
            import backend.text_processing.classic_engine

            last = backend.text_processing.classic_engine.last_extra_generation_params.copy()
            shared.sd_model.extra_generation_params.update(last)
            if len(cache) > 2:
                cache[2] = last
            backend.text_processing.classic_engine.last_extra_generation_params = {}
        cache[0] = cached_params
        return cache[1]

    def setup_conds(self):
        prompts = prompt_parser.SdConditioning(self.prompts, width=self.width, height=self.height)
        negative = prompt_parser.SdConditioning(
            self.negative_prompts, width=self.width, height=self.height, is_negative_prompt=True
        )
        if self.cfg_scale == 1:
            self.uc = None
        else:
            self.uc = self.get_conds_with_caching(
                prompt_parser.get_learned_conditioning, negative, self.steps, [self.cached_uc], self.extra_network_data
            )
        self.c = self.get_conds_with_caching(
            prompt_parser.get_multicond_learned_conditioning,
            prompts,
            self.steps,
            [self.cached_c],
            self.extra_network_data,
        )

    def close(self):
        self.c = self.uc = None
        if not opts.persistent_cond_cache:
            StableDiffusionProcessing.cached_c = [None, None]
            StableDiffusionProcessing.cached_uc = [None, None]


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    cached_hr_uc: ClassVar[list] = [None, None, None]
    cached_hr_c: ClassVar[list] = [None, None, None]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cached_hr_uc = StableDiffusionProcessingTxt2Img.cached_hr_uc
        self.cached_hr_c = StableDiffusionProcessingTxt2Img.cached_hr_c

    def calculate_hr_conds(self):
        hr_prompts = prompt_parser.SdConditioning(self.prompts, width=self.width, height=self.height)
        self.hr_c = self.get_conds_with_caching(
            prompt_parser.get_multicond_learned_conditioning,
            hr_prompts,
            self.steps,
            [self.cached_hr_c, self.cached_c],
            self.extra_network_data,
            self.steps,
        )


class Processed:
    def __init__(self, p, infotexts):
        self.infotexts = infotexts
        self.clip_skip = int(opts.CLIP_stop_at_last_layers)
        self.c, self.uc = p.c, p.uc


def create_infotext(p):
    clip_skip = int(getattr(p, "clip_skip", opts.CLIP_stop_at_last_layers))
    params = {"Steps": p.steps, "Clip skip": None if clip_skip <= 1 else clip_skip, **p.extra_generation_params}
    return f"{p.prompt}\n" + ", ".join(f"{k}: {v}" for k, v in params.items() if v is not None)


def manage_model_and_prompt_cache(p):
    global need_global_unload
    from backend import memory_management

    p.sd_model, just_reloaded = sd_models.forge_model_reload()
    if need_global_unload and not just_reloaded:
        memory_management.unload_all_models()
    if need_global_unload:
        p.clear_prompt_cache()
    need_global_unload = False


def process_images(p):
    if p.scripts is not None:
        p.scripts.before_process(p)
    stored_opts = {
        k: opts.data[k] if k in opts.data else opts.get_default(k) for k in p.override_settings if k in opts.data
    }
    try:
        set_config(p.override_settings, is_api=True, run_callbacks=False, save_config=False)
        manage_model_and_prompt_cache(p)
        p.setup_prompts()
        infotexts = []
        for n in range(p.n_iter):
            sd_models.forge_model_reload()
            p.sd_model.forge_objects = p.sd_model.forge_objects_original.shallow_copy()
            p.prompts = p.all_prompts[n * p.batch_size : (n + 1) * p.batch_size]
            p.negative_prompts = p.all_negative_prompts[n * p.batch_size : (n + 1) * p.batch_size]
            p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()
            p.setup_conds()
            infotexts.append(create_infotext(p))
        return Processed(p, infotexts)
    finally:
        if p.override_settings_restore_afterwards:
            set_config(stored_opts, save_config=False)
