"""Fake of backend/loader.py: build a Forge model from a checkpoint file, the way Forge builds it.

``forge_loader(sd)`` reads a safetensors "checkpoint" whose keys are already in Forge's component
form (``text_encoder.transformer.text_model.…``, ``text_encoder_2.transformer.encoder.block.…``)
and whose metadata ``forge_fake`` names the engine class and a repo folder laid out like
``backend/huggingface/<repo>`` (``text_encoder/config.json``, ``tokenizer/``…). That stands in for
huggingface_guess + ``split_state_dict``. Components are built by ``load_huggingface_component``
as in Forge: CLIP in ``text_encoder_dtype()`` (fp16) with manual-cast Forge operations and a square
``text_projection`` always added; T5 in fp16, or fp8 when the file is fp8 ("Using Detected T5 Data
Type"). T5 tokenizers are a tiny deterministic word tokenizer (no sentencepiece model offline).
"""

import importlib
import json
import os
import zlib

import modules_forge.shared_options  # noqa: F401  (Forge registers its options at startup)
import torch
from safetensors import safe_open

from backend import memory_management
from backend.nn.clip import IntegratedCLIP
from backend.nn.t5 import IntegratedT5
from backend.operations import using_forge_operations
from backend.state_dict import load_state_dict, try_filter_state_dict

ENGINES = {
    "sd15": ("backend.diffusion_engine.sd15", "StableDiffusion"),
    "sd20": ("backend.diffusion_engine.sd20", "StableDiffusion2"),
    "sdxl": ("backend.diffusion_engine.sdxl", "StableDiffusionXL"),
    "sdxl-refiner": ("backend.diffusion_engine.sdxl", "StableDiffusionXLRefiner"),
    "sd35": ("backend.diffusion_engine.sd35", "StableDiffusion3"),
    "flux": ("backend.diffusion_engine.flux", "Flux"),
    "chroma": ("backend.diffusion_engine.chroma", "Chroma"),
}


