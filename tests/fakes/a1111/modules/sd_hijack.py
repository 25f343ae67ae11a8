"""Fake of modules/sd_hijack.py: the text-encoder half of the hijack.

``hijack`` wraps the encoders in A1111's ``…WithCustomWords`` classes (SD1/SD2 by exact ldm type,
SDXL embedders by type name) and their token embeddings in ``EmbeddingsWithFixes``; ``undo_hijack``
unwraps them; ``redo_hijack`` does both, so wrapper objects are new afterwards. Attention
optimisations, hypernetworks and the UNet parts are not faked.
"""

from __future__ import annotations

import ldm.modules.encoders.modules
import torch
from modules import devices, shared_options  # noqa: F401
from modules.shared import cmd_opts


def _text_model(transformer):
    return getattr(transformer, "text_model", transformer)  # transformers >= 5.6 has no text_model level


class StableDiffusionModelHijack:
    fixes = None
    layers = None
    circular_enabled = False
    clip = None
    optimization_method = None

    def __init__(self):
        import modules.textual_inversion.textual_inversion

        self.extra_generation_params = {}
        self.comments = []
        self.embedding_db = modules.textual_inversion.textual_inversion.EmbeddingDatabase()
        self.embedding_db.add_embedding_dir(cmd_opts.embeddings_dir)

    def hijack(self, m):
        from modules import sd_hijack_clip, sd_hijack_open_clip

        conditioner = getattr(m, "conditioner", None)
        if conditioner:
            text_cond_models = []
            for i in range(len(conditioner.embedders)):
                embedder = conditioner.embedders[i]
                typename = type(embedder).__name__
                if typename == "FrozenOpenCLIPEmbedder":
                    embedder.model.token_embedding = EmbeddingsWithFixes(embedder.model.token_embedding, self)
                    conditioner.embedders[i] = sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords(embedder, self)
                    text_cond_models.append(conditioner.embedders[i])
                if typename == "FrozenCLIPEmbedder":
                    model_embeddings = _text_model(embedder.transformer).embeddings
                    model_embeddings.token_embedding = EmbeddingsWithFixes(model_embeddings.token_embedding, self)
                    conditioner.embedders[i] = sd_hijack_clip.FrozenCLIPEmbedderForSDXLWithCustomWords(embedder, self)
                    text_cond_models.append(conditioner.embedders[i])
                if typename == "FrozenOpenCLIPEmbedder2":
                    embedder.model.token_embedding = EmbeddingsWithFixes(
                        embedder.model.token_embedding, self, textual_inversion_key="clip_g"
                    )
                    conditioner.embedders[i] = sd_hijack_open_clip.FrozenOpenCLIPEmbedder2WithCustomWords(
                        embedder, self
                    )
                    text_cond_models.append(conditioner.embedders[i])

            if len(text_cond_models) == 1:
                m.cond_stage_model = text_cond_models[0]
            else:
                m.cond_stage_model = conditioner

        if type(m.cond_stage_model) == ldm.modules.encoders.modules.FrozenCLIPEmbedder:  # noqa: E721 (A1111 compares exact types)
            model_embeddings = _text_model(m.cond_stage_model.transformer).embeddings
            model_embeddings.token_embedding = EmbeddingsWithFixes(model_embeddings.token_embedding, self)
            m.cond_stage_model = sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords(m.cond_stage_model, self)
        elif type(m.cond_stage_model) == ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder:  # noqa: E721
            m.cond_stage_model.model.token_embedding = EmbeddingsWithFixes(
                m.cond_stage_model.model.token_embedding, self
            )
            m.cond_stage_model = sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords(m.cond_stage_model, self)

        self.clip = m.cond_stage_model

    def undo_hijack(self, m):
        from modules import sd_hijack_clip, sd_hijack_open_clip

        conditioner = getattr(m, "conditioner", None)
        if conditioner:
            for i in range(len(conditioner.embedders)):
                embedder = conditioner.embedders[i]
                if isinstance(
                    embedder,
                    (
                        sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords,
                        sd_hijack_open_clip.FrozenOpenCLIPEmbedder2WithCustomWords,
                    ),
                ):
                    embedder.wrapped.model.token_embedding = embedder.wrapped.model.token_embedding.wrapped
                    conditioner.embedders[i] = embedder.wrapped
                if isinstance(embedder, sd_hijack_clip.FrozenCLIPEmbedderForSDXLWithCustomWords):
                    embeddings = _text_model(embedder.wrapped.transformer).embeddings
                    embeddings.token_embedding = embeddings.token_embedding.wrapped
                    conditioner.embedders[i] = embedder.wrapped
            if hasattr(m, "cond_stage_model"):
                delattr(m, "cond_stage_model")
        elif type(m.cond_stage_model) == sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords:  # noqa: E721
            m.cond_stage_model = m.cond_stage_model.wrapped
            model_embeddings = _text_model(m.cond_stage_model.transformer).embeddings
            if type(model_embeddings.token_embedding) == EmbeddingsWithFixes:  # noqa: E721
                model_embeddings.token_embedding = model_embeddings.token_embedding.wrapped
        elif type(m.cond_stage_model) == sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords:  # noqa: E721
            m.cond_stage_model.wrapped.model.token_embedding = m.cond_stage_model.wrapped.model.token_embedding.wrapped
            m.cond_stage_model = m.cond_stage_model.wrapped

        self.layers = None
        self.clip = None

    def clear_comments(self):
        self.comments = []
        self.extra_generation_params = {}

    def get_prompt_lengths(self, text):
        if self.clip is None:
            return "-", "-"
        if hasattr(self.clip, "get_token_count"):
            token_count = self.clip.get_token_count(text)
        else:
            _, token_count = self.clip.process_texts([text])
        return token_count, self.clip.get_target_prompt_token_count(token_count)

    def redo_hijack(self, m):
        self.undo_hijack(m)
        self.hijack(m)


