"""Reference text encoders written from the original definitions, not from te_switch.

``OpenClipTextTransformer`` follows OpenCLIP / OpenAI CLIP / sgm / ldm's text tower (fused
``nn.MultiheadAttention``, ``c_fc``/``c_proj`` MLP, raw ``text_projection`` used as ``x @ P``).
Its ``state_dict()`` is the OpenCLIP key layout, byte for byte what those repos save, so files built
from it are independent of the converter under test. ``GeometricLinear`` is zer0int's GmP layer
(``gmpclip/model.py``); ``long_clip=True`` follows beichenzbc/Long-CLIP's ``model_longclip.py``.

HF builders make transformers modules with every parameter randomised (LayerNorm weights and biases
included: with default init a swapped ``ln_1``/``ln_2`` would go unnoticed).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CLIP_VOCAB = 49408
SMALL_VOCAB = 1000  # small test towers: conversion does not depend on the vocabulary size, run time does
CLIP_EOS = CLIP_VOCAB - 1  # <|endoftext|>, the highest id: argmax(tokens) finds it
LONG_KEEP = 20  # Long-CLIP keeps the first 20 positions of the original table


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation (OpenCLIP ``QuickGELU``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class GeometricLinear(nn.Module):
    """zer0int's GmP linear: weight = r * normalize(theta, dim=1)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.r = nn.Parameter(torch.empty(out_features, 1))
        self.theta = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.r * F.normalize(self.theta, p=2, dim=1), self.bias)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, act: str, gmp: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        linear = GeometricLinear if gmp else nn.Linear
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", linear(width, width * 4)),
                    ("gelu", QuickGELU() if act == "quick_gelu" else nn.GELU()),
                    ("c_proj", linear(width * 4, width)),
                ]
            )
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        # x is [seq, batch, width] (OpenAI/ldm convention for nn.MultiheadAttention)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, act: str, gmp: bool) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, act, gmp) for _ in range(layers))


class OpenClipTextTransformer(nn.Module):
    """The OpenCLIP/OpenAI text tower. ``state_dict()`` keys are exactly OpenCLIP's."""

    def __init__(
        self,
        width: int,
        layers: int,
        heads: int,
        vocab: int = CLIP_VOCAB,
        context: int = 77,
        act: str = "quick_gelu",
        proj_dim: int | None = None,
        *,
        gmp: bool = False,
        long_clip: bool = False,
    ) -> None:
        super().__init__()
        if act not in ("quick_gelu", "gelu"):
            raise ValueError(act)
        self.width, self.layers, self.heads, self.vocab, self.context = width, layers, heads, vocab, context
        self.act, self.gmp, self.long_clip = act, gmp, long_clip
        self.positional_embedding = nn.Parameter(torch.empty(context, width))
        if long_clip:
            self.positional_embedding_res = nn.Parameter(torch.empty(context, width))
        self.text_projection = nn.Parameter(torch.empty(width, proj_dim)) if proj_dim else None
        self.transformer = _Transformer(width, layers, heads, act, gmp)
        self.token_embedding = nn.Embedding(vocab, width)
        self.ln_final = nn.LayerNorm(width)
        mask = torch.full((context, context), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)

    def effective_positions(self) -> torch.Tensor:
        """The position table the forward adds (Long-CLIP: mask1 rows from pe, mask2 rows from pe_res)."""
        if not self.long_clip:
            return self.positional_embedding
        mask1 = torch.zeros(self.context, 1, dtype=self.positional_embedding.dtype)
        mask1[:LONG_KEEP] = 1
        mask2 = 1 - mask1
        return self.positional_embedding * mask1 + self.positional_embedding_res * mask2

    def forward(self, tokens: torch.Tensor) -> dict[str, Any]:
        seq = tokens.shape[1]
        x = self.token_embedding(tokens) + self.effective_positions()[:seq]
        hidden = [x]
        x = x.permute(1, 0, 2)
        mask = self.attn_mask[:seq, :seq].to(x.dtype)
        for block in self.transformer.resblocks:
            x = block(x, mask)
            hidden.append(x.permute(1, 0, 2))
        last = self.ln_final(hidden[-1])
        pooled = last[torch.arange(last.shape[0]), tokens.argmax(dim=-1)]
        if self.text_projection is not None:
            pooled = pooled @ self.text_projection
        return {"hidden_states": hidden, "last": last, "pooled": pooled}


