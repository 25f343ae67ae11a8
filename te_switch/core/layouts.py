"""File layouts: the stored key schemes of text-encoder towers, found and converted from one registry.

Each :class:`Layout` says how a tower in that scheme is found (its anchor key), which keys belong to
it, where its token table, position table and blocks are, and how its names become canonical (HF
``CLIPTextModel`` / ``T5EncoderModel``, docs/ARCHITECTURE.md). ``core.detect`` and
``core.convert.load_tower`` both read :data:`LAYOUTS`; nothing else switches on a layout name.

A new layout is one entry in :data:`LAYOUTS`, its rename table and function here, and a fixture in
``tests/filemakers.py`` (detection and conversion tests run over every entry).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from te_switch.core.tensors import SAFETENSORS_DTYPES, LazyWeight, PackedTensor, Value, Weight, dense, derive

# ---------------------------------------------------------------------------------------------
# rename tables

# OpenAI / OpenCLIP text tower (bare names) -> canonical
OPENCLIP_TOP = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
# per residual block: transformer.resblocks.{i}.<left>  ->  text_model.encoder.layers.{i}.<right>
OPENCLIP_BLOCK = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
# fused attention input projection, split into thirds in q, k, v order
OPENCLIP_FUSED = {
    "attn.in_proj_weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "attn.in_proj_bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
}
# OpenAI stores `x @ P`; HF stores Linear(P.T)
OPENCLIP_RAW_PROJECTION = "text_projection"
CANONICAL_PROJECTION = "text_projection.weight"

# llama.cpp (GGUF) T5 encoder names -> canonical (shapes are already torch order from the reader)
GGUF_T5_TOP = {
    "token_embd.weight": "shared.weight",
    "enc.output_norm.weight": "encoder.final_layer_norm.weight",
}
# per block: enc.blk.{i}.<left>  ->  encoder.block.{i}.<right>
GGUF_T5_BLOCK = {
    "attn_q.weight": "layer.0.SelfAttention.q.weight",
    "attn_k.weight": "layer.0.SelfAttention.k.weight",
    "attn_v.weight": "layer.0.SelfAttention.v.weight",
    "attn_o.weight": "layer.0.SelfAttention.o.weight",
    "attn_rel_b.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "attn_norm.weight": "layer.0.layer_norm.weight",
    "ffn_gate.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn_up.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn_down.weight": "layer.1.DenseReluDense.wo.weight",
    "ffn_norm.weight": "layer.1.layer_norm.weight",
}

LONG_CLIP_KEEP = 20  # Long-CLIP keeps the first 20 positions of the original table
_BLOCK = re.compile(r"^(transformer\.resblocks|enc\.blk)\.(\d+)\.(.+)$")


# ---------------------------------------------------------------------------------------------
# exact operations on weights that may be packed


def split_rows(w: Value, parts: int) -> list[Value]:
    """Split along the output dimension; packed weights split their block rows (exact).

    A lazy weight splits into lazy parts that share one read of it per pass (see :func:`split_of`).
    """
    if isinstance(w, LazyWeight):
        if not w.shape or w.shape[0] % parts:
            raise ValueError(f"a fused tensor of shape {list(w.shape)} does not split into {parts} equal parts")
        whole = w.shared(parts)
        shape = torch.Size((w.shape[0] // parts, *w.shape[1:]))
        out: list[Value] = []
        for i in range(parts):
            part = LazyWeight(shape, w.dtype, lambda i=i: split_rows(whole.load(), parts)[i])
            _SPLITS[part] = (w, i, parts)
            out.append(part)
        return out
    if isinstance(w, PackedTensor):
        rows = w.shape[0] // parts
        raws = w.raw.split(w.raw.shape[0] // parts, dim=0)
        scale = w.scale
        scales: list[torch.Tensor | None]
        if scale is not None and scale.numel() > 1:
            scales = list(scale.split(scale.shape[0] // parts, dim=0))
        else:
            scales = [scale] * parts
        return [
            PackedTensor(w.qtype, r, torch.Size((rows, *w.shape[1:])), s) for r, s in zip(raws, scales, strict=True)
        ]
    return list(w.chunk(parts, dim=0))


def split_of(parts: list[Value]) -> Value | None:
    """The weight :func:`split_rows` cut into exactly these lazy parts, in order (else None): fusing
    them again is then that weight itself, with no copy."""
    first = _SPLITS.get(parts[0]) if isinstance(parts[0], LazyWeight) else None
    if first is None or first[2] != len(parts):
        return None
    whole = first[0]
    ok = all(isinstance(p, LazyWeight) and _SPLITS.get(p) == (whole, i, len(parts)) for i, p in enumerate(parts))
    return whole if ok else None


# lazy part -> (the lazy weight it was cut from, its index, the number of parts); gone with the part
_SPLITS: weakref.WeakKeyDictionary[LazyWeight, tuple[LazyWeight, int, int]] = weakref.WeakKeyDictionary()


def dense_name(w: Value) -> str:
    """The stored dtype name of ``dense(w)``: float16/bfloat16/float32 as stored, the rest F32."""
    name = w.dtype if isinstance(w, PackedTensor | LazyWeight) else None
    if name is None:
        return {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}.get(w.dtype, "F32")  # type: ignore[union-attr]
    return name if name in ("F16", "BF16", "F32") else "F32"


def transpose(w: Value) -> Value:
    # plain tensors keep their stored dtype (fp8 included) so layout round trips stay bit-exact
    if isinstance(w, LazyWeight):
        kept = w.dtype if w.dtype in SAFETENSORS_DTYPES else "F32"
        return derive(transpose, w, shape=(w.shape[1], w.shape[0]), dtype=kept)
    return (dense(w) if isinstance(w, PackedTensor) else w).t().contiguous()


# ---------------------------------------------------------------------------------------------
# stored names -> canonical (bare names: the tower's prefix is already gone)


def hf_to_canonical(sd: Mapping[str, Weight]) -> dict[str, Weight]:
    """HF CLIP names are the canonical ones."""
    return dict(sd)


def openclip_to_canonical(sd: Mapping[str, Weight]) -> dict[str, Weight]:
    """OpenAI/OpenCLIP text tower → canonical. Long-CLIP's ``positional_embedding_res`` is merged."""
    out: dict[str, Weight] = {}
    for key, value in sd.items():
        if key in OPENCLIP_TOP:
            out[OPENCLIP_TOP[key]] = value
        elif key == OPENCLIP_RAW_PROJECTION:
            out[CANONICAL_PROJECTION] = transpose(value)
        elif key == CANONICAL_PROJECTION:
            out[CANONICAL_PROJECTION] = value  # already a Linear weight (some re-exports)
        elif key == "positional_embedding_res":
            continue  # merged below
        elif m := _BLOCK.match(key):
            i, rest = m.group(2), m.group(3)
            head = f"text_model.encoder.layers.{i}."
            if rest in OPENCLIP_BLOCK:
                out[head + OPENCLIP_BLOCK[rest]] = value
            elif rest in OPENCLIP_FUSED:
                for name, part in zip(OPENCLIP_FUSED[rest], split_rows(value, 3), strict=True):
                    out[head + name] = part
            else:
                out[key] = value  # left for the completeness check to report
        else:
            out[key] = value
    if "positional_embedding_res" in sd:
        # Long-CLIP adds pe*mask1 + pe_res*mask2: rows <20 from pe, rows >=20 from pe_res
        pe, res = sd["positional_embedding"], sd["positional_embedding_res"]
        out[OPENCLIP_TOP["positional_embedding"]] = derive(
            _merge_long_clip_positions, pe, res, shape=tuple(res.shape), dtype=dense_name(res)
        )
    return out


