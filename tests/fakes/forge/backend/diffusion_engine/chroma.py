"""Fake of backend/diffusion_engine/chroma.py (text side): T5 only, ``set_clip_skip`` does nothing."""

import torch

from backend import memory_management
from backend.args import dynamic_args
from backend.diffusion_engine.base import ForgeDiffusionEngine
from backend.patcher.clip import CLIP
from backend.text_processing.t5_engine import T5TextProcessingEngine


class Chroma(ForgeDiffusionEngine):
    def __init__(self, estimated_config, huggingface_components):
        super().__init__(estimated_config, huggingface_components)
        clip = CLIP(
            model_dict={"t5xxl": huggingface_components["text_encoder"]},
            tokenizer_dict={"t5xxl": huggingface_components["tokenizer"]},
        )
        self.text_processing_engine_t5 = T5TextProcessingEngine(
            text_encoder=clip.cond_stage_model.t5xxl,
            tokenizer=clip.tokenizer.t5xxl,
            emphasis_name=dynamic_args["emphasis_name"],
            min_length=1,
        )
        self.finish_init(clip)

    def set_clip_skip(self, clip_skip):
        pass

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt):
        memory_management.load_model_gpu(self.forge_objects.clip.patcher)
        return self.text_processing_engine_t5(prompt)
