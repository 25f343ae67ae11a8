"""AUTOMATIC1111 stable-diffusion-webui 1.10.x host adapter.

Where the encoders live (the live model is ``sd_models.model_data.sd_model``; A1111 wraps every
text encoder in a ``…WithCustomWords`` object whose ``.wrapped`` is the ldm/sgm module):

* SD1: ``cond_stage_model.wrapped.transformer`` — transformers ``CLIPTextModel``
* SD2: ``cond_stage_model.wrapped.model`` — OpenCLIP-H (fused ``in_proj``, sequence-first)
* SDXL: ``conditioner.embedders[0].wrapped.transformer`` (CLIP-L), ``[1].wrapped.model`` (OpenCLIP-G);
  the refiner has only the G embedder
* SD3: ``text_encoders.{clip_l,clip_g,t5xxl}.transformer`` — A1111's own CLIP/T5 (``other_impls``)

Class-level patches (installed once, so they survive reloads, ``redo_hijack`` and VAE changes):
each wrapper's ``encode_with_transformers`` (clip skip and per-slot precision; the original runs
untouched whenever neither applies), ``StableDiffusionProcessing.cached_params`` (the cond cache
key learns what we change) and ``sd_models.load_model_weights`` (slots go back to Built-in before
A1111 loads a checkpoint into the same model; ``on_model_loaded`` re-applies the choice).

Only this module imports ``modules.*``, and only inside functions, so it imports anywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from te_switch.core import clip_skip
from te_switch.core.clip_skip import TowerPlan, run_to_layer, tower_plan
from te_switch.core.compute import autocast_off
from te_switch.core.longclip import chunk_length
from te_switch.core.selection import SLOTS_BY_FAMILY, Selection
from te_switch.core.tensors import Weight
from te_switch.hosts import sdwebui
from te_switch.hosts.base import HostAdapter, tower_in, tower_positions
from te_switch.hosts.engine import BuiltinSource, LiveSlot, SwapEngine
from te_switch.hosts.slots import hf_clip_slot, openclip_slot, t5_slot, text_transformer

SD3_FILES = {"clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors", "t5xxl": "t5xxl_fp16.safetensors"}
# (A1111's original encode, the wrapper, the tokens, the plan or None) -> the cond of one tower
TowerEncode = Callable[[Callable[..., Any], Any, torch.Tensor, TowerPlan | None], Any]
Patch = Callable[[Callable[..., Any]], Callable[..., Any]]


class A1111Adapter(HostAdapter):
    name = "a1111"

    def __init__(self, engine: SwapEngine | None = None) -> None:
        super().__init__(engine)
        self._loading: Any = None  # the model a load callback is about (before model_data points at it)

    # -- the live model -----------------------------------------------------------------------

    def live_model(self) -> Any | None:
        if self._loading is not None:
            return self._loading
        from modules import sd_models

        return sd_models.model_data.sd_model  # never shared.sd_model: that one loads a model

    def family(self, model: Any) -> str | None:
        """The tests A1111's ``set_model_type`` makes, on the live objects (hijacked or not)."""
        towers = _text_towers(model)
        if getattr(model, "is_sd3", False) or hasattr(model, "text_encoders"):
            return "sd3" if {"clip_l", "clip_g"} <= towers.keys() else None
        if hasattr(model, "conditioner"):
            if {"clip_l", "clip_g"} <= towers.keys():
                return "sdxl"
            return "sdxl-refiner" if "clip_g" in towers else None
        if "clip_h" in towers:
            return "sd2"
        return "sd1" if "clip_l" in towers else None  # alt-diffusion (XLM-R) has no CLIP: None

    def slots(self, model: Any) -> dict[str, LiveSlot]:
        family = self.family(model)
        if family is None:
            return {}
        towers = _text_towers(model)
        return {name: _slot_for(name, towers[name]) for name in SLOTS_BY_FAMILY[family] if name in towers}

    # -- what A1111 itself does ---------------------------------------------------------------

    def auto_plans(self, model: Any, family: str) -> list[TowerPlan]:
        """The layers stock A1111 uses: its Clip skip setting on SD1 (and SDXL's CLIP-L when
        "Clip skip SDXL" is on), the configured layer everywhere else."""
        from modules.shared import opts

        holders = _holders(model)
        plans = {p.tower: p for p in clip_skip.plan(family, None)}
        setting = int(opts.CLIP_stop_at_last_layers)
        if family == "sd1":
            plans["clip_l"] = tower_plan(family, "clip_l", setting, final_ln=True)
        elif family in ("sdxl", "sdxl-refiner"):
            l_holder, g_holder = holders.get("clip_l"), holders.get("clip_g")
            if l_holder is not None:
                if opts.sdxl_clip_l_skip is True:
                    plans["clip_l"] = tower_plan(family, "clip_l", setting, final_ln=False)
                elif l_holder.layer == "last":
                    plans["clip_l"] = tower_plan(family, "clip_l", 1, final_ln=True)
                else:
                    depth = len(text_transformer(l_holder.transformer).encoder.layers)
                    index = int(l_holder.layer_idx)
                    n = depth + 1 - index if index >= 0 else -index
                    plans["clip_l"] = tower_plan(family, "clip_l", n, final_ln=False)
            if g_holder is not None:
                plans["clip_g"] = tower_plan(family, "clip_g", 1 if g_holder.layer == "last" else 2, final_ln=False)
        elif family == "sd2" and "clip_h" in holders:
            plans["clip_h"] = tower_plan(family, "clip_h", int(holders["clip_h"].layer_idx) + 1, final_ln=True)
        elif family == "sd3":
            for tower in ("clip_l", "clip_g"):
                holder = holders.get(tower)
                if holder is None:
                    continue
                if holder.layer == "last":
                    plans[tower] = tower_plan(family, tower, 1, final_ln=True)
                else:
                    index = int(holder.layer_idx)
                    n = -index if index < 0 else holder.num_layers - index
                    plans[tower] = tower_plan(family, tower, n, final_ln=bool(holder.layer_norm_hidden_state))
        return list(plans.values())

    def layer_note(self, model: Any, family: str, selection: Selection) -> str | None:
        from modules.shared import opts

        notes = []
        if selection.clip_skip is None:
            if any(not p.native for p in self.auto_plans(model, family)):
                notes.append("from A1111's Clip skip setting")
        elif (family == "sd1" and int(opts.CLIP_stop_at_last_layers) != 1) or (
            family == "sdxl" and opts.sdxl_clip_l_skip is True
        ):
            notes.append("replaces A1111's Clip skip setting")
        if family == "sd3":
            if "t5xxl" in _text_towers(model) and getattr(opts, "sd3_enable_t5", False):
                notes.append("T5-XXL: every layer (clip skip is for CLIP)")
            else:
                notes.append("T5 off (Settings → Stable Diffusion 3 → Enable T5, then reload the model)")
        return "; ".join(notes) or None

    # -- after the model changed -----------------------------------------------------------------

    def after_swap(self, model: Any) -> None:
        self.sync_chunk_lengths(model)
        sdwebui.clear_cond_caches()
        self._refresh_empty_cond(model)

    def sync_chunk_lengths(self, model: Any = None) -> None:
        """Prompt chunks follow each tower's position count (248 → 246 tokens); the token counter
        reads the wrapper's ``chunk_length``. Wrappers are new objects after every (re)hijack."""
        model = self.live_model() if model is None else model
        if model is None:
            return
        for wrapper, tower, holders in _chunked_wrappers(model):
            positions = tower_positions(tower)
            wrapper.chunk_length = chunk_length(positions)
            for holder in holders:
                if hasattr(holder, "max_length"):
                    holder.max_length = positions

    def _refresh_empty_cond(self, model: Any) -> None:
        # A1111's pad_cond_uncond pads with this cond and divides by its length
        if not hasattr(model, "cond_stage_model_empty_prompt"):
            return  # a model mid-load: load_model computes it after the callbacks
        from modules import devices, sd_models

        with devices.autocast(), torch.no_grad():
            if self.active is None:
                model.cond_stage_model_empty_prompt = sd_models.get_empty_cond(model)
                return
            # inside a generation (hires/refiner checkpoint switch): get_empty_cond would reset the
            # extra networks the generation activated, so encode the empty prompt directly
            if hasattr(model, "get_learned_conditioning"):
                d = model.get_learned_conditioning([""])
            else:
                d = model.cond_stage_model([""])
            model.cond_stage_model_empty_prompt = d["crossattn"] if isinstance(d, dict) else d

    def restore_before_load(self, model: Any) -> list[str]:
        """Put every swapped slot of ``model`` back to Built-in before A1111 loads a checkpoint into
        it (a 248-position table would not take the checkpoint's 77 rows)."""
        towers = {n: m for n, m in _text_towers(model).items() if self.is_swapped(n, m)}
        if not towers:
            return []
        with _named_as_hijacked(towers.values()):
            return [name for name, module in towers.items() if self.engine.restore(_slot_for(name, module))]

    def builtin_source(self, model: Any, name: str) -> BuiltinSource | None:
        """A1111 loads the checkpoint's own keys into the slot (``model.load_state_dict``), cast to fp16
        unless ``--no-half`` (then its fp8 storage option casts Linear weights on); SD3 takes a tower the
        checkpoint lacks from ``models/CLIP`` (``SD3Cond.before_load_weights``)."""
        from modules import shared

        module = _text_towers(model).get(name)
        path = getattr(getattr(model, "sd_checkpoint_info", None), "filename", None)
        tower = tower_in(path, name) if module is not None else None
        if tower is not None and tower.tower != name and getattr(model, "is_sd3", False):
            tower = None  # an SD3 checkpoint without this tower: A1111 read the models/CLIP file
        if tower is None and module is not None and getattr(model, "is_sd3", False):
            path = os.path.join(getattr(shared, "models_path", ""), "CLIP", SD3_FILES[name])
            tower = tower_in(path, name)
        if tower is None or module is None:
            return None
        live = set(module.state_dict().keys())
        built = _sd3_built(module) if getattr(model, "is_sd3", False) else {}

        def to_host(sd: Mapping[str, Weight]) -> dict[str, Weight]:
            return {**built, **{_stored_key(key, live): value for key, value in sd.items()}}

        half = None if getattr(shared.cmd_opts, "no_half", False) else torch.float16
        return BuiltinSource(str(path), tower, cast_via=half, to_host=to_host, stored_names=True)

    def on_model_loaded(self, sd_model: Any) -> list[str]:
        """``script_callbacks.on_model_loaded``: after a load, VAE change or same-config reload.

        Errors propagate (one-line ``TESwitchError``s): the caller reports them; the model keeps
        the checkpoint's own encoders.
        """
        self._loading = sd_model
        try:
            self.sync_chunk_lengths(sd_model)  # the hijack made new wrappers
            return self.reapply()
        finally:
            self._loading = None

    # -- the generation -------------------------------------------------------------------------

    def begin(self, selection: Selection) -> None:
        super().begin(selection)
        self.sync_chunk_lengths()  # redo_hijack (attention optimisation change) fires no callback

    # -- patches --------------------------------------------------------------------------------

    def patch_targets(self) -> list[sdwebui.PatchTarget]:
        from modules import processing, sd_hijack_clip, sd_hijack_open_clip, sd_models

        clip_l = self._tower_patch("clip_l", lambda w: w.wrapped.transformer, _hf_clip_encode)
        clip_h = self._tower_patch("clip_h", lambda w: w.wrapped.model, _open_clip_h_encode)
        clip_g = self._tower_patch("clip_g", lambda w: w.wrapped.model, _open_clip_g_encode)
        targets: list[sdwebui.PatchTarget] = [
            (sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords, "encode_with_transformers", clip_l),
            (sd_hijack_clip.FrozenCLIPEmbedderForSDXLWithCustomWords, "encode_with_transformers", clip_l),
            (sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords, "encode_with_transformers", clip_h),
            (sd_hijack_open_clip.FrozenOpenCLIPEmbedder2WithCustomWords, "encode_with_transformers", clip_g),
            (processing.StableDiffusionProcessing, "cached_params", self._cached_params_patch),
            (sd_models, "load_model_weights", self._load_model_weights_patch),
        ]
        try:
            from modules.models.sd3 import sd3_cond

            targets.append((sd3_cond.Sd3ClipLG, "encode_with_transformers", self._sd3_patch))
            targets.append((sd3_cond.Sd3T5, "forward", self._sd3_t5_patch))
        except ImportError:
            pass  # before 1.10: no SD3
        return targets

    def _tower_patch(self, tower: str, module_of: Callable[[Any], torch.nn.Module], encode: TowerEncode) -> Patch:
        """A wrapper's ``encode_with_transformers`` that runs A1111's own code unless the generation asks
        this tower for another layer (the plan) or another dtype; ``encode`` does the tower's part."""

        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(original)
            def encode_with_transformers(wrapper: Any, tokens: torch.Tensor) -> torch.Tensor:
                module = module_of(wrapper)
                plan, dtype = self.active_plan(tower), self.slot_dtype(tower, module)
                if plan is None and dtype is None:
                    return original(wrapper, tokens)
                with _own_precision(dtype, module):
                    z = encode(original, wrapper, tokens, plan)
                return _as_host_dtype(z, dtype)

            return encode_with_transformers

        return make

    def _sd3_patch(self, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def encode_with_transformers(wrapper: Any, tokens: torch.Tensor) -> torch.Tensor:
            plan_l, plan_g = self.active_plan("clip_l"), self.active_plan("clip_g")
            dtype_l = self.slot_dtype("clip_l", wrapper.clip_l.transformer)
            dtype_g = self.slot_dtype("clip_g", wrapper.clip_g.transformer)
            if plan_l is None and plan_g is None and dtype_l is None and dtype_g is None:
                return original(wrapper, tokens)
            # both towers give pooled vectors, so every layer runs; A1111's own SDClipModel picks the
            # layer (cloned, no final LN) and returns float32 whatever the weights hold
            with (
                _own_precision(dtype_l or dtype_g, wrapper.clip_l.transformer),
                _clip_layer(wrapper.clip_l, plan_l),
                _clip_layer(wrapper.clip_g, plan_g),
            ):
                return original(wrapper, tokens)

        return encode_with_transformers

    def _sd3_t5_patch(self, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def forward(wrapper: Any, texts: Any, *, token_count: int) -> torch.Tensor:
            t5 = getattr(wrapper, "t5xxl", None)
            dtype = self.slot_dtype("t5xxl", t5.transformer) if t5 is not None else None
            if dtype is None:
                return original(wrapper, texts, token_count=token_count)
            # A1111's T5 casts its embeddings to fp32 and computes in fp32 whatever its weights hold
            # (that is Auto); an explicit precision computes in that dtype. SDClipModel returns fp32.
            with _own_precision(dtype, t5.transformer), _t5_activations(t5.transformer, dtype):
                return original(wrapper, texts, token_count=token_count)

        return forward

    def _cached_params_patch(self, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def cached_params(p: Any, *args: Any, **kwargs: Any) -> tuple:
            from modules.shared import opts

            # A1111's key lacks "Clip skip SDXL" too: toggling it would serve a stale cond
            return (*original(p, *args, **kwargs), self.cond_signature(), getattr(opts, "sdxl_clip_l_skip", None))

        return cached_params

    def _load_model_weights_patch(self, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def load_model_weights(model: Any, *args: Any, **kwargs: Any) -> Any:
            self.restore_before_load(model)
            return original(model, *args, **kwargs)

        return load_model_weights


# ---------------------------------------------------------------------------------------------
# finding the encoders


def _is_wrapper(obj: Any) -> bool:
    from modules import sd_hijack_clip

    return isinstance(obj, sd_hijack_clip.FrozenCLIPEmbedderWithCustomWordsBase)


def _unwrap(obj: Any) -> Any:
    return obj.wrapped if _is_wrapper(obj) else obj


def _hf_transformer(holder: Any) -> torch.nn.Module | None:
    """``holder.transformer`` when it is a CLIP text model (transformers or SD3's own)."""
    transformer = getattr(holder, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        return None
    text = text_transformer(transformer)
    has_all = all(hasattr(text, a) for a in ("embeddings", "encoder", "final_layer_norm"))
    return transformer if has_all else None


def _open_clip_model(holder: Any) -> torch.nn.Module | None:
    """``holder.model`` when it is an OpenCLIP text tower (ldm/sgm keep it there)."""
    model = getattr(holder, "model", None)
    is_tower = isinstance(model, torch.nn.Module) and hasattr(model, "positional_embedding")
    return model if is_tower and hasattr(getattr(model, "transformer", None), "resblocks") else None


def _holders(model: Any) -> dict[str, Any]:
    """Slot name → the module holding that encoder (ldm/sgm embedder or SD3's SDClipModel)."""
    if model is None:
        return {}
    encoders = getattr(model, "text_encoders", None)
    if encoders is not None:
        return {n: h for n in ("clip_l", "clip_g", "t5xxl") if (h := getattr(encoders, n, None)) is not None}
    out: dict[str, Any] = {}
    conditioner = getattr(model, "conditioner", None)
    if conditioner is not None:
        for embedder in getattr(conditioner, "embedders", ()):
            inner = _unwrap(embedder)
            if _open_clip_model(inner) is not None:
                out.setdefault("clip_g", inner)
            elif _hf_transformer(inner) is not None:
                out.setdefault("clip_l", inner)
        return out
    inner = _unwrap(getattr(model, "cond_stage_model", None))
    if _open_clip_model(inner) is not None:
        out["clip_h"] = inner
    elif _hf_transformer(inner) is not None:
        out["clip_l"] = inner
    return out


def _text_towers(model: Any) -> dict[str, torch.nn.Module]:
    """Slot name → the module a slot loads into."""
    out = {}
    for name, holder in _holders(model).items():
        tower = _open_clip_model(holder)
        if tower is None:
            tower = getattr(holder, "transformer", None)
        if isinstance(tower, torch.nn.Module):
            out[name] = tower
    return out


def _chunked_wrappers(model: Any) -> Iterator[tuple[Any, torch.nn.Module, tuple[Any, ...]]]:
    """(chunking wrapper, the tower its chunk length follows, objects with a ``max_length``)."""
    encoders = getattr(model, "text_encoders", None)
    if encoders is not None:
        lg = getattr(encoders, "model_lg", None)
        if lg is not None:
            yield lg, lg.clip_l.transformer, (lg.clip_l, lg.clip_g)
        return
    conditioner = getattr(model, "conditioner", None)
    wrappers = list(conditioner.embedders) if conditioner is not None else [getattr(model, "cond_stage_model", None)]
    for wrapper in wrappers:
        if not _is_wrapper(wrapper):
            continue
        tower = _open_clip_model(wrapper.wrapped)
        if tower is None:
            tower = _hf_transformer(wrapper.wrapped)
        if tower is not None:
            yield wrapper, tower, (wrapper.wrapped,)


def _slot_for(name: str, module: torch.nn.Module) -> LiveSlot:
    if hasattr(module, "positional_embedding"):
        slot = openclip_slot(name, module)
    elif hasattr(getattr(module, "encoder", None), "block"):
        # SD3's own T5 (other_impls): A1111 holds every weight dense in the model's dtype and computes in
        # fp32, so a compressed file (fp8, scaled fp8, GGUF) is expanded into it once, as A1111 itself
        # would load it; its AutocastLinear casts `wo` to the activations' dtype, so no fp32 `wo` either
        slot = dataclasses.replace(t5_slot(name, module), pack_kind=_dense, keep_fp32=frozenset())
    else:
        slot = hf_clip_slot(name, module)
    return _through_hijack(slot)


def _dense(module: torch.nn.Module) -> str | None:
    """No layer keeps a compressed weight (``LiveSlot.pack_kind``)."""
    return None


def _through_hijack(slot: LiveSlot) -> LiveSlot:
    """A1111 wraps token embeddings in ``EmbeddingsWithFixes``: their weight is ``….wrapped.weight``."""
    live = set(slot.module.state_dict().keys())
    if not any(".wrapped." in key for key in live):
        return slot
    to_host = slot.to_host

    def through(sd: Mapping[str, Weight]) -> dict[str, Weight]:
        return {_live_key(key, live): value for key, value in to_host(sd).items()}

    return dataclasses.replace(slot, to_host=through)


def _sd3_built(module: torch.nn.Module) -> dict[str, Weight]:
    """What A1111's SD3 CLIP holds where its file has nothing (SD3's CLIP-L files carry no projection):
    ``other_impls.CLIPTextModel`` sets ``text_projection`` to the identity, but a model built on the meta
    device (A1111's default low-RAM load, ``sd_disable_initialization.LoadStateDictOnMeta``) gets zeros.
    SD3 never applies CLIP-L's projection (``return_projected_pooled=False``); the engine's fingerprint
    check still proves whichever this is."""
    projection = getattr(module, "text_projection", None)
    weight = getattr(projection, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] != weight.shape[1]:
        return {}
    n = weight.shape[0]
    return {"text_projection.weight": torch.zeros(n, n) if not weight.detach().any() else torch.eye(n)}


def _stored_key(key: str, live: set[str]) -> str:
    """A checkpoint key (less its tower prefix) -> the live key A1111 loaded it into: old SD1 names gain
    ``text_model.`` (``checkpoint_dict_replacements_sd1``), hijacked token tables their ``wrapped.``."""
    if key not in live and "text_model." + key in live:
        key = "text_model." + key
    return _live_key(key, live)


def _live_key(key: str, live: set[str]) -> str:
    if key in live:
        return key
    head, _, leaf = key.rpartition(".")
    wrapped = f"{head}.wrapped.{leaf}" if head else f"wrapped.{leaf}"
    return wrapped if wrapped in live else key


class _HijackName(torch.nn.Module):
    """Holds a bare token embedding under the name ``EmbeddingsWithFixes`` gives it."""

    def __init__(self, wrapped: torch.nn.Module) -> None:
        super().__init__()
        self.wrapped = wrapped


@contextlib.contextmanager
def _named_as_hijacked(towers: Any) -> Iterator[None]:
    """A1111 unhijacks before loading weights; snapshots were taken hijacked (``….wrapped.weight``)."""
    swapped = []
    for tower in towers:
        parent = (
            tower if hasattr(tower, "positional_embedding") else getattr(text_transformer(tower), "embeddings", None)
        )
        embedding = getattr(parent, "token_embedding", None)
        if type(embedding) is torch.nn.Embedding:  # SD3's TextualInversionEmbeddings never gets wrapped
            parent.token_embedding = _HijackName(embedding)
            swapped.append((parent, embedding))
    try:
        yield
    finally:
        for parent, embedding in swapped:
            parent.token_embedding = embedding


# ---------------------------------------------------------------------------------------------
# the encode step


def _hf_clip_encode(original: Callable[..., Any], wrapper: Any, tokens: torch.Tensor, plan: TowerPlan | None) -> Any:
    return original(wrapper, tokens) if plan is None else _hf_clip_layer(wrapper.wrapped.transformer, tokens, plan)


def _open_clip_h_encode(
    original: Callable[..., Any], wrapper: Any, tokens: torch.Tensor, plan: TowerPlan | None
) -> Any:
    # ldm's own loop stops layer_idx blocks before the end, then applies ln_final (SD2's LN)
    with _attribute(wrapper.wrapped, "layer_idx", None if plan is None else plan.skip - 1):
        return original(wrapper, tokens)


def _open_clip_g_encode(
    original: Callable[..., Any], wrapper: Any, tokens: torch.Tensor, plan: TowerPlan | None
) -> Any:
    return original(wrapper, tokens) if plan is None else _open_clip_g_layer(wrapper.wrapped, tokens, plan)


def _hf_clip_layer(transformer: torch.nn.Module, tokens: torch.Tensor, plan: TowerPlan) -> torch.Tensor:
    """``hidden_states[-N]`` (+ final LN on SD1); the layers after it do not run."""
    text = text_transformer(transformer)
    # the module itself runs: lowvram's pre-hook must fire
    hidden, _ = run_to_layer(text.encoder.layers, plan.skip, lambda: transformer(input_ids=tokens), stop=True)
    return text.final_layer_norm(hidden) if plan.final_ln else hidden


def _open_clip_g_layer(wrapped: Any, tokens: torch.Tensor, plan: TowerPlan) -> torch.Tensor:
    """SDXL's G: the plan's block output (no LN) with the pooled vector of the full tower."""
    blocks = wrapped.model.transformer.resblocks
    hidden, d = run_to_layer(blocks, plan.skip, lambda: wrapped.encode_with_transformer(tokens), stop=False)
    z = hidden.permute(1, 0, 2)  # LND -> NLD, as sgm's own "penultimate"
    pooled = d.get("pooled") if isinstance(d, dict) else None
    if pooled is not None:
        z.pooled = pooled
    return z


@contextlib.contextmanager
def _attribute(obj: Any, name: str, value: Any) -> Iterator[None]:
    if value is None:
        yield
        return
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


@contextlib.contextmanager
def _clip_layer(model: Any, plan: TowerPlan | None) -> Iterator[None]:
    """SD3's SDClipModel picks ``hidden_states[-N]`` through its own ``set_clip_options``."""
    if plan is None:
        yield
        return
    saved = (model.layer, model.layer_idx, model.return_projected_pooled)
    model.set_clip_options({"layer": -plan.skip})
    try:
        yield
    finally:
        model.layer, model.layer_idx, model.return_projected_pooled = saved


@contextlib.contextmanager
def _own_precision(dtype: torch.dtype | None, module: torch.nn.Module) -> Iterator[None]:
    """Compute in the slot's own dtype: autocast off and A1111's manual cast lifted."""
    if dtype is None:
        yield
        return
    from modules import devices

    with autocast_off(*{p.device for p in module.parameters()}, devices.device), _manual_cast_lifted():
        yield


@contextlib.contextmanager
def _t5_activations(t5: torch.nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """SD3's ``T5Stack`` casts its embeddings to fp32 before the first block: cast them on to ``dtype``."""
    blocks = t5.encoder.block

    def cast(module: torch.nn.Module, args: tuple) -> tuple:
        return (args[0].to(dtype), *args[1:])

    handle = blocks[0].register_forward_pre_hook(cast) if len(blocks) else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


@contextlib.contextmanager
def _manual_cast_lifted() -> Iterator[None]:
    """``devices.manual_cast`` (MPS/XPU/no-autocast GPUs) patches layer classes to cast to fp16."""
    from modules import devices

    lifted = []
    for cls in getattr(devices, "patch_module_list", ()):
        own_forward = cls.__dict__.get("org_forward")
        if own_forward is not None:
            lifted.append((cls, cls.forward))
            cls.forward = own_forward
    try:
        yield
    finally:
        for cls, forward in lifted:
            cls.forward = forward


def _as_host_dtype(z: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A slot computing in its own dtype hands the UNet the host's dtype (pooled too)."""
    if dtype is None:
        return z
    from modules import devices

    return sdwebui.cast_cond(z, devices.dtype)
