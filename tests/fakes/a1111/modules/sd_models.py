"""Fake of modules/sd_models.py: model_data, load_model / reload_model_weights / load_model_weights
in A1111 1.10.1's order, and get_empty_cond.

Kept: the module-global lookup of ``load_model_weights`` (what an extension patches), ``set_model_type``
flags, ``before_load_weights``/``after_load_weights``, ``load_state_dict(strict=False)``, ``half()``
unless ``--no-half``, lowvram setup before the hijack, the same-config reload into the *same* model
object (undo_hijack → load → hijack → ``model_loaded_callback``, no new empty-prompt cond) and the
"Failed to load checkpoint, restoring previous" path. Not kept: checkpoint hashing and caching,
fp8 storage, VAE loading, meta-device initialisation, downloads.
"""

from __future__ import annotations

import os
import threading

import torch
from modules import (  # noqa: F401
    devices,
    extra_networks,
    lowvram,
    processing,
    script_callbacks,
    sd_hijack,
    sd_models_config,
    sd_models_xl,
    shared,
    shared_options,
)
from safetensors.torch import load_file


class CheckpointInfo:
    def __init__(self, filename, config=None):
        self.filename = filename
        self.name = os.path.basename(filename)
        self.title = self.name
        self.model_name = os.path.splitext(self.name)[0]
        self.short_title = self.model_name
        self.hash = None
        self.sha256 = None
        self.shorthash = None
        self.config = config  # fake: the "<checkpoint>.yaml beside the file"

    def calculate_shorthash(self):
        return self.shorthash


class Timer:
    def record(self, category=None, extra_time=0, disable_log=False):
        pass

    def summary(self):
        return ""


class SkipWritingToConfig:
    skip = False
    previous = None

    def __enter__(self):
        self.previous = SkipWritingToConfig.skip
        SkipWritingToConfig.skip = True
        return self

    def __exit__(self, exc_type, exc_value, exc_traceback):
        SkipWritingToConfig.skip = self.previous


checkpoints_loaded: dict = {}
load_count = 0  # fake: how many times weights went into a model (tests read it)


def get_checkpoint_state_dict(checkpoint_info, timer):
    return load_file(checkpoint_info.filename)


def set_model_type(model, state_dict):
    model.is_sd1 = False
    model.is_sd2 = False
    model.is_sdxl = False
    model.is_ssd = False
    model.is_sd3 = False
    if "model.diffusion_model.x_embedder.proj.weight" in state_dict:
        model.is_sd3 = True
    elif hasattr(model, "conditioner"):
        model.is_sdxl = True
    elif hasattr(model.cond_stage_model, "model"):
        model.is_sd2 = True
    else:
        model.is_sd1 = True


def load_model_weights(model, checkpoint_info, state_dict, timer):
    global load_count
    if not SkipWritingToConfig.skip:
        shared.opts.data["sd_model_checkpoint"] = checkpoint_info.title
    if state_dict is None:
        state_dict = get_checkpoint_state_dict(checkpoint_info, timer)

    set_model_type(model, state_dict)
    if model.is_sdxl:
        sd_models_xl.extend_sdxl(model)

    if hasattr(model, "before_load_weights"):
        model.before_load_weights(state_dict)
    model.load_state_dict(state_dict, strict=False)
    load_count += 1
    if hasattr(model, "after_load_weights"):
        model.after_load_weights(state_dict)
    del state_dict

    if shared.cmd_opts.no_half:
        model.float()
        devices.dtype_unet = torch.float32
    else:
        alphas_cumprod = getattr(model, "alphas_cumprod", None)
        model.alphas_cumprod = None
        model.half()
        model.alphas_cumprod = alphas_cumprod
        devices.dtype_unet = torch.float16

    model.sd_model_checkpoint = checkpoint_info.filename
    model.sd_checkpoint_info = checkpoint_info


