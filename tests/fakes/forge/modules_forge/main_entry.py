"""Fake of modules_forge/main_entry.py: what ``sysinfo.set_config`` calls for checkpoint/module options,
and the preset handler that resets Forge's own Clip skip slider to 1."""

import os

from modules import processing, shared

module_list = {}


def refresh_model_loading_parameters():
    from modules.sd_models import model_data, select_checkpoint

    model_data.forge_loading_parameters = {
        "checkpoint_info": select_checkpoint(),
        "additional_modules": shared.opts.forge_additional_modules,
        "unet_storage_dtype": None,
    }
    processing.need_global_unload = True


def checkpoint_change(ckpt_name, save=True, refresh=True):
    if ckpt_name == shared.opts.data.get("sd_model_checkpoint"):
        return False
    shared.opts.set("sd_model_checkpoint", ckpt_name)
    if refresh:
        refresh_model_loading_parameters()
    return True


def modules_change(module_values, save=True, refresh=True):
    modules = [module_list[os.path.basename(v)] for v in module_values if os.path.basename(v) in module_list]
    if sorted(modules) == sorted(shared.opts.data.get("forge_additional_modules", [])):
        return False
    shared.opts.set("forge_additional_modules", modules)
    if refresh:
        refresh_model_loading_parameters()
    return True


def on_preset_change(preset=None):
    """The real one returns gradio updates; the bound Clip skip slider ends up at 1 in every preset."""
    shared.opts.set("CLIP_stop_at_last_layers", 1)
