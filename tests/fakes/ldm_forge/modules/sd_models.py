"""Fake of the ldm_patched Forges' modules/sd_models.py: every load builds new objects through
``forge_loader.load_model_for_a1111``, then ``model_loaded_callback``, then the empty-prompt cond.
(reForge also keeps several models and switches without a callback; Forge Classic keeps one.)"""

from __future__ import annotations

import os
import threading

import torch
from modules import devices, extra_networks, processing, script_callbacks, sd_models_xl, shared  # noqa: F401
from modules_forge import forge_loader
from safetensors.torch import load_file


class CheckpointInfo:
    def __init__(self, filename, config=None):
        self.filename = filename
        self.name = os.path.basename(filename)
        self.name_for_extra = os.path.splitext(self.name)[0]
        self.model_name = self.name_for_extra
        self.title = self.name
        self.shorthash = f"{abs(hash(filename)) % 16**10:010x}"
        self.config = config

    def calculate_shorthash(self):
        return self.shorthash


class Timer:
    def record(self, category=None, extra_time=0, disable_log=False):
        pass


def get_checkpoint_state_dict(checkpoint_info, timer):
    return load_file(checkpoint_info.filename)


class SdModelData:
    def __init__(self):
        self.sd_model = None
        self.loaded_sd_models = []
        self.was_loaded_at_least_once = False
        self.lock = threading.Lock()

    def get_sd_model(self):
        return self.sd_model

    def set_sd_model(self, v, already_loaded=False):
        self.sd_model = v
        shared.sd_model = v  # fake: the real shared.sd_model is a property over model_data


model_data = SdModelData()


def instantiate_from_config(config, state_dict=None):
    from ldm.util import get_obj_from_str

    return get_obj_from_str(config["target"])(**config.get("params", {}))


def get_empty_cond(sd_model):
    p = processing.StableDiffusionProcessingTxt2Img()
    extra_networks.activate(p, {})
    d = sd_model.get_learned_conditioning([""])
    return d["crossattn"] if isinstance(d, dict) else d


def load_model(checkpoint_info=None, already_loaded_state_dict=None, forced_reload=False):
    timer = Timer()
    state_dict = already_loaded_state_dict or get_checkpoint_state_dict(checkpoint_info, timer)
    sd_model = forge_loader.load_model_for_a1111(timer=timer, checkpoint_info=checkpoint_info, state_dict=state_dict)
    sd_model.filename = checkpoint_info.filename
    model_data.set_sd_model(sd_model)
    model_data.was_loaded_at_least_once = True
    script_callbacks.model_loaded_callback(sd_model)
    with torch.no_grad():
        sd_model.cond_stage_model_empty_prompt = get_empty_cond(sd_model)
    return sd_model


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    return load_model(info, forced_reload=forced_reload)
