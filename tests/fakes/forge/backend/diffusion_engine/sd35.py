"""Fake of backend/diffusion_engine/sd35.py (text side): CLIP-L/G with clip skip 1 (last layer, no LN) + T5.

The real engine pads CLIP to, and zero-fills a disabled T5 at, 4096 channels (T5-XXL's width);
the fake uses its T5's own width so small test encoders can stand in.
"""

import torch
from modules.shared import opts

from backend import memory_management
from backend.args import dynamic_args
from backend.diffusion_engine.base import ForgeDiffusionEngine
from backend.patcher.clip import CLIP
from backend.text_processing.classic_engine import ClassicTextProcessingEngine
from backend.text_processing.t5_engine import T5TextProcessingEngine


class StableDiffusion3(ForgeDiffusionEngine):
    def __init__(self, estimated_config, huggingface_components):
        super().__init__(estimated_config, huggingface_components)
        clip = CLIP(
            model_dict={
                "clip_l": huggingface_components["text_encoder"],
                "clip_g": huggingface_components["text_encoder_2"],
                "t5xxl": huggingface_components["text_encoder_3"],
            },
            tokenizer_dict={
                "clip_l": huggingface_components["tokenizer"],
                "clip_g": huggingface_components["tokenizer_2"],
                "t5xxl": huggingface_components["tokenizer_3"],
            },
        )
        common = {
            "embedding_dir": dynamic_args["embedding_dir"],
            "emphasis_name": dynamic_args["emphasis_name"],
            "text_projection": True,
            "minimal_clip_skip": 1,
            "clip_skip": 1,
            "return_pooled": True,
            "final_layer_norm": False,
        }
        self.text_processing_engine_l = ClassicTextProcessingEngine(
            text_encoder=clip.cond_stage_model.clip_l,
            tokenizer=clip.tokenizer.clip_l,
            embedding_key="clip_l",
            embedding_expected_shape=768,
            **common,
        )
        self.text_processing_engine_g = ClassicTextProcessingEngine(
            text_encoder=clip.cond_stage_model.clip_g,
            tokenizer=clip.tokenizer.clip_g,
            embedding_key="clip_g",
            embedding_expected_shape=1280,
            **common,
        )
        self.text_processing_engine_t5 = T5TextProcessingEngine(
            text_encoder=clip.cond_stage_model.t5xxl,
            tokenizer=clip.tokenizer.t5xxl,
            emphasis_name=dynamic_args["emphasis_name"],
        )
        self.finish_init(clip)
        self.is_sd3 = True

    def set_clip_skip(self, clip_skip):
        self.text_processing_engine_l.clip_skip = clip_skip
        self.text_processing_engine_g.clip_skip = clip_skip

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt):
        memory_management.load_model_gpu(self.forge_objects.clip.patcher)
        width = self.text_processing_engine_t5.text_encoder.shared.embedding_dim  # 4096 in the real model
        cond_g, g_pooled = self.text_processing_engine_g(prompt)
        cond_l, l_pooled = self.text_processing_engine_l(prompt)
        if opts.sd3_enable_t5:
            cond_t5 = self.text_processing_engine_t5(prompt)
        else:
            cond_t5 = torch.zeros([len(prompt), 256, width]).to(cond_l.device)
        cond_lg = torch.cat([cond_l, cond_g], dim=-1)
        cond_lg = torch.nn.functional.pad(cond_lg, (0, width - cond_lg.shape[-1]))
        return {"crossattn": torch.cat([cond_lg, cond_t5], dim=-2), "vector": torch.cat([l_pooled, g_pooled], dim=-1)}

    @torch.inference_mode()
    def get_prompt_lengths_on_ui(self, prompt):
        token_count = len(self.text_processing_engine_t5.tokenize([prompt])[0])
        return token_count, max(255, token_count)