class FakeT5Tokenizer:
    """Stands in for T5TokenizerFast: one id per word/punctuation mark, stable across runs."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    @classmethod
    def from_pretrained(cls, folder):
        with open(os.path.join(folder, "fake_t5_tokenizer.json"), encoding="utf-8") as f:
            return cls(json.load(f)["vocab_size"])

    def _ids(self, text):
        words = text.replace(",", " , ").replace(".", " . ").split()
        return [2 + zlib.crc32(w.lower().encode()) % (self.vocab_size - 2) for w in words]

    def __call__(self, texts, truncation=False, add_special_tokens=False):
        return {"input_ids": [self._ids(t) + ([1] if add_special_tokens else []) for t in texts]}

    def get_vocab(self):
        return {"</s>": 1, "<pad>": 0}


def _no_init_weights():
    try:
        from transformers.modeling_utils import no_init_weights
    except ImportError:  # transformers >= 5
        from transformers.initialization import no_init_weights
    return no_init_weights()


def load_huggingface_component(guess, component_name, lib_name, cls_name, repo_path, state_dict):
    config_path = os.path.join(repo_path, component_name)
    if component_name.startswith("tokenizer"):
        if cls_name == "T5TokenizerFast":
            return FakeT5Tokenizer.from_pretrained(config_path)
        from transformers import CLIPTokenizer

        comp = CLIPTokenizer.from_pretrained(config_path, local_files_only=True)
        comp._eventual_warn_about_too_long_sequence = lambda *args, **kwargs: None
        return comp
    if cls_name in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        assert len(state_dict) > 16, "You do not have CLIP state dict!"
        from transformers import CLIPTextConfig, CLIPTextModel

        config = CLIPTextConfig.from_pretrained(config_path)
        to_args = {"device": memory_management.cpu, "dtype": memory_management.text_encoder_dtype()}
        with _no_init_weights(), using_forge_operations(**to_args, manual_cast_enabled=True):
            model = IntegratedCLIP(CLIPTextModel, config, add_text_projection=True).to(**to_args)
        load_state_dict(
            model,
            state_dict,
            ignore_errors=[
                "transformer.text_projection.weight",
                "transformer.text_model.embeddings.position_ids",
                "logit_scale",
            ],
        )
        return model
    if cls_name == "T5EncoderModel":
        assert len(state_dict) > 16, "You do not have T5 state dict!"
        with open(os.path.join(config_path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        storage_dtype = memory_management.text_encoder_dtype()
        detected = memory_management.state_dict_dtype(state_dict)
        if detected in (torch.float8_e4m3fn, torch.float8_e5m2, "gguf"):
            storage_dtype = detected
        if storage_dtype == "gguf":
            operations = {
                "dtype": memory_management.text_encoder_dtype(),
                "manual_cast_enabled": False,
                "bnb_dtype": "gguf",
            }
        else:
            operations = {"dtype": storage_dtype, "manual_cast_enabled": True}
        with _no_init_weights(), using_forge_operations(device=memory_management.cpu, **operations):
            model = IntegratedT5(config)
        load_state_dict(model, state_dict, ignore_errors=["transformer.encoder.embed_tokens.weight", "logit_scale"])
        return model
    raise ValueError(f"fake loader cannot build {cls_name}")


def _read(path):
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["forge_fake"])
        return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118 (safe_open is not iterable)


# replace_state_dict: city96's GGUF T5 names -> Forge's
GGUF_T5_NAMES = {
    "enc.": "encoder.",
    ".blk.": ".block.",
    "token_embd": "shared",
    "output_norm": "final_layer_norm",
    "attn_q": "layer.0.SelfAttention.q",
    "attn_k": "layer.0.SelfAttention.k",
    "attn_v": "layer.0.SelfAttention.v",
    "attn_o": "layer.0.SelfAttention.o",
    "attn_norm": "layer.0.layer_norm",
    "attn_rel_b": "layer.0.SelfAttention.relative_attention_bias",
    "ffn_up": "layer.1.DenseReluDense.wi_1",
    "ffn_down": "layer.1.DenseReluDense.wo",
    "ffn_gate": "layer.1.DenseReluDense.wi_0",
    "ffn_norm": "layer.1.layer_norm",
}


def _t5_module_state(path, *, fixed=False):
    """A *VAE / Text Encoder* menu file holding a T5, as ``replace_state_dict`` hands it on: a GGUF's names
    renamed, its token table dequantised (``dequantize_as_pytorch_parameter``: fails on an F16 table)."""
    from backend.utils import load_torch_file

    asd = load_torch_file(path)
    if not any(k in asd for k in ("enc.blk.0.attn_k.weight", "encoder.block.0.layer.0.SelfAttention.k.weight")):
        return None  # a VAE or a CLIP
    if "enc.blk.0.attn_k.weight" in asd:
        renamed = {}
        for k, v in asd.items():
            for a, b in GGUF_T5_NAMES.items():
                k = k.replace(a, b)
            renamed[k] = v
        table = renamed["shared.weight"]
        if not (fixed and table.gguf_cls is None):  # ``fixed``: as Forge would with its F16-table bug fixed
            renamed["shared.weight"] = table.dequantize_as_pytorch_parameter()
        asd = renamed
    return {"transformer." + k: v for k, v in asd.items() if k != "scaled_fp8"}


def forge_loader(sd, additional_state_dicts=None):
    state_dict, meta = _read(sd)
    repo = meta["repo"]
    components = {}
    menu_t5 = [t5 for p in additional_state_dicts or () if (t5 := _t5_module_state(p)) is not None]
    for name, cls_name in meta["components"].items():
        component_sd = try_filter_state_dict(state_dict, [name + "."])
        if cls_name == "T5EncoderModel" and menu_t5:
            component_sd = menu_t5[-1]
        components[name] = load_huggingface_component(None, name, "transformers", cls_name, repo, component_sd)
    module, cls = ENGINES[meta["engine"]]
    engine_cls = getattr(importlib.import_module(module), cls)
    return engine_cls(estimated_config=None, huggingface_components=components)