@torch.no_grad()
def randomize_(module: nn.Module, seed: int, std: float = 0.05) -> nn.Module:
    """Distinct random values in every parameter (norm weights around 1, GmP radii positive)."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        leaf = name.rsplit(".", 1)[-1]
        if ("ln_" in name or "layer_norm" in name) and leaf == "weight":
            p.copy_(1.0 + 0.1 * noise)
        elif leaf == "r":
            p.copy_(0.5 + noise.abs())
        elif "embedding" in name or "shared" in name or "embed_tokens" in name:
            p.copy_(0.5 * noise)
        else:
            p.copy_(std * noise)
    return module


def make_openclip(
    width: int = 64,
    layers: int = 2,
    heads: int = 4,
    *,
    vocab: int = CLIP_VOCAB,
    context: int = 77,
    act: str = "quick_gelu",
    proj_dim: int | None = None,
    gmp: bool = False,
    long_clip: bool = False,
    seed: int = 0,
) -> OpenClipTextTransformer:
    ref = OpenClipTextTransformer(width, layers, heads, vocab, context, act, proj_dim, gmp=gmp, long_clip=long_clip)
    return randomize_(ref, seed).eval()


# ---------------------------------------------------------------------------------------------
# transformers builders


def hf_clip_config(
    width: int,
    layers: int,
    heads: int,
    *,
    vocab: int = CLIP_VOCAB,
    positions: int = 77,
    act: str = "quick_gelu",
    proj_dim: int | None = None,
    intermediate: int | None = None,
) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=intermediate or 4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=positions,
        hidden_act=act,
        projection_dim=proj_dim or width,
        layer_norm_eps=1e-5,
        eos_token_id=vocab - 1,
        bos_token_id=vocab - 2,
        pad_token_id=vocab - 1,
    )


def make_hf_clip(
    width: int = 64,
    layers: int = 2,
    heads: int = 4,
    *,
    vocab: int = CLIP_VOCAB,
    positions: int = 77,
    act: str = "quick_gelu",
    proj_dim: int | None = None,
    seed: int = 0,
) -> nn.Module:
    """``CLIPTextModelWithProjection`` when ``proj_dim`` is set, else ``CLIPTextModel``; random, eval mode."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cfg = hf_clip_config(width, layers, heads, vocab=vocab, positions=positions, act=act, proj_dim=proj_dim)
    # sdpa keeps float64 end to end (the eager path runs softmax in float32)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = CLIPTextModelWithProjection(cfg) if proj_dim else CLIPTextModel(cfg)
    return randomize_(model, seed).eval()


