"""Fake of modules/sd_models_xl.py: how A1111 drives SDXL's conditioner (the batch dict with
size/crop conditioning, zeroed empty negatives) and makes ``GeneralConditioner`` look like an SD1
``cond_stage_model`` (token counting and tokenizing go to the first embedder that can)."""

from __future__ import annotations

import sgm.models.diffusion
import sgm.modules
import sgm.modules.diffusionmodules.denoiser_scaling
import torch
from modules import devices, shared, shared_options  # noqa: F401


def get_learned_conditioning(self, batch):
    for embedder in self.conditioner.embedders:
        embedder.ucg_rate = 0.0

    width = getattr(batch, "width", 1024) or 1024
    height = getattr(batch, "height", 1024) or 1024
    is_negative_prompt = getattr(batch, "is_negative_prompt", False)
    opts = shared.opts
    aesthetic_score = (
        opts.sdxl_refiner_low_aesthetic_score if is_negative_prompt else opts.sdxl_refiner_high_aesthetic_score
    )
    devices_args = {"device": devices.device, "dtype": devices.dtype}
    sdxl_conds = {
        "txt": batch,
        "original_size_as_tuple": torch.tensor([height, width], **devices_args).repeat(len(batch), 1),
        "crop_coords_top_left": torch.tensor([opts.sdxl_crop_top, opts.sdxl_crop_left], **devices_args).repeat(
            len(batch), 1
        ),
        "target_size_as_tuple": torch.tensor([height, width], **devices_args).repeat(len(batch), 1),
        "aesthetic_score": torch.tensor([aesthetic_score], **devices_args).repeat(len(batch), 1),
    }
    force_zero_negative_prompt = is_negative_prompt and all(x == "" for x in batch)
    return self.conditioner(sdxl_conds, force_zero_embeddings=["txt"] if force_zero_negative_prompt else [])


sgm.models.diffusion.DiffusionEngine.get_learned_conditioning = get_learned_conditioning


def encode_embedding_init_text(self, init_text, nvpt):
    res = [
        e.encode_embedding_init_text(init_text, nvpt)
        for e in self.embedders
        if hasattr(e, "encode_embedding_init_text")
    ]
    return torch.cat(res, dim=1)


def tokenize(self, texts):
    for embedder in [e for e in self.embedders if hasattr(e, "tokenize")]:
        return embedder.tokenize(texts)
    raise AssertionError("no tokenizer available")


def process_texts(self, texts):
    for embedder in [e for e in self.embedders if hasattr(e, "process_texts")]:
        return embedder.process_texts(texts)


def get_target_prompt_token_count(self, token_count):
    for embedder in [e for e in self.embedders if hasattr(e, "get_target_prompt_token_count")]:
        return embedder.get_target_prompt_token_count(token_count)


sgm.modules.GeneralConditioner.encode_embedding_init_text = encode_embedding_init_text
sgm.modules.GeneralConditioner.tokenize = tokenize
sgm.modules.GeneralConditioner.process_texts = process_texts
sgm.modules.GeneralConditioner.get_target_prompt_token_count = get_target_prompt_token_count


def extend_sdxl(model):
    """Make an SDXL model look a bit like SD1 to the rest of A1111 (note: ``conditioner.wrapped``)."""
    model.model.conditioning_key = "crossattn"
    model.cond_stage_key = "txt"
    vscaling = sgm.modules.diffusionmodules.denoiser_scaling.VScaling
    model.parameterization = "v" if isinstance(model.denoiser.scaling, vscaling) else "eps"
    model.alphas_cumprod = torch.linspace(0.99, 0.01, 10)
    model.conditioner.wrapped = torch.nn.Module()
