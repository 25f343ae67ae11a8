"""hosts.slots: live-slot builders for HF CLIP, T5 and OpenCLIP towers, and the position resizers.

Runs under every transformers the hosts ship (5.x here; 4.30 and 4.46 in the host venvs): the key
spelling of ``CLIPTextModel`` and the persistence of ``position_ids`` differ between them, and the
builders must follow whatever the live module has.
"""

from __future__ import annotations

import filemakers as fm
import pytest
import refmodels as rm
import torch
from torch import nn

from te_switch.core.convert import canonical_to_openclip
from te_switch.core.layouts import openclip_to_canonical
from te_switch.core.longclip import causal_mask
from te_switch.core.selection import KINDS_BY_SLOT
from te_switch.hosts.slots import (
    hf_clip_blocks,
    hf_clip_slot,
    openclip_slot,
    resize_hf_clip,
    resize_openclip,
    t5_slot,
    text_transformer,
)

W = 32
SPELLINGS = ["CLIPTextModel", "CLIPTextModelWithProjection"]


def hf_clip(spelling: str, seed: int = 1, positions: int = 77) -> nn.Module:
    proj = 24 if spelling.endswith("Projection") else None
    return rm.make_hf_clip(W, 2, 4, vocab=rm.SMALL_VOCAB, proj_dim=proj, positions=positions, seed=seed)


def openclip(seed: int = 1, proj: int | None = 24) -> rm.OpenClipTextTransformer:
    return rm.make_openclip(W, 2, 4, vocab=rm.SMALL_VOCAB, proj_dim=proj, seed=seed)


def make_t5(seed: int = 1) -> nn.Module:
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=128, d_model=W, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    return rm.randomize_(T5EncoderModel(cfg), seed).eval()


def persistent_ids(model: nn.Module) -> bool:
    return any(k.endswith("position_ids") for k in model.state_dict())


def ids_key(model: nn.Module) -> str:
    return next(n for n, _ in model.named_buffers() if n.endswith("position_ids"))


# ---------------------------------------------------------------------------------------------
# text_transformer / hf_clip_blocks


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_text_transformer_finds_the_embeddings_holder(spelling: str) -> None:
    model = hf_clip(spelling)
    inner = text_transformer(model)
    assert hasattr(inner, "embeddings")
    assert hasattr(inner, "final_layer_norm")
    assert inner is getattr(model, "text_model", model)
    assert hf_clip_blocks(model) is inner.encoder.layers
    assert len(hf_clip_blocks(model)) == 2
    plain = nn.Linear(2, 2)
    assert text_transformer(plain) is plain


# ---------------------------------------------------------------------------------------------
# hf_clip_slot


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_hf_clip_slot_maps_canonical_names_to_the_live_spelling(spelling: str) -> None:
    model = hf_clip(spelling)
    slot = hf_clip_slot("clip_l", model)
    live = model.state_dict()
    canonical = rm.hf_clip_canonical_sd(hf_clip("CLIPTextModelWithProjection", seed=2))  # always has a projection
    host = slot.to_host(canonical)

    want = set(live) - set(slot.derived)
    assert set(host) == want  # the projection is dropped where the live module has none
    for key, value in host.items():
        source_key = key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key
        assert value is canonical[source_key], key  # a rename, never a copy
    assert slot.position_keys == {next(k for k in live if k.endswith("position_embedding.weight"))}
    assert slot.positions() == 77
    has_proj = spelling.endswith("Projection")
    assert slot.optional == ({"text_projection.weight"} if has_proj else set())
    assert slot.derived == ({ids_key(model)} if persistent_ids(model) else set())
    assert slot.kinds == KINDS_BY_SLOT["clip_l"]
    assert slot.label == "CLIP-L"
    assert slot.resize is not None


def test_hf_clip_slot_passes_unknown_names_through_so_the_engine_can_name_them() -> None:
    slot = hf_clip_slot("clip_l", hf_clip("CLIPTextModel"))
    host = slot.to_host({"text_model.encoder.layers.7.mlp.fc1.weight": torch.zeros(1), "logit_scale": torch.zeros(())})
    assert "logit_scale" in host
    assert any(k.endswith("encoder.layers.7.mlp.fc1.weight") for k in host)
    assert not set(host) <= set(slot.live_tensors())


def test_hf_clip_slot_options() -> None:
    slot = hf_clip_slot("clip_g", hf_clip("CLIPTextModelWithProjection"), resizable=False, kinds=("x",), label="G")
    assert slot.resize is None
    assert slot.kinds == ("x",)
    assert slot.label == "G"
    assert hf_clip_slot("clip_g", hf_clip("CLIPTextModel")).kinds == ("clip-g",)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_resize_hf_clip_grows_and_shrinks_in_place(spelling: str) -> None:
    model = hf_clip(spelling)
    emb = text_transformer(model).embeddings
    module, param = emb.position_embedding, emb.position_embedding.weight
    table = param.detach().clone()
    ids_before = emb.position_ids.clone()
    state_before = {k: v.clone() for k, v in model.state_dict().items()}

    resize_hf_clip(model, 248)
    assert emb.position_embedding is module
    assert emb.position_embedding.weight is param  # host references to the Parameter stay valid
    assert param.shape == (248, W)
    assert torch.equal(param[:77], table)
    assert not param[77:].any()  # zero until a load fills them
    assert module.num_embeddings == 248
    assert emb.position_ids.dtype == ids_before.dtype
    assert torch.equal(emb.position_ids, torch.arange(248).unsqueeze(0))
    assert model.config.max_position_embeddings == 248
    assert text_transformer(model).config.max_position_embeddings == 248
    assert persistent_ids(model) == any(k.endswith("position_ids") for k in state_before)
    with torch.no_grad():
        out = model(input_ids=rm.clip_tokens(1, 248, rm.SMALL_VOCAB), output_hidden_states=True)
    assert out.last_hidden_state.shape == (1, 248, W)

    resize_hf_clip(model, 77)
    assert emb.position_embedding.weight is param
    assert model.config.max_position_embeddings == 77
    after = model.state_dict()
    assert after.keys() == state_before.keys()
    for key, value in state_before.items():
        assert after[key].dtype == value.dtype, key
        assert torch.equal(after[key], value), key
    assert torch.equal(emb.position_ids, ids_before)


