"""The diffusers host: clip skip and encoder swaps on a live diffusers pipeline, without a WebUI.

Unlike the WebUI adapters this one patches nothing. It computes the prompt embeddings itself
(:meth:`DiffusersAdapter.encode`) and hands them to the pipeline's ``__call__`` as
``prompt_embeds`` / ``negative_prompt_embeds`` / ``pooled_prompt_embeds`` / …, so:

* clip skip follows DESIGN.md, not diffusers' own ``clip_skip`` argument: N means
  ``hidden_states[-N]`` of every CLIP tower (SD1/SD2 then apply the final layer norm, SDXL/SD3 do
  not), for the positive *and* the negative prompt; pooled vectors come from the final layer; T5
  is never skipped. Layers after the chosen one are not computed unless the same tower's pooled
  vector is needed (SDXL's CLIP-G, SD3's two towers);
* with Auto (no clip skip, Built-in slots) the embeddings are exactly those of the pipeline's own
  ``encode_prompt`` — bit for bit;
* a Long-CLIP-L reads one chunk of up to 246 tokens (248 positions); longer prompts are truncated
  there, as diffusers truncates a 77-position CLIP at 75 tokens. On SDXL/SD3 the engine stretches
  CLIP-G to 248 positions and the second tokenizer follows;
* a slot with a precision (fp32/bf16/fp16) computes in that dtype with autocast off, and its
  output is cast to the dtype of the UNet/transformer.

diffusers' SD2 text encoder has 23 layers (OpenCLIP-H without its last block). 24-layer CLIP-H
files go in with layer 24 dropped, and clip skip still counts in the original 24 layers, so
N=1 (layer 24) is not available there and falls back to N=2 (said in the effective-layer line).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from te_switch.core.clip_skip import LayerTap, TowerPlan, block_for_skip
from te_switch.core.detect import TowerInfo, inspect_path
from te_switch.core.errors import IncompatibleError, TESwitchError, one_line
from te_switch.core.library import EncoderLibrary, sha256_of
from te_switch.core.longclip import chunk_length
from te_switch.core.readers import open_file
from te_switch.core.selection import KINDS_BY_SLOT, SCOPE_LABELS, SLOT_LABELS, Selection
from te_switch.core.tensors import Weight
from te_switch.hosts.base import HostAdapter, Resolver, tower_in
from te_switch.hosts.engine import BuiltinSource, EncoderSource, LiveSlot
from te_switch.hosts.slots import hf_clip_slot, t5_slot, text_transformer

# slot -> (text-encoder attribute, tokenizer attribute) per family
COMPONENTS: dict[str, dict[str, tuple[str, str]]] = {
    "sd1": {"clip_l": ("text_encoder", "tokenizer")},
    "sd2": {"clip_h": ("text_encoder", "tokenizer")},
    "sdxl": {"clip_l": ("text_encoder", "tokenizer"), "clip_g": ("text_encoder_2", "tokenizer_2")},
    "sdxl-refiner": {"clip_g": ("text_encoder_2", "tokenizer_2")},
    "sd3": {
        "clip_l": ("text_encoder", "tokenizer"),
        "clip_g": ("text_encoder_2", "tokenizer_2"),
        "t5xxl": ("text_encoder_3", "tokenizer_3"),
    },
    "flux": {"clip_l": ("text_encoder", "tokenizer"), "t5xxl": ("text_encoder_2", "tokenizer_2")},
}
SD2_ORIGINAL_LAYERS = 24  # OpenCLIP-H; diffusers keeps 23
T5_SEQUENCE = {"sd3": 256, "flux": 512}  # encode_prompt's default max_sequence_length
DEFAULT_GUIDANCE = {"flux": 3.5}
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
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# ---------------------------------------------------------------------------------------------
# loading


def load_pipeline(
    path: str, *, config: str | None = None, dtype: torch.dtype | None = None, device: str | None = None
) -> Any:
    """A diffusers pipeline from a model folder or a single-file checkpoint; nothing is downloaded.

    A single file needs ``config``: a local diffusers folder of the same architecture whose
    ``model_index.json`` names the pipeline class and which holds the component configs and
    tokenizers. Every failure is one :class:`TESwitchError` line saying what to provide.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    if not os.path.exists(path):
        raise TESwitchError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        _check_model_folder(path, what=path)
        try:
            with _quiet_loading():
                pipe = diffusers.DiffusionPipeline.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
            raise TESwitchError(f"{path}: cannot load this diffusers folder ({one_line(e)})") from e
    else:
        if not config and single_file_architecture(path) == "sd15":
            config = builtin_config("sd15")
        if not config:
            raise TESwitchError(
                f"{os.path.basename(path)}: a single-file checkpoint other than SD1.x needs {SINGLE_FILE_HELP}"
            )
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


