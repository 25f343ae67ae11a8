"""reForge and Forge Classic host adapter: the Forges that keep A1111's text path over ``ldm_patched``.

Both (Panchovix/stable-diffusion-webui-reForge ``main``, Haoming02/sd-webui-forge-classic ``classic``) build
the model the way the first Forge did (``modules_forge.forge_loader.load_model_for_a1111``): A1111's
``sd_hijack_clip`` wrappers, subclassed in ``modules_forge.forge_clip``, encode the prompt, and their
``wrapped.transformer`` is a transformers ``CLIPTextModel`` built by ``ldm_patched`` (``SDClipModel``) with
ComfyUI-style casting layers: fp16 weights (also on the CPU), fp32 embeddings and activations.

Where the encoders live (``sd_model`` = ``modules.sd_models.model_data.sd_model``)
------------------------------------------------------------------------------------
* SD1 ``cond_stage_model`` (``CLIP_SD_15_L``); SD2 ``cond_stage_model`` (``CLIP_SD_21_H``); SDXL
  ``conditioner.embedders`` (``CLIP_SD_XL_L``, ``CLIP_SD_XL_G``); the refiner has only the G wrapper.
* The weights belong to ``forge_objects.clip.cond_stage_model.clip_l/clip_g/clip_h`` (``SDClipModel``): its
  ``transformer`` (HF layout, CLIP-G included — there is no OpenCLIP tower) plus, for CLIP-G, the raw
  ``text_projection`` the wrapper multiplies the pooled vector by. A slot is that ``SDClipModel``.
* ``EmbeddingsWithFixes`` registers the token table twice (``weight`` and ``wrapped.weight``): one load fills both.

Clip skip
---------
The wrappers' ``encode_with_transformers`` are patched at class level. The host's own code runs whenever clip
skip is Auto and the slot has no explicit precision (a swapped file then encodes exactly as the host would).
reForge honours its Clip skip setting above each wrapper's ``minimal_clip_skip`` (SD1 1, SD2/SDXL 2) on every
tower; Forge Classic honours it on SD1 only (SD2/SDXL stay at the penultimate layer). An explicit clip skip
replaces both (and reForge's dynamic clip skip): ``hidden_states[-N]`` with the final layer norm on SD1/SD2,
without on SDXL, layers after it not computed except on CLIP-G, whose pooled vector needs the last layer.
An explicit precision computes the whole tower in that dtype and hands back fp32, as the host does.

Swaps
-----
LoRA is merged into the text encoder when its patcher is loaded (``ModelPatcher`` keeps the originals as
backups and may replace the Parameters), so before any slot changes every loaded patcher of the text encoder
is unloaded (backups restored); the host's next ``load_model_gpu`` merges LoRA onto the new weights. Long-CLIP
sets the wrappers' ``chunk_length`` to 246 (SDXL's CLIP-G is stretched to 248 positions). The cond caches learn
the adapter's state through ``cached_params``. Both hosts build new encoder objects on every model load and
call ``on_model_loaded``, which re-applies the last selection. reForge keeps several models loaded and switching
to one of them fires no callback: the next generation's ``apply`` makes that model match.

reForge's "Text Encoder" setting
--------------------------------
It replaces all encoders of the checkpoint with those of another checkpoint at load time (a forced reload
when it changes). What it loaded is the slots' Built-in: a file chosen here loads into those live modules and
wins for that slot, Built-in gives back what reForge loaded (read back from that checkpoint, like the
model's own file otherwise: :meth:`LdmForgeAdapter.builtin_source`). The panel line says which one is in force.

Only this module and :mod:`te_switch.hosts.a1111` (whose A1111 bookkeeping it reuses) touch ``modules.*``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from te_switch.core.clip_skip import FINAL_LAYER_NORM, TOWER_LAYERS, TowerPlan, run_to_layer, tower_plan
from te_switch.core.convert import CANONICAL_PROJECTION
from te_switch.core.layouts import transpose
from te_switch.core.selection import SLOT_LABELS, SLOTS_BY_FAMILY, Selection
from te_switch.core.tensors import Weight, as_dense
from te_switch.hosts import sdwebui
from te_switch.hosts.a1111 import A1111Adapter, Patch, _hf_clip_layer, _own_precision
from te_switch.hosts.base import tower_in
from te_switch.hosts.engine import BuiltinSource, LiveSlot, SlotRequest, SwapEngine
from te_switch.hosts.slots import hf_clip_blocks, hf_clip_slot, text_transformer

# forge_clip wrapper class -> the tower it encodes
WRAPPER_TOWERS = {
    "CLIP_SD_15_L": "clip_l",
    "CLIP_SD_XL_L": "clip_l",
    "CLIP_SD_21_H": "clip_h",
    "CLIP_SD_XL_G": "clip_g",
}
HOLDER = "transformer."  # the SDClipModel's own prefix for its HF module
HOST_LABELS = {"reforge": "reForge", "forge-classic": "Forge Classic"}


def host_name() -> str:
    """'forge-classic' for Haoming02's Forge Classic, 'reforge' for every other ldm_patched Forge."""
    try:
        from modules_forge import forge_version

        return "forge-classic" if str(getattr(forge_version, "version", "")).startswith("classic") else "reforge"
    except ImportError:
        return "reforge"


