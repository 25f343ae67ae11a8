"""Fake of modules/sd_models_config.py: the config a checkpoint loads with.

Configs are dicts (the YAML files' ``model:`` node). A ``config`` attached to a CheckpointInfo
plays the part of a ``<checkpoint>.yaml`` beside the file; otherwise the config is guessed from
the checkpoint's keys like A1111 does (key presence only: the fake towers are narrow).
"""

from __future__ import annotations

import copy

CLIP_L = "openai/clip-vit-large-patch14"
_UNET = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {}}
_VAE = {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {}}


def _sd(cond_stage_config):
    return {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "cond_stage_key": "txt",
            "unet_config": _UNET,
            "first_stage_config": _VAE,
            "cond_stage_config": cond_stage_config,
        },
    }


def _size_embedders(keys):
    return [
        {
            "is_trainable": False,
            "input_key": key,
            "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
            "params": {"outdim": 8},
        }
        for key in keys
    ]


_G = {
    "is_trainable": False,
    "input_key": "txt",
    "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
    "params": {
        "arch": "ViT-bigG-14",
        "version": "laion2b_s39b_b160k",
        "freeze": True,
        "layer": "penultimate",
        "always_return_pooled": True,
        "legacy": False,
    },
}
_L = {
    "is_trainable": False,
    "input_key": "txt",
    "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
    "params": {"layer": "hidden", "layer_idx": 11},
}


def _sdxl(embedders):
    return {
        "target": "sgm.models.diffusion.DiffusionEngine",
        "params": {
            "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": {}},
            "denoiser_config": {
                "target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser",
                "params": {"scaling_config": {"target": "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"}},
            },
            "first_stage_config": _VAE,
            "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": embedders}},
        },
    }


config_default = _sd({"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"})  # v1-inference.yaml
config_sd2 = _sd(
    {
        "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
        "params": {"freeze": True, "layer": "penultimate"},
    }
)
config_sdxl = _sdxl(
    [_L, _G, *_size_embedders(["original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"])]
)
config_sdxl_refiner = _sdxl(
    [_G, *_size_embedders(["original_size_as_tuple", "crop_coords_top_left", "aesthetic_score"])]
)
config_sd3 = {"target": "modules.models.sd3.sd3_model.SD3Inferencer", "params": {"shift": 3, "state_dict": None}}

CONFIGS = {
    "sd1": config_default,
    "sd2": config_sd2,
    "sdxl": config_sdxl,
    "sdxl-refiner": config_sdxl_refiner,
    "sd3": config_sd3,
}


def guess_model_config_from_state_dict(sd, filename):
    if "model.diffusion_model.x_embedder.proj.weight" in sd:
        return config_sd3
    if "conditioner.embedders.1.model.ln_final.weight" in sd:
        return config_sdxl
    if "conditioner.embedders.0.model.ln_final.weight" in sd:
        return config_sdxl_refiner
    if "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in sd:
        return config_sd2
    return config_default


def find_checkpoint_config(state_dict, info):
    if info is not None and getattr(info, "config", None) is not None:
        return copy.deepcopy(info.config)
    return guess_model_config_from_state_dict(state_dict, getattr(info, "filename", ""))