def single_file_architecture(path: str) -> str | None:
    """'sd15' for an SD1.x single-file checkpoint (its CLIP-L under ``cond_stage_model``), else None."""
    towers = inspect_path(path)
    prefixes = {t.prefix for t in towers if t.usable}
    return "sd15" if prefixes == {"cond_stage_model.transformer."} else None


def builtin_config(name: str, root: str | None = None) -> str:
    """The built-in diffusers config folder ``name`` under the TE Switch cache (written once, atomically)."""
    import shutil
    import tempfile

    from te_switch.demo import cache_root
    from te_switch.tokenizers import write_clip_tokenizer

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


# ---------------------------------------------------------------------------------------------
# resolving encoder names


class EncoderResolver:
    """Encoder labels (library names) or file paths → :class:`EncoderSource` for a slot."""

    def __init__(self, library: EncoderLibrary | None = None) -> None:
        self.library = library
        self._hashes: dict[tuple[str, int, float], str] = {}

    def __call__(self, slot: str, name: str) -> EncoderSource:
        if self.library is not None:
            choice = self.library.find(name)
            if choice is not None and choice.tower.kind in KINDS_BY_SLOT[slot]:
                return EncoderSource(choice.file.path, choice.tower, choice.label, self.short_hash(choice.file.path))
        if os.path.exists(name):
            tower = self.tower_for(slot, name)
            return EncoderSource(name, tower, os.path.basename(name), self.short_hash(name))
        where = f" in {', '.join(self.library.folders)}" if self.library and self.library.folders else ""
        raise TESwitchError(f"{name}: no such encoder file{where}")

    def tower_for(self, slot: str, path: str) -> TowerInfo:
        """The tower of ``path`` that fits ``slot`` (a whole checkpoint holds several)."""
        towers = inspect_path(path)
        errors = [t.error for t in towers if t.error]
        if errors:
            raise TESwitchError(errors[0])
        fitting = [t for t in towers if t.usable and t.kind in KINDS_BY_SLOT[slot]]
        named = [t for t in fitting if t.tower in (None, slot)]
        if named or fitting:
            return (named or fitting)[0]
        kinds = ", ".join(sorted({str(t.kind) for t in towers}))
        raise IncompatibleError(f"{os.path.basename(path)}: a {kinds} file cannot go into the {SLOT_LABELS[slot]} slot")

    def slot_of(self, name: str) -> str:
        """Which slot an encoder file belongs in, from its detected kind."""
        towers: list[TowerInfo] = []
        if self.library is not None and (choice := self.library.find(name)) is not None:
            towers = [choice.tower]
        elif os.path.exists(name):
            towers = inspect_path(name)
        else:
            where = f" in {', '.join(self.library.folders)}" if self.library and self.library.folders else ""
            raise TESwitchError(f"{name}: no such encoder file{where}")
        for t in towers:
            if t.error:
                raise TESwitchError(t.error)
            for slot, kinds in KINDS_BY_SLOT.items():
                if t.usable and t.kind in kinds:
                    return slot
        what = towers[0].note or towers[0].kind if towers else "nothing"
        raise TESwitchError(f"{os.path.basename(name)}: not a usable text encoder ({what})")

    def short_hash(self, path: str) -> str:
        if self.library is not None and self.library.contains(path):
            return self.library.short_hash(path)
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_size, st.st_mtime)
        if key not in self._hashes:
            self._hashes[key] = sha256_of(path)[:10]
        return self._hashes[key]