class LdmForgeAdapter(A1111Adapter):
    """A1111's bookkeeping (cond caches, empty cond, chunk lengths, reload callbacks, patching) over Forge's objects."""

    def __init__(self, engine: SwapEngine | None = None) -> None:
        super().__init__(engine)
        self.name = host_name()
        self.label = HOST_LABELS[self.name]
        self.loads = 0  # model loads seen: each builds new encoder objects

    # -- the live model -----------------------------------------------------------------------

    def family(self, model: Any) -> str | None:
        towers = _wrappers(model)
        if getattr(model, "conditioner", None) is not None:
            if {"clip_l", "clip_g"} <= towers.keys():
                return "sdxl"
            return "sdxl-refiner" if "clip_g" in towers else None
        if "clip_h" in towers:
            return "sd2"
        return "sd1" if "clip_l" in towers else None

    def slots(self, model: Any) -> dict[str, LiveSlot]:
        family = self.family(model)
        out: dict[str, LiveSlot] = {}
        for name, wrapper in _wrappers(model).items():
            holder = _holder(model, wrapper)
            if holder is not None and name in SLOTS_BY_FAMILY.get(family or "", ()):
                out[name] = _holder_slot(name, holder)
        return out

    # -- what the host itself does --------------------------------------------------------------

    def _host_clip_skip(self) -> int:
        from modules.shared import opts

        return int(opts.CLIP_stop_at_last_layers)

    def auto_plans(self, model: Any, family: str) -> list[TowerPlan]:
        """The layers the host uses with its own Clip skip setting (see the module notes)."""
        setting = self._host_clip_skip()
        plans = []
        for tower, wrapper in _wrappers(model).items():
            n, final_ln = _host_layer(wrapper, tower, family, setting)
            plans.append(tower_plan(family, tower, n, final_ln=final_ln))
        return plans

    def layer_note(self, model: Any, family: str, selection: Selection) -> str | None:
        from modules.shared import opts

        notes = []
        setting = self._host_clip_skip()
        if selection.clip_skip is None:
            if any(not p.native for p in self.auto_plans(model, family)):
                notes.append(f"from {self.label}'s Clip skip setting")
        elif any(
            _host_layer(w, t, family, setting) != _host_layer(w, t, family, 1) for t, w in _wrappers(model).items()
        ):
            notes.append(f"replaces {self.label}'s Clip skip setting")
        if selection.clip_skip is not None and getattr(opts, "dynamic_clip_skip_enabled", False):
            notes.append(f"{self.label}'s dynamic clip skip is overridden")
        te = self.host_text_encoder(model)
        if te is not None:
            notes.append(self._text_encoder_note(model, te, selection))
        return "; ".join(notes) or None

    def host_text_encoder(self, model: Any = None) -> str | None:
        """reForge's "Text Encoder" setting, when it loaded this model's encoders from another file."""
        model = self.live_model() if model is None else model
        if model is None or not getattr(model, "_separate_te_loaded", False):
            return None
        try:
            from modules import sd_text_encoder
        except ImportError:
            return "a separate text encoder"
        option = getattr(sd_text_encoder, "current_text_encoder_option", None)
        source = getattr(getattr(option, "te_info", None), "filename", None)
        if source is not None and source == getattr(getattr(model, "sd_checkpoint_info", None), "filename", None):
            return None  # "Automatic" finds the checkpoint itself in its own folder: its own encoders
        return str(getattr(option, "label", None) or "a separate text encoder")

    def _text_encoder_note(self, model: Any, te: str, selection: Selection) -> str:
        names = list(self.slots(model))
        ours = [SLOT_LABELS[n] for n in names if not selection.slot(n).is_builtin]
        theirs = [SLOT_LABELS[n] for n in names if selection.slot(n).is_builtin]
        setting = f"{self.label}'s Text Encoder '{te}'"
        if not ours:
            return f"text encoders from {setting}"
        if not theirs:
            return f"text encoders from TE Switch ({setting} is not used)"
        return f"{', '.join(ours)} from TE Switch, {', '.join(theirs)} from {setting}"

    def status(self) -> dict[str, Any]:
        out = super().status()
        out["host_text_encoder"] = self.host_text_encoder()
        return out

    # -- making the model match -----------------------------------------------------------------

    def commit(self, model: Any, requests: list[SlotRequest]) -> list[str]:
        if any(self.engine.would_change(r) for r in requests):
            self._release(model)
        return super().commit(model, requests)

    def _release(self, model: Any) -> None:
        """Unload every patcher of the text encoder: LoRA's merged weights go back to the checkpoint's."""
        from ldm_patched.modules import model_management

        clip = getattr(getattr(model, "forge_objects", None), "clip", None)
        joint = getattr(clip, "cond_stage_model", None)
        if joint is None:
            return
        for loaded in list(model_management.current_loaded_models):
            if getattr(getattr(loaded, "model", None), "model", None) is joint:
                loaded.model_unload()
                model_management.current_loaded_models.remove(loaded)
        for objects in (model.forge_objects, getattr(model, "forge_objects_after_applying_lora", None)):
            patcher = getattr(getattr(objects, "clip", None), "patcher", None)
            if patcher is not None and getattr(patcher, "model", None) is joint and patcher.backup:
                patcher.unpatch_model()  # merged but not on the loaded list (a clone replaced it there)
        model_management.soft_empty_cache()

    def restore_before_load(self, model: Any) -> list[str]:
        return []  # every load builds new encoder objects: nothing of ours is in the way

    def on_model_loaded(self, sd_model: Any) -> list[str]:
        self.loads += 1
        return super().on_model_loaded(sd_model)

    def cond_signature(self) -> tuple:
        """reForge's Text Encoder setting reloads the same checkpoint with other encoders, and the host's
        cond-cache key (prompt, checkpoint, clip skip) stays the same: the load count tells them apart."""
        return (*super().cond_signature(), self.loads)

    def builtin_source(self, model: Any, name: str) -> BuiltinSource | None:
        """Both loaders build the ``SDClipModel``s from one file: the checkpoint, or the checkpoint reForge's
        Text Encoder setting names. They convert its keys to the HF layout the slot maps to (OpenCLIP's
        fused attention split, CLIP-G's projection kept raw) and copy each tensor into the slot's dtype
        (``load_state_dict``); what the file lacks stays as the constructor made it (an identity
        ``text_projection`` on CLIP-L/CLIP-H). The engine proves this against its fingerprints."""
        wrapper = _wrappers(model).get(name)
        holder = _holder(model, wrapper) if wrapper is not None else None
        tower = tower_in(self.encoder_file(model), name) if holder is not None else None
        if tower is None or holder is None:
            return None
        slot = _holder_slot(name, holder)
        projection = getattr(holder, "text_projection", None)

        def to_host(sd: Mapping[str, Weight]) -> dict[str, Weight]:
            out = slot.to_host(sd)
            if isinstance(projection, torch.Tensor) and "text_projection" not in out:
                out["text_projection"] = torch.eye(projection.shape[0])  # SDClipModel's own, in fp32
            return out

        return BuiltinSource(tower.path, tower, to_host=to_host)

    def encoder_file(self, model: Any) -> str | None:
        """The file the model's text encoders were loaded from."""
        if getattr(model, "_separate_te_loaded", False):
            try:
                from modules import sd_text_encoder
            except ImportError:
                return None
            option = getattr(sd_text_encoder, "current_text_encoder_option", None)
            return getattr(getattr(option, "te_info", None), "filename", None)
        return getattr(getattr(model, "sd_checkpoint_info", None), "filename", None)

    # -- patches --------------------------------------------------------------------------------

    def patch_targets(self) -> list[sdwebui.PatchTarget]:
        from modules import processing
        from modules_forge import forge_clip

        return [
            (forge_clip.CLIP_SD_15_L, "encode_with_transformers", self._encode_patch("clip_l", move=True)),
            (forge_clip.CLIP_SD_21_H, "encode_with_transformers", self._encode_patch("clip_h", move=True)),
            (forge_clip.CLIP_SD_XL_L, "encode_with_transformers", self._encode_patch("clip_l")),
            (forge_clip.CLIP_SD_XL_G, "encode_with_transformers", self._encode_patch("clip_g")),
            (processing.StableDiffusionProcessing, "cached_params", self._cached_params_patch),
        ]

    def _encode_patch(self, tower: str, *, move: bool = False) -> Patch:
        """A wrapper's ``encode_with_transformers``: the host's own code unless the generation asks this
        tower for another layer (the panel's plan) or another dtype."""

        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(original)
            def encode_with_transformers(wrapper: Any, tokens: torch.Tensor) -> torch.Tensor:
                plan = self.active_plan(tower)
                holder = _holder(self.live_model(), wrapper) if self.active is not None else None
                dtype = self.slot_dtype(tower, holder) if holder is not None else None
                if plan is None and dtype is None:
                    return original(wrapper, tokens)
                transformer = wrapper.wrapped.transformer
                with _own_precision(dtype, transformer):
                    if plan is None:
                        z = original(wrapper, tokens)
                    else:
                        if move:
                            from modules_forge.forge_clip import move_clip_to_gpu

                            move_clip_to_gpu()  # loads the patcher: LoRA merges now
                        text_transformer(transformer).embeddings.to(tokens.device)
                        if tower == "clip_g":
                            z = _pooled_layer(wrapper, tokens, plan)
                        else:
                            z = _hf_clip_layer(transformer, tokens, plan)
                return _as_float32(z, dtype)

            return encode_with_transformers

        return make