def test_resize_hf_clip_keeps_dtype_of_a_half_model() -> None:
    model = hf_clip("CLIPTextModel").half()
    resize_hf_clip(model, 248)
    assert text_transformer(model).embeddings.position_embedding.weight.dtype == torch.float16


# ---------------------------------------------------------------------------------------------
# t5_slot


def test_t5_slot_writes_the_tied_table_under_every_live_name() -> None:
    model = make_t5()
    slot = t5_slot("t5xxl", model)
    canonical = rm.t5_canonical_sd(make_t5(2))
    host = slot.to_host(canonical)
    assert set(host) == set(model.state_dict())  # shared + encoder.embed_tokens
    assert host["encoder.embed_tokens.weight"] is canonical["shared.weight"]
    assert host["shared.weight"] is canonical["shared.weight"]
    assert "encoder.embed_tokens.weight" not in canonical  # the input is not modified
    assert slot.kinds == ("t5-xxl",)
    assert slot.label == "T5-XXL"
    assert slot.resize is None
    assert slot.positions() is None


def test_t5_slot_for_a_module_without_shared() -> None:
    model = make_t5()
    del model.shared  # the WebUIs' own T5: only encoder.embed_tokens
    host = t5_slot("t5xxl", model).to_host(rm.t5_canonical_sd(make_t5(2)))
    assert set(host) == set(model.state_dict())
    assert "shared.weight" not in host


def test_t5_slot_for_a_module_without_embed_tokens() -> None:
    model = make_t5()
    model.encoder.embed_tokens = None
    canonical = rm.t5_canonical_sd(make_t5(2))
    host = t5_slot("t5xxl", model).to_host(canonical)
    assert set(host) == set(model.state_dict()) == set(canonical)


# ---------------------------------------------------------------------------------------------
# openclip_slot / resize_openclip


def test_openclip_slot_maps_canonical_to_the_openclip_layout() -> None:
    model = openclip()
    slot = openclip_slot("clip_g", model)
    donor = openclip(2)
    canonical = openclip_to_canonical(fm.openclip_state(donor))
    host = slot.to_host(canonical)
    assert set(host) == set(model.state_dict())
    for key, value in donor.state_dict().items():
        assert torch.equal(host[key], value), key
    assert slot.position_keys == {"positional_embedding"}
    assert slot.optional == {"text_projection"}
    assert slot.positions() == 77
    assert slot.resize is not None
    assert slot.kinds == ("clip-g",)


def test_openclip_slot_keeps_logit_scale_optional() -> None:
    """sgm's tower keeps CLIP's loss temperature; files never need to carry it."""
    model = openclip()
    model.logit_scale = nn.Parameter(torch.tensor(4.6))
    slot = openclip_slot("clip_g", model, resizable=False)
    canonical = openclip_to_canonical(fm.openclip_state(openclip(2)))
    host = slot.to_host(canonical)
    assert set(host) == set(model.state_dict()) - {"logit_scale"}
    for key, value in canonical_to_openclip(canonical).items():
        assert torch.equal(host[key], value), key
    assert slot.optional == {"text_projection", "logit_scale"}
    assert slot.resize is None


def test_resize_openclip_rebuilds_the_causal_mask_in_place() -> None:
    model = openclip()
    model.context_length = 77  # open_clip's own attribute (sgm reads it for padding)
    param = model.positional_embedding
    table = param.detach().clone()
    mask_before = model.attn_mask.clone()
    resize_openclip(model, 248)
    assert model.positional_embedding is param
    assert param.shape == (248, W)
    assert torch.equal(param[:77], table)
    assert not param[77:].any()
    assert torch.equal(model.attn_mask, causal_mask(248))
    assert "attn_mask" in model._buffers
    assert "attn_mask" in model._non_persistent_buffers_set  # still out of the state dict
    assert model.context_length == 248
    resize_openclip(model, 77)
    assert torch.equal(param, table)
    assert torch.equal(model.attn_mask, mask_before)
    assert model.context_length == 77


def test_resize_openclip_without_mask_or_context_length() -> None:
    class Bare(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.positional_embedding = nn.Parameter(torch.randn(77, 8, dtype=torch.float16))

    bare = Bare()
    resize_openclip(bare, 248)
    assert bare.positional_embedding.shape == (248, 8)
    assert bare.positional_embedding.dtype == torch.float16
    assert not hasattr(bare, "attn_mask")


def test_resize_openclip_mask_follows_the_mask_dtype() -> None:
    model = openclip().half()
    resize_openclip(model, 248)
    assert model.attn_mask.dtype == torch.float16
    assert torch.equal(model.attn_mask, causal_mask(248, dtype=torch.float16))
