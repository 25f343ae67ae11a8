"""Shared builders for the swap-engine tests: small towers, files written from donor modules, and
byte-level comparisons of every parameter and buffer (``bits``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import filemakers as fm
import pytest
import refmodels as rm
import torch
from torch import nn

from te_switch.core.detect import detect
from te_switch.core.readers import open_file
from te_switch.core.selection import SlotChoice
from te_switch.hosts.engine import EncoderSource, LiveSlot, SlotRequest

W = 64  # tower width: swap rules do not depend on it (real sizes only in the memory test)
T5_VOCAB = 256
HF_SPELLINGS = ["CLIPTextModel", "CLIPTextModelWithProjection"]  # transformers 5.x: flat vs text_model. keys

Bits = dict[str, tuple[torch.dtype, tuple[int, ...], torch.Tensor]]

# ---------------------------------------------------------------------------------------------
# builders and comparisons


def hf_clip(seed: int, *, proj: bool = False, positions: int = 77, width: int = W) -> nn.Module:
    return rm.make_hf_clip(
        width, 2, 4, vocab=rm.SMALL_VOCAB, proj_dim=48 if proj else None, positions=positions, seed=seed
    )


def openclip(
    seed: int, *, proj: int | None = 48, context: int = 77, long: bool = False, layers: int = 2, width: int = W
) -> rm.OpenClipTextTransformer:
    return rm.make_openclip(
        width, layers, 4, vocab=rm.SMALL_VOCAB, proj_dim=proj, context=context, long_clip=long, seed=seed
    )


def make_t5(seed: int) -> nn.Module:
    """A tiny v1.1 T5 encoder (built here: refmodels.make_t5 needs UMT5, which transformers 4.30 lacks)."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=T5_VOCAB, d_model=W, d_kv=W // 4, d_ff=2 * W, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, relative_attention_max_distance=128,
        dropout_rate=0.0, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    return rm.randomize_(T5EncoderModel(cfg), seed).eval()


def t5_variant(model: nn.Module, variant: str) -> nn.Module:
    """'hf': shared + tied encoder.embed_tokens; 'embed-only': a WebUI-style T5; 'shared-only': no embed_tokens key."""
    if variant == "embed-only":
        del model.shared
    elif variant == "shared-only":
        model.encoder.embed_tokens = None
    return model


@torch.no_grad()
def t5_encode(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    emb = model.shared if "shared" in model._modules else model.encoder.embed_tokens
    out = model.encoder(inputs_embeds=emb(ids), output_hidden_states=True)
    return [*out.hidden_states, out.last_hidden_state]


def t5_ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, T5_VOCAB, (2, 11), generator=torch.Generator().manual_seed(seed))


def save(path: Path, tensors: Mapping[str, torch.Tensor]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return fm.save_safetensors(path, tensors)


def hf_file(
    folder: Path, seed: int, *, proj: bool = True, positions: int = 77, flat: bool = False, name: str | None = None
) -> tuple[Path, nn.Module]:
    donor = hf_clip(seed, proj=proj, positions=positions)
    path = save(folder / (name or f"clip-{seed}-{positions}.safetensors"), fm.hf_clip_state(donor, flat=flat))
    return path, donor


def openclip_file(folder: Path, seed: int, **kw: Any) -> tuple[Path, rm.OpenClipTextTransformer]:
    donor = openclip(seed, **kw)
    return save(folder / f"openclip-{seed}.safetensors", fm.openclip_state(donor)), donor


def source(path: Path, kind: str, *, tower: str | None = None, label: str | None = None) -> EncoderSource:
    """The tiny towers are CLIP-L/G or T5-XXL in all but width: take detect's answer, set the kind."""
    with open_file(path) as src:
        infos = detect(src)
    info = next(t for t in infos if tower is None or t.tower == tower)
    return EncoderSource(str(path), replace(info, kind=kind), label or path.name, "0123456789")


def req(
    slot: LiveSlot, src: EncoderSource | None = None, precision: str = "auto", positions: int | None = None
) -> SlotRequest:
    return SlotRequest(slot, SlotChoice(src.label if src else None, precision), src, positions)


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().clone().reshape(-1).view(torch.uint8)


def bits(module: nn.Module) -> Bits:
    """dtype, shape and raw bytes of every parameter and buffer (tied and non-persistent ones included)."""
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return {name: (t.dtype, tuple(t.shape), raw(t)) for name, t in named}


def assert_bits(module: nn.Module, want: Bits) -> None:
    got = bits(module)
    assert got.keys() == want.keys()
    for name, (dtype, shape, data) in want.items():
        assert got[name][:2] == (dtype, shape), name
        assert torch.equal(got[name][2], data), f"{name} differs"


def same_bits(module: nn.Module, want: Bits) -> bool:
    try:
        assert_bits(module, want)
    except AssertionError:
        return False
    return True


def param_ids(module: nn.Module) -> dict[str, int]:
    return {n: id(p) for n, p in module.named_parameters(remove_duplicate=False)}


def assert_same(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == v.dtype, k
        assert torch.equal(got[k], v), k


def hf_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return rm.hf_clip_canonical_sd(model)


def clip_out(model: nn.Module, positions: int = 77, seed: int = 0) -> dict[str, Any]:
    return rm.hf_clip_outputs(model, rm.clip_tokens(2, positions, rm.SMALL_VOCAB, seed=seed))


def assert_outputs_equal(
    a: Mapping[str, Any], b: Mapping[str, Any], keys: Iterable[str] = ("hidden_states", "last")
) -> None:
    for key in keys:
        xs, ys = (a[key], b[key]) if isinstance(a[key], list) else ([a[key]], [b[key]])
        assert len(xs) == len(ys)
        for x, y in zip(xs, ys, strict=True):
            assert torch.equal(x, y), key


def one_line_error(exc: BaseException, *needles: str) -> str:
    text = str(exc)
    assert "\n" not in text, text
    assert text.strip() == text, text
    for n in needles:
        assert n in text, f"{n!r} not in {text!r}"
    return text


def fail_first_load(module: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next commit into ``module`` writes half its tensors, then raises (a crash mid-commit, e.g. out of
    memory); the rollback after it and later commits are real."""
    from te_switch.hosts import engine as engine_mod

    real = engine_mod._write
    owned = {id(m) for m in module.modules()}
    state = {"writes": 0, "failed": False, "limit": max(1, len(list(module.modules())) // 3)}

    def write(owner: nn.Module, *args: Any, **kwargs: Any) -> None:
        if id(owner) in owned and not state["failed"]:
            state["writes"] += 1
            if state["writes"] > state["limit"]:
                state["failed"] = True
                raise RuntimeError("simulated out-of-memory half-way through the load")
        real(owner, *args, **kwargs)

    monkeypatch.setattr(engine_mod, "_write", write)