def _merge_long_clip_positions(pe: Weight, res: Weight) -> torch.Tensor:
    return torch.cat([dense(pe)[:LONG_CLIP_KEEP], dense(res)[LONG_CLIP_KEEP:]], dim=0)


def hf_flat_to_canonical(sd: Mapping[str, Weight]) -> dict[str, Weight]:
    """transformers ≥ 5.6 / old SD1 names (``embeddings.*``) → canonical (``text_model.embeddings.*``)."""
    return {(k if k.startswith("text_projection") else "text_model." + k): v for k, v in sd.items()}


def gguf_t5_to_canonical(sd: Mapping[str, Weight]) -> dict[str, Weight]:
    out: dict[str, Weight] = {}
    for key, value in sd.items():
        if key in GGUF_T5_TOP:
            out[GGUF_T5_TOP[key]] = value
        elif (m := _BLOCK.match(key)) and m.group(3) in GGUF_T5_BLOCK:
            out[f"encoder.block.{m.group(2)}.{GGUF_T5_BLOCK[m.group(3)]}"] = value
        else:
            out[key] = value
    # non-gated T5 1.0 has only ffn_up: it is `wi`, not `wi_1`
    if not any(k.endswith(".wi_0.weight") for k in out):
        out = {k.replace(".DenseReluDense.wi_1.", ".DenseReluDense.wi."): v for k, v in out.items()}
    return out


