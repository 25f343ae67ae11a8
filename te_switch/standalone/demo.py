"""A tiny built-in demo model, so ``compare`` and ``ui`` run on a fresh machine with nothing downloaded.

The demo is an SD1.5-architecture ``StableDiffusionPipeline`` with random (seeded) weights: a tiny
UNet and VAE — it draws noise — but a text encoder of real CLIP-L shape (12 layers, width 768,
vocabulary 49408; only the MLP is narrow, to keep the files small), so every file kind is
recognised by its true width and depth and clip skip means what it means on a real model. Beside
it lie demo encoder files in the formats people download: an HF-layout fp16 CLIP-L, an OpenAI-layout
fp8 one, and a Long-CLIP-L (248 positions, original layout with ``positional_embedding_res``).

Everything is created deterministically on first use into ``$TE_SWITCH_CACHE/demo`` (default
``~/.cache/te_switch/demo``): built in a temporary folder and renamed into place, so a crash or a
second process never leaves half a demo behind, and an existing demo is reused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass

import torch

from te_switch.core.convert import canonical_to_openclip
from te_switch.core.longclip import stretch_positions
from te_switch.standalone.cache import cache_root
from te_switch.standalone.pipeline import load_pipeline
from te_switch.standalone.tokenizers import write_clip_tokenizer

DEMO_VERSION = 1
DEMO_MODEL_NAME = "te-switch-demo-sd15"
SEED = 20240611
MLP_WIDTH = 128  # real CLIP-L: 3072; kinds are told by width and depth, not by the MLP
DEMO_SIZE = 256  # pixels (32x32 latents)
DEMO_STEPS = 6  # the demo draws noise: more steps only cost time (a 12-cell default grid is mostly UNet steps)
NOTE = (
    "Demo model: random weights, it draws noise. Differences between cells show that the encoder and clip skip "
    "reach the image. For real pictures pass --model PATH: a diffusers folder, or a .safetensors checkpoint "
    "(SD1.x as is; SDXL/SD2/SD3/Flux also need --config DIR, a diffusers folder of that architecture)."
)
ENCODERS = {
    "clip-l-alt.safetensors": "CLIP-L, HF layout (text_model.*), fp16",
    "clip-l-openai-fp8.safetensors": "CLIP-L, OpenAI layout (transformer.resblocks.*), fp8 e4m3fn",
    "long-clip-l.safetensors": "Long-CLIP-L, 248 positions, original layout with positional_embedding_res",
}
CLIP_L_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": MLP_WIDTH,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,  # SD1.5's legacy ids: pooling takes the argmax token (EOS)
    "eos_token_id": 2,
    "pad_token_id": 1,
}


@dataclass(frozen=True)
class Demo:
    root: str

    @property
    def pipeline(self) -> str:
        return os.path.join(self.root, "pipeline")

    @property
    def encoders(self) -> str:
        return os.path.join(self.root, "encoders")

    def encoder(self, name: str) -> str:
        return os.path.join(self.encoders, name)


def demo_dir(root: str | None = None) -> str:
    return os.path.join(root or cache_root(), "demo")


def _manifest(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, "demo.json"), encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("version") == DEMO_VERSION else None


def ensure_demo(root: str | None = None) -> Demo:
    """The demo under ``root`` (default :func:`cache_root`), created atomically if it is not there."""
    target = demo_dir(root)
    if _manifest(target) is not None:
        return Demo(target)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-build-", dir=parent)
    try:
        build_demo(tmp)
        stale = None
        if os.path.exists(target):  # an older demo version (or a broken one): move it aside first
            stale = tempfile.mkdtemp(prefix=".demo-old-", dir=parent)
            os.rename(target, os.path.join(stale, "demo"))
        try:
            os.rename(tmp, target)
        except OSError:
            if _manifest(target) is None:  # not a concurrent creator that won the race
                raise
        if stale:
            shutil.rmtree(stale, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Demo(target)


# ---------------------------------------------------------------------------------------------
# building


def _generator(name: str) -> torch.Generator:
    """One generator per tensor name: values do not depend on the order tensors are made in."""
    return torch.Generator().manual_seed(SEED ^ zlib.crc32(name.encode()))


def _fill(module: torch.nn.Module, tag: str) -> None:
    """Seeded values for every parameter: N(0, 1/fan_in) matrices, norms near 1, small biases."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            g = _generator(f"{tag}/{name}")
            if param.ndim >= 2:
                fan_in = param[0].numel()
                std = 0.02 if "embedding" in name else fan_in**-0.5
                param.copy_(torch.randn(param.shape, generator=g) * std)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=g))
            else:
                param.copy_(0.02 * torch.randn(param.shape, generator=g))


def clip_l_state(tag: str, tokens: torch.Tensor, positions: int = 77) -> dict[str, torch.Tensor]:
    """A CLIP-L-shaped text tower (narrow MLP) under canonical names, seeded by ``tag``, fp32.

    ``tokens`` is the shared :func:`token_embedding`; everything else is the tower's own.
    """
    width, mlp = CLIP_L_CONFIG["hidden_size"], CLIP_L_CONFIG["intermediate_size"]
    out = {
        "text_model.embeddings.token_embedding.weight": tokens,
        "text_model.embeddings.position_embedding.weight": _random(f"{tag}/positions", (positions, width), 0.01),
    }
    shapes = {
        "self_attn.q_proj": (width, width),
        "self_attn.k_proj": (width, width),
        "self_attn.v_proj": (width, width),
        "self_attn.out_proj": (width, width),
        "mlp.fc1": (mlp, width),
        "mlp.fc2": (width, mlp),
    }
    for i in range(CLIP_L_CONFIG["num_hidden_layers"]):
        head = f"text_model.encoder.layers.{i}."
        for name, shape in shapes.items():
            out[head + name + ".weight"] = _random(f"{tag}/{head}{name}.weight", shape, shape[1] ** -0.5)
            out[head + name + ".bias"] = _random(f"{tag}/{head}{name}.bias", (shape[0],), 0.02)
        for norm in ("layer_norm1", "layer_norm2"):
            out[head + norm + ".weight"] = 1 + _random(f"{tag}/{head}{norm}.weight", (width,), 0.1)
            out[head + norm + ".bias"] = _random(f"{tag}/{head}{norm}.bias", (width,), 0.02)
    out["text_model.final_layer_norm.weight"] = 1 + _random(f"{tag}/final.weight", (width,), 0.1)
    out["text_model.final_layer_norm.bias"] = _random(f"{tag}/final.bias", (width,), 0.02)
    return out


