"""Loading a diffusers pipeline for the standalone tools: a model folder or a single file, never a download.

SD1.x single files need no ``--config``: the built-in config (:func:`builtin_config`) is the SD1.5
diffusers repository's, written once into the cache with a CLIP tokenizer made offline.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import torch

from te_switch.core.detect import TOWER_PREFIXES, inspect_path
from te_switch.core.errors import TESwitchError, one_line
from te_switch.standalone.cache import cache_root
from te_switch.standalone.tokenizers import write_clip_tokenizer

SINGLE_FILE_HELP = (
    "--config DIR: a diffusers model folder with model_index.json, the component config.json files and "
    "tokenizer/ (tokenizer_2/ ...) for this architecture"
)
# SD1.5 single files need no --config: these are the configs of the SD1.5 diffusers repository
# (checked by loading a real-shape SD1.5 checkpoint with them); the tokenizer is made offline
SD15_CONFIG: dict[str, dict[str, Any]] = {
    "model_index.json": {
        "_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False,
    },
    "unet/config.json": {
        "_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
        "layers_per_block": 2, "block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8,
        "cross_attention_dim": 768, "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu",
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    },
    "vae/config.json": {
        "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "sample_size": 512, "scaling_factor": 0.18215,
    },
    "text_encoder/config.json": {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
        "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
        "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    },
    "scheduler/scheduler_config.json": {
        "_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "clip_sample": False,
    },
}  # fmt: skip


def load_pipeline(
    path: str, *, config: str | None = None, dtype: torch.dtype | None = None, device: str | None = None
) -> Any:
    """A diffusers pipeline from a model folder or a single-file checkpoint; nothing is downloaded.

    A single file needs ``config``: a local diffusers folder of the same architecture whose
    ``model_index.json`` names the pipeline class and which holds the component configs and
    tokenizers. Every failure is one :class:`TESwitchError` line saying what to provide.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_model(path, config)
    import diffusers

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    if os.path.isdir(path):
        try:
            with _quiet_loading():
                pipe = diffusers.DiffusionPipeline.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
            raise TESwitchError(f"{path}: cannot load this diffusers folder ({one_line(e)})") from e
    else:
        config = config or builtin_config("sd15")  # check_model let only an SD1.x file come without one
        class_name = _check_model_folder(config, what=f"--config {config}")
        pipeline_class = getattr(diffusers, class_name, None)
        if pipeline_class is None or not hasattr(pipeline_class, "from_single_file"):
            raise TESwitchError(f"--config {config}: {class_name} cannot load single-file checkpoints")
        try:
            with _quiet_loading():
                pipe = pipeline_class.from_single_file(path, config=config, local_files_only=True, torch_dtype=dtype)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
            raise TESwitchError(
                f"{os.path.basename(path)}: cannot load with --config {config} ({one_line(e)}); "
                f"is the config folder the same architecture as the checkpoint?"
            ) from e
    return pipe.to(device)


def check_model(path: str | None, config: str | None = None) -> None:
    """What is wrong with ``--model``, as one :class:`TESwitchError` line, before diffusers is imported.

    A file is read by its header only (:func:`core.detect.inspect_path`, as ``inspect`` does), so a text
    file, a hostile pickle, a UNet, a LoRA or a bare encoder is named for what it is.
    """
    if path is None:
        return  # the demo
    if not os.path.exists(path):
        raise TESwitchError(f"--model {path}: no such file or folder")
    if os.path.isdir(path):
        _check_model_folder(path, what=f"--model {path}")
        return
    towers = inspect_path(path)
    usage = "--model takes a diffusers model folder or a whole single-file checkpoint"
    errors = [t.error for t in towers if t.error]
    if errors:
        raise TESwitchError(f"--model {path}: not a checkpoint ({errors[0]}); {usage}")
    if not any(t.usable for t in towers):
        what = towers[0].note or "no text encoder inside"
        raise TESwitchError(f"--model {path}: {what}, not a whole checkpoint; {usage}")
    if all(t.prefix not in TOWER_PREFIXES for t in towers):
        kinds = ", ".join(sorted({str(t.kind) for t in towers}))
        raise TESwitchError(
            f"--model {path}: a text-encoder file ({kinds}), not a whole checkpoint; "
            "put it in a folder and pass --encoders-dir DIR (compare: --encoders NAME)"
        )
    if not config and single_file_architecture(path) != "sd15":
        raise TESwitchError(f"--model {path}: a single-file checkpoint other than SD1.x needs {SINGLE_FILE_HELP}")
    if config:
        _check_model_folder(config, what=f"--config {config}")


def single_file_architecture(path: str) -> str | None:
    """'sd15' for an SD1.x single-file checkpoint (its CLIP-L under ``cond_stage_model``), else None."""
    towers = inspect_path(path)
    prefixes = {t.prefix for t in towers if t.usable}
    return "sd15" if prefixes == {"cond_stage_model.transformer."} else None


def builtin_config(name: str, root: str | None = None) -> str:
    """The built-in diffusers config folder ``name`` under the TE Switch cache (written once, atomically)."""
    import shutil
    import tempfile

    if name != "sd15":
        raise ValueError(f"no built-in config {name!r}")
    target = os.path.join(root or cache_root(), "configs", name)
    if os.path.isfile(os.path.join(target, "model_index.json")):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=os.path.dirname(target))
    try:
        for rel, content in SD15_CONFIG.items():
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            with open(os.path.join(tmp, rel), "w", encoding="utf-8") as f:
                json.dump(content, f, indent=2)
        write_clip_tokenizer(os.path.join(tmp, "tokenizer"))
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.isfile(os.path.join(target, "model_index.json")):  # not a concurrent writer's
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """No per-component progress bars or advice (accelerate, ``torch_dtype`` renames) while loading."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = [(m, m.get_verbosity(), m.is_progress_bar_enabled()) for m in (diffusers_logging, transformers_logging)]
    for module, _, _ in saved:
        module.set_verbosity_error()
        module.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # `torch_dtype` -> `dtype`: the old name works everywhere
            yield
    finally:
        for module, verbosity, bars in saved:
            module.set_verbosity(verbosity)
            if bars:
                module.enable_progress_bar()


def _check_model_folder(folder: str, *, what: str) -> str:
    """The pipeline class a diffusers folder declares; one clear error for whatever it lacks."""
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        raise TESwitchError(f"{what}: not a diffusers model folder (no model_index.json); {SINGLE_FILE_HELP}")
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        class_name = str(index["_class_name"])
    except (OSError, ValueError, KeyError) as e:
        raise TESwitchError(f"{what}: unreadable model_index.json ({one_line(e)})") from e
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        sub = os.path.join(folder, name)
        if name.startswith("tokenizer"):
            if not os.path.isdir(sub) or not os.listdir(sub):
                raise TESwitchError(
                    f"{what}: lacks {name}/ (the {spec[1]} files); copy it from the model's diffusers repository"
                )
        elif not os.path.isdir(sub):
            raise TESwitchError(f"{what}: lacks {name}/ that model_index.json lists")
    return class_name