def t5_to_canonical(sd: Mapping[str, Weight]) -> dict[str, Weight]:
    """HF T5 names: ``encoder.embed_tokens.weight`` is the tied ``shared.weight``."""
    out = dict(sd)
    embed = out.pop("encoder.embed_tokens.weight", None)
    if "shared.weight" not in out and embed is not None:
        out["shared.weight"] = embed
    return out


# ---------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True)
class Layout:
    """One stored key scheme of one encoder family. Keys below are relative to the tower's prefix."""

    name: str  # what TowerInfo.layout says: 'hf', 'hf-flat', 'openclip', 'llama.cpp'
    family: str  # 'clip' | 't5'
    anchor: str  # one key every tower of this layout has exactly once: it finds the tower and its prefix
    heads: tuple[str, ...]  # key prefixes of the tower's tensors
    to_canonical: Callable[[Mapping[str, Weight]], dict[str, Weight]]
    singles: tuple[str, ...] = ()  # whole keys of the tower besides those under ``heads``
    token_embedding: tuple[str, ...] = ()  # the token table (the first present wins); a CLIP anchor needs it
    positions: str = ""  # CLIP: the position table
    blocks: str = ""  # head of the numbered layers/blocks ("…layers.N.…")
    features: tuple[tuple[str, tuple[str, ...]], ...] = ()  # feature name -> keys whose presence shows it
    gate: str = ""  # T5: a key part only gated (v1.1) feed-forwards have
    second_bias: str = ""  # T5: block 1's relative attention bias (UMT5 has one per block)
    not_under: str = ""  # a prefix ending that means the anchor belongs to another layout

    @property
    def pattern(self) -> re.Pattern[str]:
        """The anchor key anywhere: group 1 is the tower's prefix ('' or ending with '.')."""
        return _anchor_pattern(self.anchor)

    def keys(self, source_keys: list[str], prefix: str) -> list[str]:
        """The stored keys that belong to the tower at ``prefix`` (vision towers, decoders excluded)."""
        heads = tuple(prefix + h for h in self.heads)
        singles = {prefix + s for s in self.singles}
        return [k for k in source_keys if k.startswith(heads) or k in singles]

    def is_text_tower(self, prefix: str, key_set: set[str]) -> bool:
        """False for an anchor in a vision tower, or one that is another layout seen one level deeper."""
        if _VISION_PREFIX.search(prefix):
            return False
        if self.family != "clip":
            return True
        if self.not_under and prefix.endswith(self.not_under):
            return False
        return prefix + self.token_embedding[0] in key_set  # a CLIP vision tower has no token table