class SdModelData:
    def __init__(self):
        self.sd_model = None
        self.loaded_sd_models = []
        self.was_loaded_at_least_once = False
        self.lock = threading.Lock()

    def get_sd_model(self):
        if self.was_loaded_at_least_once:
            return self.sd_model
        if self.sd_model is None:
            with self.lock:
                if self.sd_model is None and not self.was_loaded_at_least_once:
                    load_model()
        return self.sd_model

    def set_sd_model(self, v, already_loaded=False):
        self.sd_model = v
        shared.sd_model = v  # fake: the real shared.sd_model is a property over model_data
        try:
            self.loaded_sd_models.remove(v)
        except ValueError:
            pass
        if v is not None:
            self.loaded_sd_models.insert(0, v)


model_data = SdModelData()


def get_empty_cond(sd_model):
    p = processing.StableDiffusionProcessingTxt2Img()
    extra_networks.activate(p, {})
    if hasattr(sd_model, "get_learned_conditioning"):
        d = sd_model.get_learned_conditioning([""])
    else:
        d = sd_model.cond_stage_model([""])
    if isinstance(d, dict):
        d = d["crossattn"]
    return d


def send_model_to_cpu(m):
    if m is not None:
        if m.lowvram:
            lowvram.send_everything_to_cpu()
        else:
            m.to(devices.cpu)


def model_target_device(m):
    return devices.cpu if lowvram.is_needed(m) else devices.device


def send_model_to_device(m):
    lowvram.apply(m)
    if not m.lowvram:
        m.to(devices.device)


def send_model_to_trash(m):
    m.to(device="meta")


def instantiate_from_config(config, state_dict=None):
    from ldm.util import get_obj_from_str

    params = {**config.get("params", {})}
    if state_dict and "state_dict" in params and params["state_dict"] is None:
        params["state_dict"] = state_dict
    return get_obj_from_str(config["target"])(**params)


def load_model(checkpoint_info=None, already_loaded_state_dict=None):
    timer = Timer()
    if model_data.sd_model:
        send_model_to_trash(model_data.sd_model)
        model_data.sd_model = None

    state_dict = (
        already_loaded_state_dict
        if already_loaded_state_dict is not None
        else get_checkpoint_state_dict(checkpoint_info, timer)
    )
    checkpoint_config = sd_models_config.find_checkpoint_config(state_dict, checkpoint_info)
    sd_model = instantiate_from_config(checkpoint_config, state_dict)
    sd_model.used_config = checkpoint_config

    load_model_weights(sd_model, checkpoint_info, state_dict, timer)
    send_model_to_device(sd_model)
    sd_hijack.model_hijack.hijack(sd_model)
    sd_model.eval()
    model_data.set_sd_model(sd_model)
    model_data.was_loaded_at_least_once = True
    sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)

    script_callbacks.model_loaded_callback(sd_model)

    with devices.autocast(), torch.no_grad():
        sd_model.cond_stage_model_empty_prompt = get_empty_cond(sd_model)
    return sd_model


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    """Same config: weights into the same object. Otherwise a fresh load_model."""
    checkpoint_info = info
    timer = Timer()
    if not sd_model:
        sd_model = model_data.sd_model

    current_checkpoint_info = None if sd_model is None else sd_model.sd_checkpoint_info
    if sd_model is not None and sd_model.sd_model_checkpoint == checkpoint_info.filename and not forced_reload:
        return sd_model

    if sd_model is not None:
        send_model_to_cpu(sd_model)
        sd_hijack.model_hijack.undo_hijack(sd_model)

    state_dict = get_checkpoint_state_dict(checkpoint_info, timer)
    checkpoint_config = sd_models_config.find_checkpoint_config(state_dict, checkpoint_info)

    if sd_model is None or checkpoint_config != sd_model.used_config:
        if sd_model is not None:
            send_model_to_trash(sd_model)
        load_model(checkpoint_info, already_loaded_state_dict=state_dict)
        return model_data.sd_model

    try:
        load_model_weights(sd_model, checkpoint_info, state_dict, timer)
    except Exception:
        print("Failed to load checkpoint, restoring previous")
        load_model_weights(sd_model, current_checkpoint_info, None, timer)
        raise
    finally:
        sd_hijack.model_hijack.hijack(sd_model)
        if not sd_model.lowvram:
            sd_model.to(devices.device)
        script_callbacks.model_loaded_callback(sd_model)

    model_data.set_sd_model(sd_model)
    return sd_model