# ---------------------------------------------------------------------------------------------
# the adapter


@dataclass
class GenerationResult:
    image: Any  # PIL.Image.Image
    infotext: str
    params: dict[str, Any]
    timings: dict[str, float]  # seconds: swap, encode, generate
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Tower:
    slot: str
    model: torch.nn.Module
    tokenizer: Any
    explicit_precision: bool


class DiffusersAdapter(HostAdapter):
    name = "diffusers"

    def __init__(self, pipe: Any, library: EncoderLibrary | None = None, *, model_name: str = "") -> None:
        super().__init__()
        self.pipe = pipe
        self.resolver: Resolver = EncoderResolver(library)
        self.model_name = model_name or _model_name(pipe)
        self.last_warnings: list[str] = []
        self._slot_cache: tuple[Any, tuple[Any, ...], dict[str, LiveSlot]] | None = None

    # -- the live model -----------------------------------------------------------------------

    def live_model(self) -> Any:
        return self.pipe

    def family(self, model: Any) -> str | None:
        return pipeline_family(model)

    def slots(self, model: Any) -> dict[str, LiveSlot]:
        family = self.family(model)
        components = COMPONENTS.get(family or "", {})
        modules = tuple(getattr(model, attr, None) for attr, _ in components.values())
        cached = self._slot_cache
        # built once per set of modules: building reads the state dict, which expands kept-compressed weights
        if cached is not None and cached[0] is model and all(a is b for a, b in zip(cached[1], modules, strict=True)):
            return dict(cached[2])
        out: dict[str, LiveSlot] = {}
        for (slot, _), module in zip(components.items(), modules, strict=True):
            if module is None:
                continue  # e.g. SD3 loaded without T5
            if slot == "t5xxl":
                out[slot] = t5_slot(slot, module)
            elif family == "sd2":
                out[slot] = _truncated_tower_slot(
                    hf_clip_slot(slot, module), len(text_transformer(module).encoder.layers)
                )
            else:
                out[slot] = hf_clip_slot(slot, module)
        self._slot_cache = (model, modules, out)
        return dict(out)

    def plans(self, selection: Selection, model: Any = None) -> list[TowerPlan]:
        plans = super().plans(selection, model)
        model = self.live_model() if model is None else model
        if self.family(model) != "sd2":
            return plans
        # the last OpenCLIP-H layer is not in diffusers' SD2 encoder: its layer 23 is the deepest
        deepest = SD2_ORIGINAL_LAYERS - len(text_transformer(model.text_encoder).encoder.layers) + 1
        return [
            TowerPlan(p.tower, max(p.skip, deepest), p.layers, p.final_ln, max(p.skip, deepest) == 2) for p in plans
        ]

    def layer_note(self, model: Any, family: str, selection: Selection) -> str | None:
        if family == "sd2" and selection.clip_skip == 1:
            return "layer 24 is not in diffusers' 23-layer SD2 encoder: layer 23 used"
        if family == "sdxl-refiner" and selection.scope == "clip_l":
            return "the refiner has no CLIP-L"
        return None

    def after_swap(self, model: Any, changed: list[str]) -> None:
        """Tokenizers follow the position count of their tower (77, or 248 for Long-CLIP)."""
        family = self.family(model)
        for slot_name, slot in self.slots(model).items():
            if slot_name == "t5xxl":
                continue
            positions = clip_positions(slot.module)
            tokenizer = getattr(model, COMPONENTS[family or ""][slot_name][1], None)
            if tokenizer is not None:
                tokenizer.model_max_length = positions
            if slot_name == "clip_l" and hasattr(model, "tokenizer_max_length"):
                model.tokenizer_max_length = positions  # SD3 / Flux read this instead

    def builtin_source(self, model: Any, name: str) -> BuiltinSource | None:
        """``from_pretrained`` read the component's folder (its one weights file or index), a single-file
        pipeline the checkpoint, each cast to the component's dtype."""
        module = getattr(model, COMPONENTS.get(self.family(model) or "", {}).get(name, ("", ""))[0], None)
        folder = getattr(module, "name_or_path", None) or getattr(getattr(module, "config", None), "_name_or_path", "")
        path = folder if folder and os.path.exists(folder) else getattr(model.config, "_name_or_path", "")
        if path and os.path.isdir(path):
            try:
                with open_file(path) as src:
                    path = src.path
            except TESwitchError:
                return None
        tower = tower_in(path, name) if path else None
        return BuiltinSource(tower.path, tower) if tower is not None else None

    def install(self) -> None:
        """Nothing to patch: the adapter computes the embeddings and passes them to ``__call__``."""

    def uninstall(self) -> None:
        """Nothing was patched (see :meth:`install`)."""

    # -- reporting -------------------------------------------------------------------------------

    def token_budget(self, prompt: str) -> tuple[int, int]:
        """(prompt tokens, tokens one chunk of the first CLIP tower reads): 75, or 246 for Long-CLIP."""
        family = self.family(self.pipe)
        slots = self.slots(self.pipe)
        for slot_name in ("clip_l", "clip_h", "clip_g"):
            if slot_name in slots:
                tokenizer = getattr(self.pipe, COMPONENTS[family or ""][slot_name][1])
                count = len(tokenizer(prompt or "", add_special_tokens=False, truncation=False).input_ids)
                return count, chunk_length(clip_positions(slots[slot_name].module))
        return 0, 0

    # -- encoding -----------------------------------------------------------------------------

    def encode(
        self,
        selection: Selection,
        prompt: str,
        negative_prompt: str | None = None,
        *,
        max_sequence_length: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """The embedding kwargs for the pipeline's ``__call__`` (applies ``selection`` first).

        ``negative_prompt=None`` follows the pipeline's own convention (SDXL with
        ``force_zeros_for_empty_prompt`` uses zeros; the others encode an empty prompt).
        """
        self.apply(selection)
        pipe = self.pipe
        family = self.family(pipe)
        if family is None:
            raise TESwitchError(f"{type(pipe).__name__}: not a pipeline TE Switch knows")
        self.last_warnings = []
        plans = {p.tower: p for p in self.plans(selection, pipe)}
        towers = self._towers(family)
        explicit = any(t.explicit_precision for t in towers.values())
        with torch.no_grad(), _autocast_off(pipe, explicit):
            if family in ("sd1", "sd2"):
                return self._encode_sd(family, towers, plans, prompt, negative_prompt, explicit)
            if family in ("sdxl", "sdxl-refiner"):
                return self._encode_sdxl(towers, plans, prompt, negative_prompt, explicit)
            if family == "sd3":
                seq = max_sequence_length or T5_SEQUENCE["sd3"]
                return self._encode_sd3(towers, plans, prompt, negative_prompt, explicit, seq)
            return self._encode_flux(towers, prompt, explicit, max_sequence_length or T5_SEQUENCE["flux"])

    def _towers(self, family: str) -> dict[str, _Tower]:
        out = {}
        for slot_name, slot in self.slots(self.pipe).items():
            _, tok_attr = COMPONENTS[family][slot_name]
            applied = self.engine.applied(slot)
            explicit = applied is not None and applied.precision != "auto"
            out[slot_name] = _Tower(slot_name, slot.module, getattr(self.pipe, tok_attr, None), explicit)
        return out

    def _denoiser_dtype(self) -> torch.dtype:
        denoiser = getattr(self.pipe, "unet", None) or getattr(self.pipe, "transformer", None)
        return denoiser.dtype

    def _tokenize(self, tower: _Tower, text: str, length: int | None = None) -> Any:
        """The pipeline's own tokenization (pad to ``length``, truncate); notes dropped tokens."""
        tokenizer = tower.tokenizer
        length = length or tokenizer.model_max_length
        inputs = tokenizer(text, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        total = len(tokenizer(text, add_special_tokens=False, truncation=False).input_ids)
        if tower.slot != "t5xxl" and total > length - 2:
            self.last_warnings.append(
                f"{SLOT_LABELS[tower.slot]} reads {length - 2} tokens: the last {total - (length - 2)} of {total} "
                f"were dropped"
            )
        return inputs

    def _clip(
        self,
        tower: _Tower,
        ids: torch.Tensor,
        plan: TowerPlan,
        *,
        pooled: str | None = None,
        layer_offset: int = 0,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states of ``plan``'s layer, pooled vector or None); forward stops early when it can.

        ``pooled``: None, ``'projected'`` (``text_embeds`` of a ``…WithProjection``) or
        ``'pooler'`` (``pooler_output``).
        """
        model = tower.model
        blocks = text_transformer(model).encoder.layers
        index = block_for_skip(len(blocks), plan.skip, layer_offset=layer_offset)
        device = _module_device(model)
        out = None
        with LayerTap(blocks[index], stop=pooled is None) as tap:
            out = model(ids.to(device), attention_mask=attention_mask)
        hidden = tap.output
        if hidden is None:
            raise RuntimeError(f"{SLOT_LABELS[tower.slot]}: block {index} produced no output")
        if plan.final_ln:
            hidden = text_transformer(model).final_layer_norm(hidden)
        vector = None
        if pooled is not None and out is not None:
            vector = out[0] if pooled == "projected" else out.pooler_output
        return hidden, vector

    def _encode_sd(
        self,
        family: str,
        towers: dict[str, _Tower],
        plans: dict[str, TowerPlan],
        prompt: str,
        negative: str | None,
        explicit: bool,
    ) -> dict[str, torch.Tensor]:
        slot = "clip_l" if family == "sd1" else "clip_h"
        tower, plan = towers[slot], plans[slot]
        offset = SD2_ORIGINAL_LAYERS - len(text_transformer(tower.model).encoder.layers) if family == "sd2" else 0
        pipe = self.pipe
        dtype = self._denoiser_dtype() if explicit else tower.model.dtype
        device = pipe._execution_device

        def run(text: str, length: int | None) -> torch.Tensor:
            inputs = self._tokenize(tower, text, length)
            mask = None
            if getattr(tower.model.config, "use_attention_mask", False):
                mask = inputs.attention_mask.to(device)
            hidden, _ = self._clip(tower, inputs.input_ids, plan, layer_offset=offset, attention_mask=mask)
            return hidden.to(dtype=dtype, device=device)

        positive = run(prompt, None)
        negative_embeds = run(negative or "", positive.shape[1])
        return {"prompt_embeds": positive, "negative_prompt_embeds": negative_embeds}

    def _encode_sdxl(
        self,
        towers: dict[str, _Tower],
        plans: dict[str, TowerPlan],
        prompt: str,
        negative: str | None,
        explicit: bool,
    ) -> dict[str, torch.Tensor]:
        pipe = self.pipe
        order = [s for s in ("clip_l", "clip_g") if s in towers]

        def run(text: str, length: int | None) -> tuple[torch.Tensor, torch.Tensor]:
            parts, pooled = [], None
            for slot in order:
                tower = towers[slot]
                ids = self._tokenize(tower, text, length).input_ids
                hidden, vector = self._clip(tower, ids, plans[slot], pooled="projected" if slot == "clip_g" else None)
                parts.append(hidden)
                pooled = vector if vector is not None else pooled
            return torch.concat(parts, dim=-1), pooled  # type: ignore[return-value]

        positive, pooled = run(prompt, None)
        if negative is None and pipe.config.force_zeros_for_empty_prompt:
            negative_embeds, negative_pooled = torch.zeros_like(positive), torch.zeros_like(pooled)
        else:
            negative_embeds, negative_pooled = run(negative or "", positive.shape[1])
        device = pipe._execution_device
        if explicit:
            dtype = self._denoiser_dtype()
        else:
            dtype = pipe.text_encoder_2.dtype if pipe.text_encoder_2 is not None else pipe.unet.dtype
        # diffusers casts the hidden states, not the pooled vectors
        return {
            "prompt_embeds": positive.to(dtype=dtype, device=device),
            "negative_prompt_embeds": negative_embeds.to(dtype=dtype, device=device),
            "pooled_prompt_embeds": pooled.to(dtype=dtype) if explicit else pooled,
            "negative_pooled_prompt_embeds": negative_pooled.to(dtype=dtype) if explicit else negative_pooled,
        }

    def _t5(self, tower: _Tower | None, text: str, length: int, dtype: torch.dtype, explicit: bool) -> torch.Tensor:
        pipe = self.pipe
        device = pipe._execution_device
        if tower is None:  # SD3 without T5 conditions on zeros
            dim = pipe.transformer.config.joint_attention_dim
            return torch.zeros((1, length, dim), device=device, dtype=dtype)
        ids = tower.tokenizer(
            text,
            padding="max_length",
            max_length=length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        embeds = tower.model(ids.to(_module_device(tower.model)))[0]
        return embeds.to(dtype=self._denoiser_dtype() if explicit else tower.model.dtype, device=device)

    def _encode_sd3(
        self,
        towers: dict[str, _Tower],
        plans: dict[str, TowerPlan],
        prompt: str,
        negative: str | None,
        explicit: bool,
        sequence: int,
    ) -> dict[str, torch.Tensor]:
        pipe = self.pipe
        device = pipe._execution_device
        clip_dtype = self._denoiser_dtype() if explicit else towers["clip_l"].model.dtype

        def run(text: str) -> tuple[torch.Tensor, torch.Tensor]:
            hiddens, pooled = [], []
            for slot in ("clip_l", "clip_g"):
                ids = self._tokenize(towers[slot], text, pipe.tokenizer_max_length).input_ids
                hidden, vector = self._clip(towers[slot], ids, plans[slot], pooled="projected")
                hiddens.append(hidden.to(dtype=clip_dtype, device=device))
                pooled.append(vector.to(dtype=clip_dtype) if explicit else vector)
            clip = torch.cat(hiddens, dim=-1)
            t5 = self._t5(
                towers.get("t5xxl"), text, sequence, clip_dtype, towers.get("t5xxl", _NO_T5).explicit_precision
            )
            clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)  # type: ignore[arg-type]

        positive, pooled = run(prompt)
        negative_embeds, negative_pooled = run(negative or "")
        return {
            "prompt_embeds": positive,
            "negative_prompt_embeds": negative_embeds,
            "pooled_prompt_embeds": pooled,
            "negative_pooled_prompt_embeds": negative_pooled,
        }

    def _encode_flux(
        self, towers: dict[str, _Tower], prompt: str, explicit: bool, sequence: int
    ) -> dict[str, torch.Tensor]:
        pipe = self.pipe
        tower = towers["clip_l"]
        ids = self._tokenize(tower, prompt, pipe.tokenizer_max_length).input_ids
        # Flux reads only CLIP-L's pooled vector, so the full forward runs whatever clip skip says
        out = tower.model(ids.to(_module_device(tower.model)), output_hidden_states=False)
        dtype = self._denoiser_dtype() if tower.explicit_precision else tower.model.dtype
        pooled = out.pooler_output.to(dtype=dtype, device=pipe._execution_device)
        t5 = self._t5(towers.get("t5xxl"), prompt, sequence, dtype, towers.get("t5xxl", _NO_T5).explicit_precision)
        return {"prompt_embeds": t5, "pooled_prompt_embeds": pooled}

    # -- generating -----------------------------------------------------------------------------

    def generate(
        self,
        selection: Selection,
        prompt: str,
        negative_prompt: str = "",
        seed: int = 0,
        steps: int = 20,
        size: int | tuple[int, int] | None = None,
        guidance: float | None = None,
    ) -> GenerationResult:
        """Apply ``selection``, encode, run the pipeline; returns the image, its infotext and timings.

        An empty negative prompt follows the pipeline's own convention (see :meth:`encode`).
        """
        family = self.family(self.pipe)
        started = time.perf_counter()
        self.apply(selection)
        swapped = time.perf_counter()
        embeds = self.encode(selection, prompt, negative_prompt or None)
        encoded = time.perf_counter()
        width, height = _size(self.pipe, size)
        guidance = DEFAULT_GUIDANCE.get(family or "", 7.0) if guidance is None else guidance
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        with self._embeds_kept_as_given(family):
            output = self.pipe(
                **embeds,
                num_inference_steps=int(steps),
                guidance_scale=float(guidance),
                width=width,
                height=height,
                generator=generator,
                output_type="pil",
            )
        done = time.perf_counter()
        params = self.params(selection, prompt, negative_prompt, seed, steps, (width, height), guidance)
        timings = {"swap": swapped - started, "encode": encoded - swapped, "generate": done - encoded}
        return GenerationResult(output.images[0], format_infotext(params), params, timings, list(self.last_warnings))

    @contextlib.contextmanager
    def _embeds_kept_as_given(self, family: str | None) -> Iterator[None]:
        """SD1/SD2/SDXL's ``__call__`` re-casts given embeds to the text encoder's dtype; a slot computing
        at another precision than the UNet would then feed it the wrong dtype. For the call, that
        encoder is hidden from the pipeline (which then casts to the UNet's dtype) — not from its config."""
        attr = {"sd1": "text_encoder", "sd2": "text_encoder", "sdxl": "text_encoder_2"}.get(family or "")
        encoder = getattr(self.pipe, attr, None) if attr else None
        if encoder is None or encoder.dtype == self._denoiser_dtype():
            yield
            return
        object.__setattr__(self.pipe, attr, None)  # bypasses DiffusionPipeline.__setattr__: config untouched
        try:
            yield
        finally:
            object.__setattr__(self.pipe, attr, encoder)

    def params(
        self,
        selection: Selection,
        prompt: str,
        negative_prompt: str,
        seed: int,
        steps: int,
        size: tuple[int, int],
        guidance: float,
    ) -> dict[str, Any]:
        """WebUI-style generation parameters (what the infotext says) for one image."""
        params: dict[str, Any] = {
            "Prompt": prompt,
            "Negative prompt": negative_prompt,
            "Steps": int(steps),
            "Sampler": type(self.pipe.scheduler).__name__.removesuffix("Scheduler"),
            "CFG scale": float(guidance),
            "Seed": int(seed),
            "Size": f"{size[0]}x{size[1]}",
            "Model": self.model_name,
        }
        if selection.clip_skip is not None:
            params["Clip skip"] = selection.clip_skip
            if selection.scope != "both":
                params[SCOPE_KEY] = SCOPE_LABELS[selection.scope]
        model = self.live_model()
        for slot_name, slot in self.slots(model).items():
            applied = self.engine.applied(slot)
            label = SLOT_LABELS[slot_name]
            if applied is None:
                continue
            if applied.source is not None:
                src = applied.source
                params[SLOT_KEY.format(label)] = f"{src.label} [{src.short_hash}]" if src.short_hash else src.label
            if applied.precision != "auto":
                params[PRECISION_KEY.format(label)] = applied.precision
        return params


_NO_T5 = _Tower("t5xxl", torch.nn.Module(), None, False)


def pipeline_family(pipe: Any) -> str | None:
    """The family of a diffusers pipeline, from its class and components."""
    name = type(pipe).__name__
    encoder = getattr(pipe, "text_encoder", None)
    if name.startswith("StableDiffusionXL"):
        return "sdxl-refiner" if encoder is None else "sdxl"
    if name.startswith("StableDiffusion3"):
        return "sd3"
    if name.startswith("Flux"):
        return "flux"
    if name.startswith("StableDiffusion") and encoder is not None:
        config = encoder.config
        if config.hidden_size == 1024 or config.num_hidden_layers in (23, 24):
            return "sd2"
        return "sd1"
    return None


def clip_positions(model: torch.nn.Module) -> int:
    """Position count of a HF CLIP text model (from the table's shape: no state dict, nothing expanded)."""
    return int(text_transformer(model).embeddings.position_embedding.weight.shape[0])


def _truncated_tower_slot(slot: LiveSlot, live_layers: int) -> LiveSlot:
    """A slot whose module lacks the tower's last block (diffusers' SD2): that block of a file is dropped."""
    inner = slot.to_host

    def to_host(sd: Mapping[str, Weight]) -> dict[str, Weight]:
        out = inner(sd)
        indices = {int(m.group(1)) for k in out if (m := _LAYER.search(k))}
        if indices and max(indices) == live_layers:  # exactly one block more than the host keeps
            out = {k: v for k, v in out.items() if not ((m := _LAYER.search(k)) and int(m.group(1)) >= live_layers)}
        return out

    slot.to_host = to_host
    return slot


def _module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


@contextlib.contextmanager
def _autocast_off(pipe: Any, explicit: bool) -> Iterator[None]:
    """fp32 (or any chosen precision) must really compute in that dtype: no autocast around the encode."""
    if not explicit:
        yield
        return
    device_type = pipe._execution_device.type
    with torch.autocast(device_type=device_type, enabled=False):
        yield


def _size(pipe: Any, size: int | tuple[int, int] | None) -> tuple[int, int]:
    if size is None:
        default = getattr(pipe, "default_sample_size", None)
        if default is None:
            default = pipe.unet.config.sample_size
        side = int(default) * int(pipe.vae_scale_factor)
        return side, side
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def _model_name(pipe: Any) -> str:
    path = getattr(getattr(pipe, "config", None), "_name_or_path", "") or ""
    return os.path.basename(os.path.normpath(path)) if path else type(pipe).__name__


# ---------------------------------------------------------------------------------------------
# infotext (the WebUI's "parameters" text: prompt, negative prompt, then `Key: value, ...`)

# the same keys the WebUI side writes (te_switch/webui/infotext.py), so pasting works both ways
SLOT_KEY = "TE {}"  # e.g. "TE CLIP-L: clip-l-alt.safetensors [1a2b3c4d5e]"
PRECISION_KEY = "TE {} precision"
SCOPE_KEY = "Clip skip scope"  # "CLIP-L only" | "CLIP-G only"; absent = both
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _quote(value: Any) -> str:
    text = str(value)
    if any(c in text for c in ',:"\n'):
        return json.dumps(text, ensure_ascii=False)
    return text


def format_infotext(params: Mapping[str, Any]) -> str:
    """``prompt\\nNegative prompt: …\\nKey: value, …`` exactly as the WebUIs write it."""
    lines = [str(params.get("Prompt", ""))]
    if params.get("Negative prompt"):
        lines.append(f"Negative prompt: {params['Negative prompt']}")
    rest = {k: v for k, v in params.items() if k not in ("Prompt", "Negative prompt")}
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in rest.items()))
    return "\n".join(lines)


def parse_infotext(text: str) -> dict[str, Any]:
    """The inverse of :func:`format_infotext` (values stay strings, except digits become ints)."""
    *head, last = text.strip("\n").split("\n")
    if len(_PARAM.findall(last)) < 3:  # no parameter line: everything is prompt
        head, last = [*head, last], ""
    prompt_lines, negative_lines, target = [], [], None
    for line in head:
        if line.startswith("Negative prompt:"):
            target = negative_lines
            line = line[len("Negative prompt:") :].strip()
        (negative_lines if target is negative_lines else prompt_lines).append(line)
    params: dict[str, Any] = {"Prompt": "\n".join(prompt_lines), "Negative prompt": "\n".join(negative_lines)}
    for key, raw in _PARAM.findall(last):
        value: Any = raw.strip()
        if value.startswith('"') and value.endswith('"'):
            value = json.loads(value)
        elif re.fullmatch(r"-?\d+", value):
            value = int(value)
        params[key.strip()] = value
    return params


def selection_from_params(params: Mapping[str, Any]) -> Selection:
    """The :class:`Selection` an infotext describes (encoder labels without their hash)."""
    from te_switch.core.selection import SlotChoice, parse_clip_skip

    slots = {}
    for slot_name, label in SLOT_LABELS.items():
        encoder = params.get(SLOT_KEY.format(label))
        precision = params.get(PRECISION_KEY.format(label), "auto")
        if encoder is None and precision == "auto":
            continue
        name = re.sub(r"\s*\[[0-9a-f]+\]$", "", str(encoder)) if encoder else None
        slots[slot_name] = SlotChoice(name, str(precision))
    scope_text = str(params.get(SCOPE_KEY, "both"))
    scope = next((s for s, label in SCOPE_LABELS.items() if scope_text in (s, label)), "both")
    return Selection(parse_clip_skip(params.get("Clip skip")), scope, slots)
