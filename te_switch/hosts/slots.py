"""Live-slot builders for the module families the hosts use (no host imports here).

* HF ``transformers`` CLIP (``CLIPTextModel`` / ``…WithProjection``, any version: ≥ 5.6 drops the
  ``text_model.`` level from ``CLIPTextModel``'s own names, so names are mapped by the target's keys)
* HF-style T5 encoders (``T5EncoderModel`` and the WebUIs' own T5 with ``encoder.embed_tokens``)
* OpenCLIP text towers as sgm/ldm hold them (fused ``in_proj``, raw ``text_projection``,
  ``positional_embedding`` added whole, so the ``attn_mask`` must follow the position count)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from te_switch.core.convert import CANONICAL_PROJECTION, canonical_to_openclip
from te_switch.core.longclip import causal_mask
from te_switch.core.tensors import Weight
from te_switch.hosts.engine import LiveSlot

HF_POSITIONS = "text_model.embeddings.position_embedding.weight"
HF_POSITION_IDS = "text_model.embeddings.position_ids"


def text_transformer(model: torch.nn.Module) -> torch.nn.Module:
    """The module holding ``embeddings`` / ``encoder`` / ``final_layer_norm`` (any transformers)."""
    return getattr(model, "text_model", model)


def hf_clip_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    return text_transformer(model).encoder.layers


def _prefix_map(live_keys: set[str]) -> tuple[str, str]:
    """(canonical prefix, live prefix) for the text model's names."""
    if any(k.startswith("text_model.") for k in live_keys):
        return "text_model.", "text_model."
    return "text_model.", ""


def hf_clip_slot(
    name: str, model: torch.nn.Module, *, resizable: bool = True, kinds: tuple[str, ...] = (), label: str = ""
) -> LiveSlot:
    """A slot over a HF ``CLIPTextModel``-shaped module (its own key spelling is respected)."""
    live_keys = set(model.state_dict().keys())
    canon, live = _prefix_map(live_keys)
    positions_key = HF_POSITIONS.replace(canon, live, 1)
    ids_key = HF_POSITION_IDS.replace(canon, live, 1)
    has_projection = CANONICAL_PROJECTION in live_keys

    def to_host(sd: Mapping[str, Weight]) -> dict[str, Weight]:
        out: dict[str, Weight] = {}
        for key, value in sd.items():
            if key == CANONICAL_PROJECTION:
                if has_projection:
                    out[key] = value
                continue
            out[live + key[len(canon) :] if key.startswith(canon) else key] = value
        return out

    def resize(n: int) -> None:
        resize_hf_clip(model, n)

    return LiveSlot(
        name,
        model,
        to_host,
        kinds=kinds,
        optional=frozenset({CANONICAL_PROJECTION} if has_projection else ()),
        derived=frozenset({ids_key} & live_keys),
        position_keys=frozenset({positions_key}),
        resize=resize if resizable else None,
        label=label,
    )


def resize_hf_clip(model: torch.nn.Module, n: int) -> None:
    """Give a HF CLIP text model ``n`` positions, keeping its module and parameter objects.

    New rows are zero until a load fills them; ``position_ids`` and the config follow.
    """
    emb = text_transformer(model).embeddings
    weight = emb.position_embedding.weight
    with torch.no_grad():
        new = torch.zeros(n, weight.shape[1], dtype=weight.dtype, device=weight.device)
        keep = min(n, weight.shape[0])
        new[:keep] = weight.data[:keep]
        weight.data = new
    emb.position_embedding.num_embeddings = n
    ids = getattr(emb, "position_ids", None)
    if isinstance(ids, torch.Tensor):
        emb.position_ids = torch.arange(n, device=ids.device, dtype=ids.dtype).expand((1, -1))
    for cfg in (getattr(model, "config", None), getattr(text_transformer(model), "config", None)):
        if cfg is not None and hasattr(cfg, "max_position_embeddings"):
            cfg.max_position_embeddings = n


def t5_slot(name: str, model: torch.nn.Module, *, kinds: tuple[str, ...] = (), label: str = "") -> LiveSlot:
    """A slot over a T5 encoder; ``shared`` and ``encoder.embed_tokens`` are the same table."""
    live_keys = set(model.state_dict().keys())

    def to_host(sd: Mapping[str, Weight]) -> dict[str, Weight]:
        out = dict(sd)
        shared = out.get("shared.weight")
        if shared is not None:
            if "shared.weight" not in live_keys:
                del out["shared.weight"]
            if "encoder.embed_tokens.weight" in live_keys:
                out["encoder.embed_tokens.weight"] = shared
        return out

    # transformers keeps T5's `wo` in fp32 (`_keep_in_fp32_modules`): its activations overflow fp16
    keep_fp32 = frozenset(k for k in live_keys if k.endswith("DenseReluDense.wo.weight"))
    return LiveSlot(name, model, to_host, kinds=kinds, label=label, keep_fp32=keep_fp32)


def openclip_slot(
    name: str,
    model: torch.nn.Module,
    *,
    resizable: bool = True,
    kinds: tuple[str, ...] = (),
    label: str = "",
) -> LiveSlot:
    """A slot over an OpenCLIP text tower (``token_embedding``, ``positional_embedding``,
    ``transformer.resblocks``, ``ln_final``, raw ``text_projection``; ``logit_scale`` is kept)."""
    live_keys = set(model.state_dict().keys())

    def to_host(sd: Mapping[str, Weight]) -> dict[str, Weight]:
        return canonical_to_openclip(sd)

    def resize(n: int) -> None:
        resize_openclip(model, n)

    # a file without a projection keeps the checkpoint's (pooled vectors need one); logit_scale is unused
    optional = {k for k in live_keys if k.endswith(("logit_scale", "text_projection"))}
    return LiveSlot(
        name,
        model,
        to_host,
        kinds=kinds,
        optional=frozenset(optional),
        position_keys=frozenset({"positional_embedding"}),
        resize=resize if resizable else None,
        label=label,
    )


def resize_openclip(model: torch.nn.Module, n: int) -> None:
    """``n`` positions for an OpenCLIP tower; its causal ``attn_mask`` is rebuilt to n×n."""
    pe = model.positional_embedding
    with torch.no_grad():
        new = torch.zeros(n, pe.shape[1], dtype=pe.dtype, device=pe.device)
        keep = min(n, pe.shape[0])
        new[:keep] = pe.data[:keep]
        pe.data = new
    mask = getattr(model, "attn_mask", None)
    if isinstance(mask, torch.Tensor):
        model.attn_mask = causal_mask(n, dtype=mask.dtype, device=mask.device)
    if hasattr(model, "context_length"):
        model.context_length = n