# ---------------------------------------------------------------------------------------------
# finding the encoders


def _wrappers(model: Any) -> dict[str, Any]:
    """Tower -> the forge_clip wrapper that encodes it."""
    if model is None:
        return {}
    conditioner = getattr(model, "conditioner", None)
    candidates = list(getattr(conditioner, "embedders", ())) if conditioner is not None else []
    candidates = candidates or [getattr(model, "cond_stage_model", None)]
    out: dict[str, Any] = {}
    for wrapper in candidates:
        tower = next((WRAPPER_TOWERS[c.__name__] for c in type(wrapper).__mro__ if c.__name__ in WRAPPER_TOWERS), None)
        transformer = getattr(getattr(wrapper, "wrapped", None), "transformer", None)
        if tower is not None and isinstance(transformer, torch.nn.Module):
            out.setdefault(tower, wrapper)
    return out


def _holder(model: Any, wrapper: Any) -> torch.nn.Module | None:
    """The ``SDClipModel`` whose ``transformer`` the wrapper encodes with."""
    joint = getattr(getattr(getattr(model, "forge_objects", None), "clip", None), "cond_stage_model", None)
    transformer = wrapper.wrapped.transformer
    for name in ("clip_l", "clip_g", "clip_h"):
        holder = getattr(joint, name, None)
        if isinstance(holder, torch.nn.Module) and getattr(holder, "transformer", None) is transformer:
            return holder
    return None


