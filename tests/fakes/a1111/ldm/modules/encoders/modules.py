"""Fake of ldm/modules/encoders/modules.py (Stability-AI/stablediffusion @ cf1d67a): the SD1 and
SD2 text encoders. Tokenizer, config and the OpenCLIP model come from ``fake_thirdparty`` (the
hub and open_clip stand-ins); weights come from the checkpoint, as in A1111."""

from __future__ import annotations

from typing import ClassVar

import fake_thirdparty
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class AbstractEncoder(nn.Module):
    def encode(self, *args, **kwargs):
        raise NotImplementedError


class FrozenCLIPEmbedder(AbstractEncoder):
    """HF CLIPTextModel (``.transformer``) + CLIPTokenizer; SD1's ``cond_stage_model``."""

    LAYERS: ClassVar = ["last", "pooled", "hidden"]

    def __init__(
        self,
        version="openai/clip-vit-large-patch14",
        device="cuda",
        max_length=77,
        freeze=True,
        layer="last",
        layer_idx=None,
    ):
        super().__init__()
        assert layer in self.LAYERS
        self.tokenizer = fake_thirdparty.clip_tokenizer(version)
        self.transformer = fake_thirdparty.clip_text_model(version)
        self.device = device
        self.max_length = max_length
        if freeze:
            self.freeze()
        self.layer = layer
        self.layer_idx = layer_idx
        if layer == "hidden":
            assert layer_idx is not None
            assert 0 <= abs(layer_idx) <= 12

    def freeze(self):
        self.transformer = self.transformer.eval()
        for param in self.parameters():
            param.requires_grad = False

    def forward(self, text):
        batch_encoding = self.tokenizer(
            text, truncation=True, max_length=self.max_length, padding="max_length", return_tensors="pt"
        )
        tokens = batch_encoding["input_ids"].to(self.device)
        outputs = self.transformer(input_ids=tokens, output_hidden_states=self.layer == "hidden")
        if self.layer == "last":
            return outputs.last_hidden_state
        if self.layer == "pooled":
            return outputs.pooler_output[:, None, :]
        return outputs.hidden_states[self.layer_idx]

    def encode(self, text):
        return self(text)


class FrozenOpenCLIPEmbedder(AbstractEncoder):
    """OpenCLIP text tower; SD2's ``cond_stage_model`` (``layer: penultimate`` → ``layer_idx`` 1)."""

    LAYERS: ClassVar = ["last", "penultimate"]

    def __init__(
        self, arch="ViT-H-14", version="laion2b_s32b_b79k", device="cuda", max_length=77, freeze=True, layer="last"
    ):
        super().__init__()
        assert layer in self.LAYERS
        model, _, _ = fake_thirdparty.create_model_and_transforms(arch, device=torch.device("cpu"), pretrained=version)
        self.model = model
        self.device = device
        self.max_length = max_length
        if freeze:
            self.freeze()
        self.layer = layer
        if self.layer == "last":
            self.layer_idx = 0
        elif self.layer == "penultimate":
            self.layer_idx = 1
        else:
            raise NotImplementedError()

    def freeze(self):
        self.model = self.model.eval()
        for param in self.parameters():
            param.requires_grad = False

    def encode_with_transformer(self, text):
        x = self.model.token_embedding(text)  # NLD
        x = x + self.model.positional_embedding
        x = x.permute(1, 0, 2)  # NLD -> LND
        x = self.text_transformer_forward(x, attn_mask=self.model.attn_mask)
        x = x.permute(1, 0, 2)  # LND -> NLD
        return self.model.ln_final(x)

    def text_transformer_forward(self, x: torch.Tensor, attn_mask=None):
        # stops layer_idx blocks before the end: penultimate = the output of block len-2
        for i, r in enumerate(self.model.transformer.resblocks):
            if i == len(self.model.transformer.resblocks) - self.layer_idx:
                break
            if self.model.transformer.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(r, x, attn_mask)
            else:
                x = r(x, attn_mask=attn_mask)
        return x

    def encode(self, text):
        return self.encode_with_transformer(text)
