"""Fake of backend/diffusion_engine/sd20.py (text side only)."""

import torch

from backend import memory_management
from backend.args import dynamic_args
from backend.diffusion_engine.base import ForgeDiffusionEngine
from backend.patcher.clip import CLIP
from backend.text_processing.classic_engine import ClassicTextProcessingEngine


class StableDiffusion2(ForgeDiffusionEngine):
    def __init__(self, estimated_config, huggingface_components):
        super().__init__(estimated_config, huggingface_components)
        clip = CLIP(
            model_dict={"clip_h": huggingface_components["text_encoder"]},
            tokenizer_dict={"clip_h": huggingface_components["tokenizer"]},
        )
        self.text_processing_engine = ClassicTextProcessingEngine(
            text_encoder=clip.cond_stage_model.clip_h,
            tokenizer=clip.tokenizer.clip_h,
            embedding_dir=dynamic_args["embedding_dir"],
            embedding_key="clip_h",
            embedding_expected_shape=1024,
            emphasis_name=dynamic_args["emphasis_name"],
            text_projection=False,
            minimal_clip_skip=1,
            clip_skip=1,
            return_pooled=False,
            final_layer_norm=True,
        )
        self.finish_init(clip)
        self.is_sd2 = True

    def set_clip_skip(self, clip_skip):
        self.text_processing_engine.clip_skip = clip_skip

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt):
        memory_management.load_model_gpu(self.forge_objects.clip.patcher)
        return self.text_processing_engine(prompt)

    @torch.inference_mode()
    def get_prompt_lengths_on_ui(self, prompt):
        _, token_count = self.text_processing_engine.process_texts([prompt])
        return token_count, self.text_processing_engine.get_target_prompt_token_count(token_count)