class EmbeddingsWithFixes(torch.nn.Module):
    """Wraps a token embedding; splices textual-inversion vectors in at ``offset + 1``."""

    def __init__(self, wrapped, embeddings, textual_inversion_key="clip_l"):
        super().__init__()
        self.wrapped = wrapped
        self.embeddings = embeddings
        self.textual_inversion_key = textual_inversion_key

    def forward(self, input_ids):
        batch_fixes = self.embeddings.fixes
        self.embeddings.fixes = None

        inputs_embeds = self.wrapped(input_ids)
        if batch_fixes is None or len(batch_fixes) == 0 or max(len(x) for x in batch_fixes) == 0:
            return inputs_embeds

        vecs = []
        for fixes, tensor in zip(batch_fixes, inputs_embeds, strict=False):
            for offset, embedding in fixes:
                vec = embedding.vec[self.textual_inversion_key] if isinstance(embedding.vec, dict) else embedding.vec
                emb = devices.cond_cast_unet(vec)
                emb_len = min(tensor.shape[0] - offset - 1, emb.shape[0])
                tensor = torch.cat([tensor[0 : offset + 1], emb[0:emb_len], tensor[offset + 1 + emb_len :]]).to(
                    dtype=inputs_embeds.dtype
                )
            vecs.append(tensor)
        return torch.stack(vecs)


class TextualInversionEmbeddings(torch.nn.Embedding):
    """SD3's token embedding: an Embedding that applies the fixes itself."""

    def __init__(self, num_embeddings: int, embedding_dim: int, textual_inversion_key="clip_l", **kwargs):
        super().__init__(num_embeddings, embedding_dim, **kwargs)
        self.embeddings = model_hijack
        self.textual_inversion_key = textual_inversion_key

    @property
    def wrapped(self):
        return super().forward

    def forward(self, input_ids):
        return EmbeddingsWithFixes.forward(self, input_ids)


model_hijack = StableDiffusionModelHijack()