def _holder_slot(name: str, holder: torch.nn.Module) -> LiveSlot:
    """A slot over an ``SDClipModel``: its HF ``transformer.*`` and, for CLIP-G, the raw ``text_projection``."""
    inner = hf_clip_slot(name, holder.transformer)
    live = set(holder.state_dict().keys())
    raw_projection = name == "clip_g" and "text_projection" in live

    def to_host(sd: Mapping[str, Weight]) -> dict[str, Weight]:
        canonical = {k: as_dense(v) for k, v in sd.items()}  # the host computes CLIP dense
        out: dict[str, Weight] = {HOLDER + k: v for k, v in inner.to_host(canonical).items()}
        projection = canonical.get(CANONICAL_PROJECTION)
        if raw_projection and projection is not None:
            # the host computes pooled @ P: P is the transpose of the HF Linear weight
            out["text_projection"] = transpose(projection)
        return out

    def prefixed(keys: frozenset[str]) -> frozenset[str]:
        return frozenset(HOLDER + k for k in keys)

    own = {k for k in live if not k.startswith(HOLDER)}  # text_projection, logit_scale: a file may lack them
    table_twice = {k for k in live if k.endswith("embeddings.token_embedding.wrapped.weight")}
    return LiveSlot(
        name,
        holder,
        to_host,
        optional=prefixed(inner.optional) | own,
        derived=prefixed(inner.derived) | table_twice,
        position_keys=prefixed(inner.position_keys),
        resize=inner.resize,
    )