_VISION_PREFIX = re.compile(r"(^|\.)(visual|vision_model|vision_tower|image_encoder)\.$")
_PATTERNS: dict[str, re.Pattern[str]] = {}


def _anchor_pattern(anchor: str) -> re.Pattern[str]:
    if anchor not in _PATTERNS:
        _PATTERNS[anchor] = re.compile(r"^((?:.*\.)?)" + re.escape(anchor) + "$")
    return _PATTERNS[anchor]


# in the order anchors are tried: `text_model.encoder.layers…` is hf before it could be hf-flat
LAYOUTS: tuple[Layout, ...] = (
    Layout(
        "hf", "clip", anchor="text_model.encoder.layers.0.self_attn.q_proj.weight", to_canonical=hf_to_canonical,
        heads=("text_model.", "text_projection."), singles=("text_projection",),
        token_embedding=("text_model.embeddings.token_embedding.weight",),
        positions="text_model.embeddings.position_embedding.weight", blocks="text_model.encoder.layers.",
        features=(
            ("projection", ("text_projection.weight",)), ("position-ids", ("text_model.embeddings.position_ids",)),
        ),
    ),
    Layout(  # transformers >= 5.6 CLIPTextModel, old SD1 checkpoints: no `text_model.` level
        "hf-flat", "clip", anchor="encoder.layers.0.self_attn.q_proj.weight", to_canonical=hf_flat_to_canonical,
        heads=("embeddings.", "encoder.", "final_layer_norm.", "text_projection."), not_under="text_model.",
        token_embedding=("embeddings.token_embedding.weight",), positions="embeddings.position_embedding.weight",
        blocks="encoder.layers.",
        features=(("projection", ("text_projection.weight",)), ("position-ids", ("embeddings.position_ids",))),
    ),
    Layout(  # OpenAI CLIP / OpenCLIP (fused in_proj, raw projection), Long-CLIP's own files
        "openclip", "clip", anchor="transformer.resblocks.0.attn.in_proj_weight", to_canonical=openclip_to_canonical,
        heads=("transformer.", "ln_final.", "token_embedding.", "text_projection."),
        singles=("positional_embedding", "positional_embedding_res", "text_projection"),
        token_embedding=("token_embedding.weight",), positions="positional_embedding", blocks="transformer.resblocks.",
        features=(
            ("long-clip-res", ("positional_embedding_res",)),
            ("projection", ("text_projection", "text_projection.weight")),
        ),
    ),
    Layout(  # T5EncoderModel, and the WebUIs' own T5 (encoder.embed_tokens without shared)
        "hf", "t5", anchor="encoder.block.0.layer.0.SelfAttention.q.weight", to_canonical=t5_to_canonical,
        heads=("encoder.", "shared."), token_embedding=("shared.weight", "encoder.embed_tokens.weight"),
        blocks="encoder.block.", gate=".DenseReluDense.wi_0.",
        second_bias="encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight",
    ),
    Layout(  # GGUF: llama.cpp names, shapes already in torch order from the reader
        "llama.cpp", "t5", anchor="enc.blk.0.attn_q.weight", to_canonical=gguf_t5_to_canonical,
        heads=("enc.", "token_embd."), token_embedding=("token_embd.weight",), blocks="enc.blk.",
        gate=".ffn_gate.", second_bias="enc.blk.1.attn_rel_b.weight",
    ),
)  # fmt: skip
ANCHOR_SUFFIXES = tuple(layout.anchor for layout in LAYOUTS)  # a cheap filter before the patterns


def layout_of(name: str | None, family: str | None) -> Layout:
    """The registry entry a TowerInfo's ``layout`` and ``family`` name."""
    for layout in LAYOUTS:
        if layout.name == name and layout.family == family:
            return layout
    raise ValueError(f"unknown layout {name!r} for {family!r} towers")
