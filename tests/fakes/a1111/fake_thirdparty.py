"""Stand-ins for what A1111 gets from outside its own tree: the Hugging Face hub and ``open_clip``.

* Hub: A1111 calls ``CLIPTokenizer.from_pretrained("openai/clip-vit-large-patch14")`` and builds
  ``CLIPTextModel`` from that repo's ``config.json``. Here repo names map to the real tokenizer
  (written offline from open_clip's BPE by ``te_switch.standalone.tokenizers``) and to small configs: real
  depths (12/24/32 layers) because clip-skip semantics depend on them, small widths because
  nothing here does. CLIP-L is 64 wide, OpenCLIP-H 96, OpenCLIP-G 80, so a tower mix-up changes
  shapes.
* ``open_clip``: the text half of ``open_clip.model.CLIP`` (2.20: ``token_embedding``,
  ``positional_embedding``, ``transformer.resblocks`` of ``ResidualAttentionBlock`` with a
  sequence-first ``nn.MultiheadAttention``, ``ln_final``, raw ``text_projection``, ``logit_scale``,
  a non-persistent causal ``attn_mask``) and its ``SimpleTokenizer`` interface. The real package
  does not import without torchvision in the test environment.

This module sits outside the fake roots the harness purges, so tokenizers (slow to build) are
made once per process. It imports nothing from ``modules``/``ldm``/``sgm``.
"""

from __future__ import annotations

import functools
import tempfile
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

CLIP_L = "openai/clip-vit-large-patch14"
T5_XXL = "google/t5-v1_1-xxl"
BOS, EOS = 49406, 49407

# hub repo -> CLIPTextConfig fields (width small, depth real)
CLIP_CONFIGS = {
    CLIP_L: {
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 12,
        "num_attention_heads": 4,
        "hidden_act": "quick_gelu",
        "projection_dim": 64,
    },
}
# open_clip architecture -> text tower (real depth; embed_dim = text_projection's output)
OPENCLIP_ARCHS = {
    "ViT-H-14": {"width": 96, "layers": 24, "heads": 4, "embed_dim": 96},
    "ViT-bigG-14": {"width": 80, "layers": 32, "heads": 4, "embed_dim": 80},
}


@functools.cache
def tokenizer_folder() -> str:
    from te_switch.standalone.tokenizers import write_clip_tokenizer

    return write_clip_tokenizer(tempfile.mkdtemp(prefix="fake-hub-clip-"))


@functools.cache
def clip_tokenizer(repo: str = CLIP_L):
    """``CLIPTokenizer.from_pretrained(repo)`` (every CLIP repo here shares OpenAI's vocabulary)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(tokenizer_folder(), local_files_only=True)


def clip_text_config(repo: str = CLIP_L, **overrides):
    from transformers import CLIPTextConfig

    fields = {
        **CLIP_CONFIGS[repo],
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "layer_norm_eps": 1e-5,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": 1,
        **overrides,
    }
    return CLIPTextConfig(**fields)


def clip_text_model(repo: str = CLIP_L):
    """``CLIPTextModel.from_pretrained(repo)`` as A1111's DisableInitialization does it: config only,
    the weights come from the checkpoint."""
    from transformers import CLIPTextModel

    return CLIPTextModel(clip_text_config(repo)).eval()


# ---------------------------------------------------------------------------------------------
# open_clip


class LayerNorm(nn.LayerNorm):
    """open_clip's LayerNorm: computes in the weights' dtype, returns the input's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        orig_type = x.dtype
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.to(orig_type)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, d_model: int, n_head: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_head)  # sequence-first (LND)
        self.ls_1 = nn.Identity()
        self.ln_2 = LayerNorm(d_model)
        width = int(d_model * mlp_ratio)
        self.mlp = nn.Sequential(
            OrderedDict(
                [("c_fc", nn.Linear(d_model, width)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(width, d_model))]
            )
        )
        self.ls_2 = nn.Identity()

    def attention(self, q_x, k_x=None, v_x=None, attn_mask=None):
        k_x = k_x if k_x is not None else q_x
        v_x = v_x if v_x is not None else q_x
        attn_mask = attn_mask.to(q_x.dtype) if attn_mask is not None else None
        return self.attn(q_x, k_x, v_x, need_weights=False, attn_mask=attn_mask)[0]

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        x = q_x + self.ls_1(self.attention(q_x=self.ln_1(q_x), attn_mask=attn_mask))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.width = width
        self.layers = layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])


def build_attention_mask(context_length: int) -> torch.Tensor:
    mask = torch.empty(context_length, context_length)
    mask.fill_(float("-inf"))
    mask.triu_(1)
    return mask


class CLIP(nn.Module):
    """``open_clip.model.CLIP`` after sgm/ldm ``del model.visual``: the text tower only."""

    def __init__(self, width: int, layers: int, heads: int, embed_dim: int, context_length: int = 77) -> None:
        super().__init__()
        self.transformer = Transformer(width, layers, heads)
        self.context_length = context_length
        self.vocab_size = 49408
        self.token_embedding = nn.Embedding(self.vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.register_buffer("attn_mask", build_attention_mask(context_length), persistent=False)
        self.logit_scale = nn.Parameter(torch.ones([]) * 2.6592)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width**-0.5)


def create_model_and_transforms(arch: str, device=None, pretrained=None):
    """``open_clip.create_model_and_transforms`` as sgm/ldm call it (weights come from the checkpoint)."""
    return CLIP(**OPENCLIP_ARCHS[arch]).to(device or "cpu"), None, None


class SimpleTokenizer:
    """``open_clip.tokenizer._tokenizer``'s interface (``encoder``, ``encode``) over the same BPE."""

    def __init__(self) -> None:
        self.hf = clip_tokenizer()
        self.encoder = dict(self.hf.get_vocab())
        # open_clip names the two special tokens differently; the ids are OpenAI's
        self.encoder.pop("<|startoftext|>", None)
        self.encoder.pop("<|endoftext|>", None)
        self.encoder["<start_of_text>"] = BOS
        self.encoder["<end_of_text>"] = EOS

    def encode(self, text: str) -> list[int]:
        return self.hf(text, add_special_tokens=False)["input_ids"]


@functools.cache
def open_clip_tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer()


class T5TokenizerStandIn:
    """Offline stand-in for ``T5TokenizerFast.from_pretrained("google/t5-v1_1-xxl")``: one id per
    word (a stable hash below the vocabulary), ``</s>`` = 1, ``<pad>`` = 0 like T5's."""

    eos_token_id, pad_token_id = 1, 0

    def __init__(self, vocab: int = 32128) -> None:
        self.vocab = vocab

    def _ids(self, text: str) -> list[int]:
        out = []
        for word in text.split():
            h = 0
            for ch in word.encode():
                h = (h * 131 + ch) % (self.vocab - 2)
            out.append(h + 2)
        return out

    def __call__(self, texts, truncation=False, add_special_tokens=True, padding=None, max_length=None):
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        ids = [self._ids(t) + ([self.eos_token_id] if add_special_tokens else []) for t in batch]
        if padding == "max_length" and max_length:
            ids = [(x + [self.pad_token_id] * max_length)[:max_length] for x in ids]
        return {"input_ids": ids[0] if single else ids}


def t5_tokenizer(repo: str = T5_XXL) -> T5TokenizerStandIn:
    return T5TokenizerStandIn()