def _host_layer(wrapper: Any, tower: str, family: str, setting: int) -> tuple[int, bool]:
    """(N, final LN) the wrapper's own ``encode_with_transformers`` uses with Clip skip ``setting``."""
    minimal = getattr(wrapper, "minimal_clip_skip", None)  # reForge; Forge Classic honours the setting on SD1 only
    sd1 = family == "sd1"
    if (minimal is not None or sd1) and setting > (minimal or 1):
        return min(setting, TOWER_LAYERS[tower]), FINAL_LAYER_NORM[family]
    if sd1:
        return 1, True  # last_hidden_state
    wrapped = wrapper.wrapped
    if getattr(wrapped, "layer", "last") == "last":
        return 1, True  # last_hidden_state is normalised
    index = int(wrapped.layer_idx)
    return (-index if index < 0 else TOWER_LAYERS[tower] + 1 - index), FINAL_LAYER_NORM[family]


# ---------------------------------------------------------------------------------------------
# the encode step


def _pooled_layer(wrapper: Any, tokens: torch.Tensor, plan: TowerPlan) -> torch.Tensor:
    """SDXL's G: the plan's block output (no LN) and the host's pooled vector from the full tower."""
    transformer = wrapper.wrapped.transformer
    z, outputs = run_to_layer(hf_clip_blocks(transformer), plan.skip, lambda: transformer(input_ids=tokens), stop=False)
    projection = wrapper.wrapped.text_projection
    z.pooled = outputs.pooler_output.float().to(projection.device) @ projection.float()
    return z


def _as_float32(z: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """The host's wrappers hand fp32 on (fp32 embeddings); a slot computing in its own dtype does too."""
    if dtype is None or z.dtype == torch.float32:
        return z
    return sdwebui.cast_cond(z, torch.float32)