def _random(name: str, shape: tuple[int, ...], std: float) -> torch.Tensor:
    return torch.randn(shape, generator=_generator(name)) * std


def token_embedding() -> torch.Tensor:
    """The token table every demo tower shares (fine-tunes barely move it; it is most of the numbers to draw)."""
    return _random("token_embedding", (CLIP_L_CONFIG["vocab_size"], CLIP_L_CONFIG["hidden_size"]), 0.02)


def _save(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)


def _fp8_matrices(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp8 e4m3fn for weight matrices (how fp8 text encoders are published), fp16 for the rest."""
    return {
        k: v.to(torch.float8_e4m3fn if v.ndim == 2 and "positional" not in k else torch.float16) for k, v in sd.items()
    }


def _write_encoders(folder: str, tokens: torch.Tensor) -> None:
    os.makedirs(folder, exist_ok=True)
    alt = {k: v.half() for k, v in clip_l_state("alt", tokens).items()}
    _save(os.path.join(folder, "clip-l-alt.safetensors"), alt, {"te_switch.demo": ENCODERS["clip-l-alt.safetensors"]})

    openai = canonical_to_openclip(clip_l_state("openai", tokens))
    name = "clip-l-openai-fp8.safetensors"
    _save(os.path.join(folder, name), _fp8_matrices(openai), {"te_switch.demo": ENCODERS[name]})  # type: ignore[arg-type]

    # Long-CLIP's own files: the stretched 77-row table, plus the fine-tuned `_res` copy it adds from row 20 on
    long = canonical_to_openclip(clip_l_state("long", tokens))
    pe = stretch_positions(long["positional_embedding"])  # type: ignore[arg-type]
    long["positional_embedding"] = pe
    long["positional_embedding_res"] = pe + _random("long/res", tuple(pe.shape), 0.01)
    long["text_projection"] = _random("long/projection", (768, 768), 768**-0.5)
    long["logit_scale"] = torch.tensor(4.6052)
    name = "long-clip-l.safetensors"
    _save(os.path.join(folder, name), _fp8_matrices(long), {"te_switch.demo": ENCODERS[name]})  # type: ignore[arg-type]


def _write_text_encoder(folder: str, tokens: torch.Tensor) -> None:
    """config.json + model.safetensors as SD1.5 repositories hold them (``text_model.*`` names, fp16)."""
    os.makedirs(folder, exist_ok=True)
    config = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "torch_dtype": "float16"}
    config.update(CLIP_L_CONFIG)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    weights = {k: v.half() for k, v in clip_l_state("builtin", tokens).items()}
    _save(os.path.join(folder, "model.safetensors"), weights, {"format": "pt"})


def _write_pipeline(folder: str, tokens: torch.Tensor) -> None:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=DEMO_SIZE // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 16, 32, 32),  # four levels: the SD 8x downscale
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=DEMO_SIZE,
    )
    _fill(unet, "unet")
    _fill(vae, "vae")
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    unet.save_pretrained(os.path.join(folder, "unet"))
    vae.save_pretrained(os.path.join(folder, "vae"))
    scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    _write_text_encoder(os.path.join(folder, "text_encoder"), tokens)
    write_clip_tokenizer(os.path.join(folder, "tokenizer"))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    with open(os.path.join(folder, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)


def build_demo(folder: str) -> Demo:
    """Write the demo into ``folder`` (deterministic: the same bytes every time)."""
    os.makedirs(folder, exist_ok=True)
    demo = Demo(folder)
    tokens = token_embedding()
    _write_pipeline(demo.pipeline, tokens)
    _write_encoders(demo.encoders, tokens)
    with open(os.path.join(folder, "README.txt"), "w", encoding="utf-8") as f:
        f.write(f"TE Switch demo ({DEMO_MODEL_NAME}), created by `python -m te_switch`.\n\n{NOTE}\n\n")
        f.write("encoders/:\n" + "".join(f"  {name}: {what}\n" for name, what in ENCODERS.items()))
    with open(os.path.join(folder, "demo.json"), "w", encoding="utf-8") as f:
        json.dump({"version": DEMO_VERSION, "model": DEMO_MODEL_NAME, "encoders": ENCODERS}, f, indent=2)
    return demo


def load_demo_pipeline(demo: Demo | None = None) -> object:
    """The demo pipeline (fp32 on CPU: it is tiny, and fp16 on CPU is slow)."""
    demo = demo or ensure_demo()
    pipe = load_pipeline(demo.pipeline, dtype=torch.float32, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def folder_size(folder: str) -> int:
    """Bytes of every file under ``folder``."""
    return sum(os.path.getsize(os.path.join(r, n)) for r, _, names in os.walk(folder) for n in names)
