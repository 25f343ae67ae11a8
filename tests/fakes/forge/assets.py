"""The Forge adapter tests' assets: small-width weights with real layer counts, tokenizer folders,
repositories laid out like ``backend/huggingface/<repo>`` and checkpoint files the fake Forge loads.

Built once per session by ``tests/test_forge_adapter.py`` (``build_assets``), inside nothing: only
files are written here, no fake ``modules.*`` is imported.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import filemakers as fm
import refmodels as rm
import torch
from safetensors.torch import save_file
from synth_gguf import hf_t5_to_llama_names, write_gguf

from te_switch.core.layouts import gguf_t5_to_canonical
from te_switch.standalone.tokenizers import write_clip_tokenizer

L_DIMS = (32, 12, 2)  # width, layers, heads
G_DIMS = (40, 32, 2)
H_DIMS = (36, 24, 2)  # the file's CLIP-H; Forge's SD2 copy has 23 layers
T5_DIMS = {"d_model": 64, "d_ff": 96, "num_layers": 2, "num_heads": 4}
T5_VOCAB = 32128


def fp16_exact(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Values Forge's fp16 storage keeps unchanged, so fp32 references see the same weights."""
    return {k: v.detach().to(torch.float16).to(torch.float32).contiguous() for k, v in sd.items()}


def clip_weights(dims: tuple[int, int, int], seed: int, *, positions: int = 77) -> dict[str, torch.Tensor]:
    width, layers, heads = dims
    act = "quick_gelu" if width == L_DIMS[0] else "gelu"
    model = rm.make_hf_clip(width, layers, heads, proj_dim=width, positions=positions, act=act, seed=seed)
    sd = rm.hf_clip_canonical_sd(model)
    sd = {k: v * 4 if "position_embedding" in k or "token_embedding" in k else v for k, v in sd.items()}
    return fp16_exact(sd)


def t5_weights(seed: int) -> dict[str, torch.Tensor]:
    d = T5_DIMS
    model = rm.make_t5(d["d_model"], d["d_ff"], d["num_layers"], d["num_heads"], vocab=T5_VOCAB, seed=seed)
    sd = rm.t5_canonical_sd(model)
    return fp16_exact({k: v * 8 if k == "shared.weight" else v for k, v in sd.items()})


def clip_config(dims: tuple[int, int, int], *, layers: int | None = None, positions: int = 77) -> dict[str, Any]:
    width, file_layers, heads = dims
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_size": width,
        "intermediate_size": 4 * width,
        "num_hidden_layers": layers or file_layers,
        "num_attention_heads": heads,
        "max_position_embeddings": positions,
        "hidden_act": "quick_gelu" if width == L_DIMS[0] else "gelu",
        "projection_dim": width,
        "layer_norm_eps": 1e-5,
        "vocab_size": rm.CLIP_VOCAB,
        "bos_token_id": 0,
        "eos_token_id": 2,  # as in every config Forge bundles: pooled = argmax(ids)
        "pad_token_id": 1,
        "torch_dtype": "float16",
    }


T5_CONFIG = {
    **T5_DIMS,
    "vocab_size": T5_VOCAB,
    "dense_act_fn": "gelu_new",
    "is_gated_act": True,
    "model_type": "t5",
}


@dataclass
class Assets:
    root: Path
    weights: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    checkpoints: dict[str, Path] = field(default_factory=dict)
    repos: dict[str, Path] = field(default_factory=dict)


FAMILIES = {
    # engine: components (name -> (class, weights key, projection kept))
    "sd15": {"text_encoder": ("CLIPTextModel", "l", False), "tokenizer": ("CLIPTokenizer", "tok_l", None)},
    "sd20": {"text_encoder": ("CLIPTextModel", "h", True), "tokenizer": ("CLIPTokenizer", "tok_g", None)},
    "sdxl": {
        "text_encoder": ("CLIPTextModel", "l", False),
        "text_encoder_2": ("CLIPTextModel", "g", True),
        "tokenizer": ("CLIPTokenizer", "tok_l", None),
        "tokenizer_2": ("CLIPTokenizer", "tok_g", None),
    },
    "sdxl-refiner": {"text_encoder": ("CLIPTextModel", "g", True), "tokenizer": ("CLIPTokenizer", "tok_g", None)},
    "sd35": {
        "text_encoder": ("CLIPTextModel", "l", True),
        "text_encoder_2": ("CLIPTextModel", "g", True),
        "text_encoder_3": ("T5EncoderModel", "t5", None),
        "tokenizer": ("CLIPTokenizer", "tok_l", None),
        "tokenizer_2": ("CLIPTokenizer", "tok_g", None),
        "tokenizer_3": ("T5TokenizerFast", "tok_t5", None),
    },
    "flux": {
        "text_encoder": ("CLIPTextModel", "l", True),
        "text_encoder_2": ("T5EncoderModel", "t5", None),
        "tokenizer": ("CLIPTokenizer", "tok_l", None),
        "tokenizer_2": ("T5TokenizerFast", "tok_t5", None),
    },
    "chroma": {"text_encoder": ("T5EncoderModel", "t5", None), "tokenizer": ("T5TokenizerFast", "tok_t5", None)},
}
CONFIGS = {"l": clip_config(L_DIMS), "g": clip_config(G_DIMS), "h": clip_config(H_DIMS, layers=23)}


