"""The A1111 adapter tests' assets: random checkpoints of every family (written once per session
inside the fake A1111), an :class:`Env` that loads them, makes adapters and registers encoder files
with their transformers references, and the reference builders those use. Used inside
``fake_webui("a1111")``: ``modules.*`` is imported in the methods, never at import time.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import refmodels as rm
import torch
from safetensors.torch import load_file, save_file

from te_switch.core.detect import detect
from te_switch.core.layouts import openclip_to_canonical
from te_switch.core.readers import open_file
from te_switch.hosts.engine import EncoderSource, SwapEngine

SD3_CLIP_L_PROJECTION = "clip_l.transformer.text_projection.weight"  # also under model_lg: one module, two names


class Checkpoints:
    """Random checkpoints of every family, written once per session (inside a fake WebUI)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.paths: dict[tuple, Path] = {}

    def path(self, family: str, seed: int = 0, *, t5: bool = False) -> Path:
        key = (family, seed, t5)
        if key not in self.paths:
            from modules import sd_models, sd_models_config, shared

            shared.opts.sd3_enable_t5 = t5
            model = sd_models.instantiate_from_config(sd_models_config.CONFIGS[family], {})
            rm.randomize_(model, 1000 + seed)
            path = self.folder / f"{family}-{seed}{'-t5' if t5 else ''}.safetensors"
            sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
            if family == "sd3":  # as in SD3's own files: A1111 builds CLIP-L's projection (the identity)
                sd = {k: v for k, v in sd.items() if not k.endswith(SD3_CLIP_L_PROJECTION)}
            save_file(sd, str(path))
            self.paths[key] = path
        return self.paths[key]


class Env:
    def __init__(self, checkpoints: Checkpoints, folder: Path) -> None:
        self.checkpoints = checkpoints
        self.folder = folder
        self.sources: dict[str, EncoderSource] = {}

    def info(self, family: str, seed: int = 0, *, t5: bool = False) -> Any:
        from modules import sd_models

        return sd_models.CheckpointInfo(str(self.checkpoints.path(family, seed, t5=t5)))

    def load(self, family: str, seed: int = 0, *, t5: bool = False) -> Any:
        from modules import sd_models, shared

        info = self.info(family, seed, t5=t5)
        shared.opts.sd3_enable_t5 = t5
        return sd_models.load_model(info)

    def adapter(self, *, install: bool = True) -> Any:
        from modules import script_callbacks

        from te_switch.hosts.a1111 import A1111Adapter

        adapter = A1111Adapter(SwapEngine())
        adapter.resolver = lambda slot, label: self.sources[label]
        if install:
            adapter.install()
            script_callbacks.on_model_loaded(adapter.on_model_loaded)
        return adapter

    def source(self, path: Path, kind: str) -> str:
        """Register a file under its name; the tiny towers are CLIP-L/G/H/T5-XXL in all but width."""
        with open_file(path) as src:
            tower = detect(src)[0]
        self.sources[path.name] = EncoderSource(str(path), dataclasses.replace(tower, kind=kind), path.name)
        return path.name

    def clip_l_file(self, seed: int, *, positions: int = 77) -> tuple[str, torch.nn.Module]:
        """A CLIP-L (or Long-CLIP-L) file in HF layout, and a transformers model loaded from it."""
        import fake_thirdparty
        from transformers import CLIPTextModel

        config = fake_thirdparty.clip_text_config(max_position_embeddings=positions)
        path = self.folder / f"clip-l-{seed}-{positions}.safetensors"
        save_file(rm.hf_clip_canonical_sd(rm.randomize_(CLIPTextModel(config), seed)), str(path))
        reference = CLIPTextModel(config).eval()
        rm.load_canonical_into_hf(reference, load(path))
        return self.source(path, "long-clip-l" if positions > 77 else "clip-l"), reference

    def open_clip_file(self, arch: str, seed: int, *, layout: str = "openclip") -> tuple[str, torch.nn.Module]:
        """An OpenCLIP-G/H file (OpenCLIP or HF layout) and its HF reference model."""
        import fake_thirdparty

        tower = rm.randomize_(fake_thirdparty.CLIP(**fake_thirdparty.OPENCLIP_ARCHS[arch]), seed).eval()
        sd = {k: v.detach().clone() for k, v in tower.state_dict().items()}
        if layout == "hf":
            sd = openclip_to_canonical({k: v for k, v in sd.items() if k != "logit_scale"})
        path = self.folder / f"{arch}-{seed}-{layout}.safetensors"
        save_file(sd, str(path))
        return self.source(path, "clip-g" if "bigG" in arch else "clip-h"), hf_from_open_clip(tower)

    def t5_file(self, seed: int) -> tuple[str, torch.nn.Module]:
        from transformers import T5Config, T5EncoderModel

        # the fake SD3's T5_CONFIG; built here because refmodels.make_t5 needs transformers' UMT5 (>= 4.31)
        config = T5Config(
            vocab_size=32128,
            d_model=192,
            d_kv=48,
            d_ff=128,
            num_layers=3,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            tie_word_embeddings=False,
        )
        torch.manual_seed(seed)
        model = rm.randomize_(T5EncoderModel(config), seed).eval()
        path = self.folder / f"t5-{seed}.safetensors"
        save_file(rm.t5_canonical_sd(model), str(path))
        return self.source(path, "t5-xxl"), model


def clean_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A live module's weights without A1111's ``EmbeddingsWithFixes`` level."""
    return {k.replace(".wrapped.", "."): v.detach().clone() for k, v in module.state_dict().items()}


def hf_from_open_clip(tower: torch.nn.Module) -> torch.nn.Module:
    """transformers CLIPTextModelWithProjection (gelu) holding an OpenCLIP tower's weights."""
    from transformers import CLIPTextModelWithProjection

    sd = {k: v for k, v in clean_state(tower).items() if k != "logit_scale"}
    width = tower.positional_embedding.shape[1]
    config = rm.hf_clip_config(
        width,
        len(tower.transformer.resblocks),
        tower.transformer.resblocks[0].attn.num_heads,
        positions=tower.positional_embedding.shape[0],
        act="gelu",
        proj_dim=tower.text_projection.shape[1],
    )
    ref = CLIPTextModelWithProjection(config).eval()
    rm.load_canonical_into_hf(ref, openclip_to_canonical(sd))
    return ref


def load(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))
