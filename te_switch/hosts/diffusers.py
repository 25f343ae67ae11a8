"""The diffusers host: clip skip and encoder swaps on a live diffusers pipeline, without a WebUI.

Unlike the WebUI adapters this one patches nothing. It computes the prompt embeddings itself
(:meth:`DiffusersAdapter.encode`) and hands them to the pipeline's ``__call__`` as
``prompt_embeds`` / ``negative_prompt_embeds`` / ``pooled_prompt_embeds`` / …, so:

* clip skip follows docs/DESIGN.md, not diffusers' own ``clip_skip`` argument: N means
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

This module is the adapter alone: loading pipelines, resolving encoder names and generating images
are the standalone wing's (``te_switch.standalone``).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from te_switch.core import clip_skip
from te_switch.core.clip_skip import TowerPlan, run_to_layer
from te_switch.core.compute import autocast_off
from te_switch.core.errors import TESwitchError
from te_switch.core.longclip import chunk_length
from te_switch.core.readers import open_file
from te_switch.core.selection import SLOT_LABELS, Selection
from te_switch.core.tensors import Weight
from te_switch.hosts.base import HostAdapter, Resolver, tower_in, tower_positions
from te_switch.hosts.engine import BuiltinSource, LiveSlot
from te_switch.hosts.slots import hf_clip_blocks, hf_clip_slot, t5_slot, text_transformer

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
T5_SEQUENCE = {"sd3": 256, "flux": 512}  # encode_prompt's default max_sequence_length
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# ---------------------------------------------------------------------------------------------
# the adapter


@dataclass
class _Tower:
    slot: str
    model: torch.nn.Module
    tokenizer: Any
    explicit_precision: bool


Towers = dict[str, _Tower]  # slot -> its module and tokenizer
Plans = dict[str, TowerPlan]  # slot -> its layer
Embeds = dict[str, torch.Tensor]  # the pipeline's ``prompt_embeds`` / ``pooled_prompt_embeds`` / ... kwargs


class DiffusersAdapter(HostAdapter):
    name = "diffusers"

    def __init__(self, pipe: Any, resolver: Resolver | None = None) -> None:
        super().__init__()
        self.pipe = pipe
        self.resolver = resolver  # encoder names -> files (te_switch.standalone.resolver for the CLI)
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

    def missing_layers(self, model: Any) -> dict[str, int]:
        """diffusers' SD2 text encoder has 23 of OpenCLIP-H's 24 layers."""
        if self.family(model) != "sd2":
            return {}
        return {"clip_h": clip_skip.missing_layers("clip_h", len(hf_clip_blocks(model.text_encoder)))}

    def layer_note(self, model: Any, family: str, selection: Selection) -> str | None:
        if family == "sd2" and selection.clip_skip == 1:
            return "layer 24 is not in diffusers' 23-layer SD2 encoder: layer 23 used"
        if family == "sdxl-refiner" and selection.scope == "clip_l":
            return "the refiner has no CLIP-L"
        return None

    def after_swap(self, model: Any) -> None:
        """Tokenizers follow the position count of their tower (77, or 248 for Long-CLIP)."""
        family = self.family(model)
        for slot_name, slot in self.slots(model).items():
            if slot_name == "t5xxl":
                continue
            positions = tower_positions(slot.module)
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

    # -- reporting -------------------------------------------------------------------------------

    def token_budget(self, prompt: str) -> tuple[int, int]:
        """(prompt tokens, tokens one chunk of the first CLIP tower reads): 75, or 246 for Long-CLIP."""
        family = self.family(self.pipe)
        slots = self.slots(self.pipe)
        for slot_name in ("clip_l", "clip_h", "clip_g"):
            if slot_name in slots:
                tokenizer = getattr(self.pipe, COMPONENTS[family or ""][slot_name][1])
                count = len(tokenizer(prompt or "", add_special_tokens=False, truncation=False).input_ids)
                return count, chunk_length(tower_positions(slots[slot_name].module))
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
        with torch.no_grad(), autocast_off(pipe._execution_device) if explicit else contextlib.nullcontext():
            if family in ("sd1", "sd2"):
                return self._encode_sd(family, towers, plans, prompt, negative_prompt, explicit)
            if family in ("sdxl", "sdxl-refiner"):
                return self._encode_sdxl(towers, plans, prompt, negative_prompt, explicit)
            if family == "sd3":
                seq = max_sequence_length or T5_SEQUENCE["sd3"]
                return self._encode_sd3(towers, plans, prompt, negative_prompt, explicit, seq)
            return self._encode_flux(towers, prompt, max_sequence_length or T5_SEQUENCE["flux"])

    def _towers(self, family: str) -> dict[str, _Tower]:
        out = {}
        for slot_name, slot in self.slots(self.pipe).items():
            _, tok_attr = COMPONENTS[family][slot_name]
            applied = self.engine.applied(slot)
            explicit = applied is not None and applied.precision != "auto"
            out[slot_name] = _Tower(slot_name, slot.module, getattr(self.pipe, tok_attr, None), explicit)
        return out

    def denoiser_dtype(self) -> torch.dtype:
        """The dtype of the UNet / transformer (what the embeddings are handed over in)."""
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
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states of ``plan``'s layer, pooled vector or None); forward stops early when it can.

        ``pooled``: None, ``'projected'`` (``text_embeds`` of a ``…WithProjection``) or
        ``'pooler'`` (``pooler_output``).
        """
        model = tower.model
        blocks = hf_clip_blocks(model)
        device = _module_device(model)
        hidden, out = run_to_layer(
            blocks,
            plan.skip,
            lambda: model(ids.to(device), attention_mask=attention_mask),
            stop=pooled is None,
            missing=clip_skip.missing_layers(tower.slot, len(blocks)),
        )
        if plan.final_ln:
            hidden = text_transformer(model).final_layer_norm(hidden)
        vector = None
        if pooled is not None and out is not None:
            vector = out[0] if pooled == "projected" else out.pooler_output
        return hidden, vector

    def _encode_sd(
        self, family: str, towers: Towers, plans: Plans, prompt: str, negative: str | None, explicit: bool
    ) -> Embeds:
        slot = "clip_l" if family == "sd1" else "clip_h"
        tower, plan = towers[slot], plans[slot]
        pipe = self.pipe
        dtype = self.denoiser_dtype() if explicit else tower.model.dtype
        device = pipe._execution_device

        def run(text: str, length: int | None) -> torch.Tensor:
            inputs = self._tokenize(tower, text, length)
            mask = None
            if getattr(tower.model.config, "use_attention_mask", False):
                mask = inputs.attention_mask.to(device)
            hidden, _ = self._clip(tower, inputs.input_ids, plan, attention_mask=mask)
            return hidden.to(dtype=dtype, device=device)

        positive = run(prompt, None)
        negative_embeds = run(negative or "", positive.shape[1])
        return {"prompt_embeds": positive, "negative_prompt_embeds": negative_embeds}

    def _encode_sdxl(self, towers: Towers, plans: Plans, prompt: str, negative: str | None, explicit: bool) -> Embeds:
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
            dtype = self.denoiser_dtype()
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
        return embeds.to(dtype=self.denoiser_dtype() if explicit else tower.model.dtype, device=device)

    def _encode_sd3(
        self, towers: Towers, plans: Plans, prompt: str, negative: str | None, explicit: bool, sequence: int
    ) -> Embeds:
        pipe = self.pipe
        device = pipe._execution_device
        clip_dtype = self.denoiser_dtype() if explicit else towers["clip_l"].model.dtype

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

    def _encode_flux(self, towers: Towers, prompt: str, sequence: int) -> Embeds:
        pipe = self.pipe
        tower = towers["clip_l"]
        ids = self._tokenize(tower, prompt, pipe.tokenizer_max_length).input_ids
        # Flux reads only CLIP-L's pooled vector, so the full forward runs whatever clip skip says
        out = tower.model(ids.to(_module_device(tower.model)), output_hidden_states=False)
        dtype = self.denoiser_dtype() if tower.explicit_precision else tower.model.dtype
        pooled = out.pooler_output.to(dtype=dtype, device=pipe._execution_device)
        t5 = self._t5(towers.get("t5xxl"), prompt, sequence, dtype, towers.get("t5xxl", _NO_T5).explicit_precision)
        return {"prompt_embeds": t5, "pooled_prompt_embeds": pooled}


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
