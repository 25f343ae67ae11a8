"""Fake of modules/sd_models.py (Forge): the lazily loaded model and ``forge_model_reload``.

Before the first generation ``model_data.sd_model`` is a ``FakeInitialModel``. ``forge_model_reload``
rebuilds the whole model (new objects) whenever ``forge_loading_parameters`` changed, then fires
``model_loaded_callback``.
"""

import math
import os

from modules import script_callbacks, shared


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        self.name = self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.title = self.name
        self.sha256 = None

    def calculate_shorthash(self):
        return "0123456789"


checkpoints_list = {}
checkpoint_aliases = {}


def register_checkpoint(filename):
    info = CheckpointInfo(filename)
    checkpoints_list[info.title] = checkpoint_aliases[info.title] = info
    return info


def select_checkpoint():
    return checkpoint_aliases.get(shared.opts.data.get("sd_model_checkpoint"))


class FakeInitialModel:
    def __init__(self):
        self.cond_stage_model = None
        self.chunk_length = 75

    def get_prompt_lengths_on_ui(self, prompt):
        r = len(prompt.strip("!,. ").replace(" ", ",").split(","))
        return r, math.ceil(max(r, 1) / self.chunk_length) * self.chunk_length


class SdModelData:
    def __init__(self):
        self.sd_model = FakeInitialModel()
        self.forge_loading_parameters = {}
        self.forge_hash = ""

    def get_sd_model(self):
        return self.sd_model

    def set_sd_model(self, v):
        self.sd_model = v
        shared.sd_model = v  # Forge's shared.sd_model is a property reading model_data


model_data = SdModelData()
shared.sd_model = model_data.sd_model


def forge_model_reload():
    from backend import memory_management
    from backend.loader import forge_loader

    current_hash = str(model_data.forge_loading_parameters)
    if model_data.forge_hash == current_hash:
        return model_data.sd_model, False
    if model_data.sd_model:
        model_data.sd_model = None
        memory_management.unload_all_models()
    checkpoint_info = model_data.forge_loading_parameters["checkpoint_info"]
    if checkpoint_info is None:
        raise ValueError("You do not have any model! Please download at least one model in [models/Stable-diffusion].")
    additional = model_data.forge_loading_parameters.get("additional_modules", [])
    sd_model = forge_loader(checkpoint_info.filename, additional_state_dicts=additional)
    sd_model.extra_generation_params = {}
    sd_model.comments = []
    sd_model.sd_checkpoint_info = checkpoint_info
    sd_model.filename = checkpoint_info.filename
    sd_model.sd_model_hash = checkpoint_info.calculate_shorthash()
    model_data.set_sd_model(sd_model)
    script_callbacks.model_loaded_callback(sd_model)
    model_data.forge_hash = current_hash
    return sd_model, True