def _component_state(key: str, weights: dict[str, torch.Tensor], projection: bool | None) -> dict[str, torch.Tensor]:
    if key == "t5":
        return {"transformer." + k: v for k, v in weights.items()}
    out = {}
    for k, v in weights.items():
        if k == "text_projection.weight" and not projection:
            continue  # SD1/SDXL CLIP-L: Forge's projection keeps its dummy
        if key == "h" and k.startswith("text_model.encoder.layers.23."):
            continue  # huggingface_guess drops OpenCLIP-H's last block for the 23-layer model
        out["transformer." + k] = v
    return out


def build_assets(root: Path) -> Assets:
    a = Assets(root)
    tok_l = write_clip_tokenizer(str(root / "tok_l"))
    shutil.copytree(tok_l, root / "tok_g")
    special = json.loads((root / "tok_g" / "special_tokens_map.json").read_text())
    special["pad_token"] = "!"  # CLIP-G/H tokenizers pad with "!" (id 0)
    (root / "tok_g" / "special_tokens_map.json").write_text(json.dumps(special))
    cfg = json.loads((root / "tok_g" / "tokenizer_config.json").read_text())
    (root / "tok_g" / "tokenizer_config.json").write_text(json.dumps({**cfg, "pad_token": "!"}))
    (root / "tok_t5").mkdir()
    (root / "tok_t5" / "fake_t5_tokenizer.json").write_text(json.dumps({"vocab_size": T5_VOCAB}))

    a.weights = {
        "l": clip_weights(L_DIMS, 11),
        "g": clip_weights(G_DIMS, 21),
        "h": clip_weights(H_DIMS, 31),
        "t5": t5_weights(41),
        "l_file": clip_weights(L_DIMS, 12),
        "g_file": clip_weights(G_DIMS, 22),
        "h_file": clip_weights(H_DIMS, 32),
        "long_file": clip_weights(L_DIMS, 13, positions=248),
        "t5_file": t5_weights(42),
    }
    for name in ("l_file", "g_file", "h_file", "long_file", "t5_file"):
        path = root / f"{name}.safetensors"
        save_file({k: v.to(torch.float16) for k, v in a.weights[name].items()}, str(path))
        a.files[name] = path
    # fp32 values that fp16 storage cannot hold: precision choices become visible
    raw = rm.hf_clip_canonical_sd(rm.make_hf_clip(*L_DIMS, proj_dim=L_DIMS[0], seed=14))
    a.weights["l32_file"] = {k: v.contiguous() for k, v in raw.items()}
    save_file(a.weights["l32_file"], str(root / "l32_file.safetensors"))
    a.files["l32_file"] = root / "l32_file.safetensors"
    stored, dense = fm.scaled_fp8_state(t5_weights(43))
    a.weights["t5_fp8s_file"] = dense
    save_file(stored, str(root / "t5_fp8s_file.safetensors"))
    a.files["t5_fp8s_file"] = root / "t5_fp8s_file.safetensors"
    held = write_gguf(root / "t5_q8.gguf", hf_t5_to_llama_names(t5_weights(44)), "Q8_0")
    a.weights["t5_q8_file"] = {k: v.float() for k, v in gguf_t5_to_canonical(held).items()}
    a.files["t5_q8_file"] = root / "t5_q8.gguf"
    broken = {k: v.to(torch.float16) for k, v in a.weights["l_file"].items()}
    del broken["text_model.encoder.layers.7.mlp.fc2.weight"]
    save_file(broken, str(root / "truncated.safetensors"))
    a.files["truncated"] = root / "truncated.safetensors"
    nan = {k: v.to(torch.float16) for k, v in a.weights["l_file"].items()}
    nan["text_model.encoder.layers.3.self_attn.k_proj.weight"][0, 0] = float("nan")
    save_file(nan, str(root / "nan.safetensors"))
    a.files["nan"] = root / "nan.safetensors"

    for family, components in FAMILIES.items():
        repo = root / f"repo_{family}"
        state: dict[str, torch.Tensor] = {}
        for comp, (cls, key, projection) in components.items():
            folder = repo / comp
            if cls == "CLIPTokenizer" or cls == "T5TokenizerFast":
                shutil.copytree(root / key, folder)
                continue
            folder.mkdir(parents=True)
            config = T5_CONFIG if key == "t5" else CONFIGS[key]
            (folder / "config.json").write_text(json.dumps(config))
            for k, v in _component_state(key, a.weights[key], projection).items():
                state[f"{comp}.{k}"] = v.to(torch.float16)
        meta = {"engine": family, "repo": str(repo), "components": {c: v[0] for c, v in components.items()}}
        ckpt = root / f"ckpt_{family}.safetensors"
        save_file(state, str(ckpt), metadata={"forge_fake": json.dumps(meta)})
        a.checkpoints[family] = ckpt
        a.repos[family] = repo
    return a
