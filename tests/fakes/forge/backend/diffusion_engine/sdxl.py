"""Fake of backend/diffusion_engine/sdxl.py (text side): CLIP-L + CLIP-G, minimal clip skip 2, no final LN."""

import torch
from modules.shared import opts

from backend import memory_management
from backend.args import dynamic_args
from backend.diffusion_engine.base import ForgeDiffusionEngine, Timestep
from backend.patcher.clip import CLIP
from backend.text_processing.classic_engine import ClassicTextProcessingEngine


def _engine(clip, key, shape, projection, pooled):
    return ClassicTextProcessingEngine(
        text_encoder=getattr(clip.cond_stage_model, key),
        tokenizer=getattr(clip.tokenizer, key),
        embedding_dir=dynamic_args["embedding_dir"],
        embedding_key=key,
        embedding_expected_shape=shape,
        emphasis_name=dynamic_args["emphasis_name"],
        text_projection=projection,
        minimal_clip_skip=2,
        clip_skip=2,
        return_pooled=pooled,
        final_layer_norm=False,
    )


def _size_vector(embedder, prompt, clip_pooled, last):
    width = getattr(prompt, "width", 1024) or 1024
    height = getattr(prompt, "height", 1024) or 1024
    values = [height, width, opts.sdxl_crop_top, opts.sdxl_crop_left, *last(width, height)]
    out = [embedder(torch.Tensor([v])) for v in values]
    return torch.flatten(torch.cat(out)).unsqueeze(dim=0).repeat(clip_pooled.shape[0], 1).to(clip_pooled)


class StableDiffusionXL(ForgeDiffusionEngine):
    def __init__(self, estimated_config, huggingface_components):
        super().__init__(estimated_config, huggingface_components)
        clip = CLIP(
            model_dict={
                "clip_l": huggingface_components["text_encoder"],
                "clip_g": huggingface_components["text_encoder_2"],
            },
            tokenizer_dict={
                "clip_l": huggingface_components["tokenizer"],
                "clip_g": huggingface_components["tokenizer_2"],
            },
        )
        self.text_processing_engine_l = _engine(clip, "clip_l", 2048, False, False)
        self.text_processing_engine_g = _engine(clip, "clip_g", 2048, True, True)
        self.embedder = Timestep(256)
        self.finish_init(clip)
        self.is_sdxl = True

    def set_clip_skip(self, clip_skip):
        self.text_processing_engine_l.clip_skip = clip_skip
        self.text_processing_engine_g.clip_skip = clip_skip

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt):
        memory_management.load_model_gpu(self.forge_objects.clip.patcher)
        cond_l = self.text_processing_engine_l(prompt)
        cond_g, clip_pooled = self.text_processing_engine_g(prompt)
        flat = _size_vector(self.embedder, prompt, clip_pooled, lambda w, h: (h, w))
        if getattr(prompt, "is_negative_prompt", False) and all(x == "" for x in prompt):
            clip_pooled, cond_l, cond_g = (torch.zeros_like(t) for t in (clip_pooled, cond_l, cond_g))
        return {"crossattn": torch.cat([cond_l, cond_g], dim=2), "vector": torch.cat([clip_pooled, flat], dim=1)}

    @torch.inference_mode()
    def get_prompt_lengths_on_ui(self, prompt):
        _, token_count = self.text_processing_engine_l.process_texts([prompt])
        return token_count, self.text_processing_engine_l.get_target_prompt_token_count(token_count)


class StableDiffusionXLRefiner(ForgeDiffusionEngine):
    def __init__(self, estimated_config, huggingface_components):
        super().__init__(estimated_config, huggingface_components)
        clip = CLIP(
            model_dict={"clip_g": huggingface_components["text_encoder"]},
            tokenizer_dict={"clip_g": huggingface_components["tokenizer"]},
        )
        self.text_processing_engine_g = _engine(clip, "clip_g", 2048, True, True)
        self.embedder = Timestep(256)
        self.finish_init(clip)
        self.is_sdxl = True

    def set_clip_skip(self, clip_skip):
        self.text_processing_engine_g.clip_skip = clip_skip

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt):
        memory_management.load_model_gpu(self.forge_objects.clip.patcher)
        cond_g, clip_pooled = self.text_processing_engine_g(prompt)
        aesthetic = 2.5 if getattr(prompt, "is_negative_prompt", False) else 6.0
        flat = _size_vector(self.embedder, prompt, clip_pooled, lambda w, h: (aesthetic,))
        return {"crossattn": cond_g, "vector": torch.cat([clip_pooled, flat], dim=1)}

    @torch.inference_mode()
    def get_prompt_lengths_on_ui(self, prompt):
        _, token_count = self.text_processing_engine_g.process_texts([prompt])
        return token_count, self.text_processing_engine_g.get_target_prompt_token_count(token_count)