def hf_clip_canonical_sd(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under canonical names (``text_model.`` kept, no ``position_ids``)."""
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("position_ids"):
            continue
        if not k.startswith(("text_model.", "text_projection.")):
            k = "text_model." + k  # transformers >= 5.6 CLIPTextModel drops the level
        out[k] = v.detach().clone()
    return out


def load_canonical_into_hf(model: nn.Module, canonical: Mapping[str, torch.Tensor]) -> None:
    """Strict load of canonical CLIP/T5 names into a transformers module, by the target's own keys."""
    target = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key in target:
        if key.endswith("position_ids"):
            mapped[key] = target[key]
            continue
        if key in canonical:
            mapped[key] = canonical[key]
        elif "text_model." + key in canonical:
            mapped[key] = canonical["text_model." + key]
        elif key == "encoder.embed_tokens.weight" and "shared.weight" in canonical:
            mapped[key] = canonical["shared.weight"]  # tied in T5
    missing = sorted(set(target) - set(mapped))
    extra = sorted(
        k
        for k in canonical
        if k not in target and k.removeprefix("text_model.") not in target and k != "encoder.embed_tokens.weight"
    )
    if missing or extra:
        raise AssertionError(
            f"canonical names do not fit {type(model).__name__}: missing {missing[:5]}, extra {extra[:5]}"
        )
    for key, val in mapped.items():
        if tuple(val.shape) != tuple(target[key].shape):
            raise AssertionError(f"{key}: shape {tuple(val.shape)} != {tuple(target[key].shape)}")
    model.load_state_dict({k: v.to(target[k].dtype) for k, v in mapped.items()}, strict=True)


def make_t5(
    d_model: int = 64,
    d_ff: int = 128,
    layers: int = 2,
    heads: int = 4,
    *,
    vocab: int = 32128,
    umt5: bool = False,
    seed: int = 0,
) -> nn.Module:
    """A random ``T5EncoderModel`` (v1.1: gated-gelu) or ``UMT5EncoderModel``; eval mode."""
    from transformers import T5Config, T5EncoderModel

    kw = {
        "vocab_size": vocab,
        "d_model": d_model,
        "d_kv": d_model // heads,
        "d_ff": d_ff,
        "num_layers": layers,
        "num_heads": heads,
        "feed_forward_proj": "gated-gelu",
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "dropout_rate": 0.0,
        "tie_word_embeddings": False,
    }
    torch.manual_seed(seed)
    if umt5:
        from transformers import UMT5Config, UMT5EncoderModel  # transformers >= 4.31 (A1111 pins 4.30)

        model = UMT5EncoderModel(UMT5Config(**kw))
    else:
        model = T5EncoderModel(T5Config(**kw))
    return randomize_(model, seed).eval()


def t5_canonical_sd(model: nn.Module) -> dict[str, torch.Tensor]:
    """T5 encoder weights under canonical names: ``shared.weight``, no tied ``encoder.embed_tokens``."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}


# ---------------------------------------------------------------------------------------------
# comparing encoders


def clip_tokens(batch: int, context: int, vocab: int = CLIP_VOCAB, seed: int = 0) -> torch.Tensor:
    """Random prompts: BOS, ids below BOS, one EOS at a random place, then EOS or 0 padding.

    EOS is the highest id, so OpenCLIP's ``argmax`` and HF's "first EOS" pick the same position.
    """
    gen = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, vocab - 2, (batch, context), generator=gen)
    toks[:, 0] = vocab - 2
    ends = torch.randint(1, context, (batch,), generator=gen)
    ends[0] = context - 1  # one full-length prompt reaches the last position
    for b in range(batch):
        toks[b, ends[b]] = vocab - 1
        toks[b, ends[b] + 1 :] = vocab - 1 if b % 2 else 0
    return toks


def t5_tokens(batch: int, length: int, vocab: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen)


@torch.no_grad()
def hf_clip_outputs(model: nn.Module, tokens: torch.Tensor) -> dict[str, Any]:
    out = model(input_ids=tokens, output_hidden_states=True)
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    return {"hidden_states": list(out.hidden_states), "last": out.last_hidden_state, "pooled": pooled}


@torch.no_grad()
def ref_outputs(ref: OpenClipTextTransformer, tokens: torch.Tensor) -> dict[str, Any]:
    return ref(tokens)


@torch.no_grad()
def t5_outputs(model: nn.Module, tokens: torch.Tensor) -> dict[str, Any]:
    out = model(input_ids=tokens, output_hidden_states=True)
    return {"hidden_states": list(out.hidden_states), "last": out.last_hidden_state}


def max_output_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    """Largest absolute difference over every hidden state, the final output and the pooled vector."""
    if len(a["hidden_states"]) != len(b["hidden_states"]):
        raise AssertionError(f"{len(a['hidden_states'])} vs {len(b['hidden_states'])} hidden states")
    worst = 0.0
    pairs = [*zip(a["hidden_states"], b["hidden_states"], strict=True), (a["last"], b["last"])]
    if "pooled" in a or "pooled" in b:
        pairs.append((a["pooled"], b["pooled"]))
    for x, y in pairs:
        if x.shape != y.shape:
            raise AssertionError(f"shape {tuple(x.shape)} vs {tuple(y.shape)}")
        worst = max(worst, (x.double() - y.double()).abs().max().item())
    return worst


def compare_clip(
    ref: OpenClipTextTransformer | nn.Module,
    hf_model: nn.Module,
    *,
    batches: int = 2,
    batch: int = 3,
    atol: float = 1e-10,
) -> float:
    """Run both encoders in float64 on random prompts; return the worst difference (asserts ``atol``).

    float64 removes the summation-order noise between a fused ``in_proj`` and split q/k/v
    projections, so any mapping mistake shows as O(1) while a correct one stays near 1e-14.
    """
    ref64, hf64 = ref.double(), hf_model.double()
    context = ref.context if isinstance(ref, OpenClipTextTransformer) else ref.config.max_position_embeddings
    vocab = ref.vocab if isinstance(ref, OpenClipTextTransformer) else ref.config.vocab_size
    worst = 0.0
    try:
        for i in range(batches):
            toks = clip_tokens(batch, context, vocab, seed=100 + i)
            a = ref_outputs(ref64, toks) if isinstance(ref64, OpenClipTextTransformer) else hf_clip_outputs(ref64, toks)
            b = hf_clip_outputs(hf64, toks)
            worst = max(worst, max_output_diff(a, b))
    finally:
        ref.float()
        hf_model.float()
    assert worst <= atol, f"outputs differ by {worst:.3g} (allowed {atol:.3g})"
    return worst


def compare_t5(ref: nn.Module, other: nn.Module, *, batches: int = 2, atol: float = 0.0) -> float:
    """Both T5 encoders on random ids (fp32); every hidden state compared."""
    vocab = ref.config.vocab_size
    worst = 0.0
    for i in range(batches):
        toks = t5_tokens(2, 9 + 4 * i, vocab, seed=200 + i)
        worst = max(worst, max_output_diff(t5_outputs(ref, toks), t5_outputs(other, toks)))
    assert worst <= atol, f"outputs differ by {worst:.3g} (allowed {atol:.3g})"
    return worst
