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
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from te_switch.core import clip_skip
from te_switch.core.clip_skip import FINAL_LAYER_NORM, NATIVE_SKIP, TOWER_LAYERS, LayerTap, TowerPlan, block_for_skip
from te_switch.core.longclip import chunk_length
from te_switch.core.selection import SLOTS_BY_FAMILY, Selection
from te_switch.core.tensors import Weight
from te_switch.hosts.base import HostAdapter
from te_switch.hosts.engine import LiveSlot, SwapEngine
from te_switch.hosts.modules import hf_clip_slot, openclip_slot, t5_slot, text_transformer

PATCH_KEY = __name__
CACHE_LISTS = (
    ("StableDiffusionProcessing", ("cached_c", "cached_uc")),
    ("StableDiffusionProcessingTxt2Img", ("cached_hr_c", "cached_hr_uc")),
)


class A1111Adapter(HostAdapter):
    name = "a1111"
    patch_key = PATCH_KEY

    def __init__(self, engine: SwapEngine | None = None) -> None:
        super().__init__(engine)
        self._loading: Any = None  # the model a load callback is about (before model_data points at it)
        self._patched: list[tuple[Any, str]] = []

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
            plans["clip_l"] = _plan(family, "clip_l", setting, True)
        elif family in ("sdxl", "sdxl-refiner"):
            l_holder, g_holder = holders.get("clip_l"), holders.get("clip_g")
            if l_holder is not None:
                if opts.sdxl_clip_l_skip is True:
                    plans["clip_l"] = _plan(family, "clip_l", setting, False)
                elif l_holder.layer == "last":
                    plans["clip_l"] = _plan(family, "clip_l", 1, True)
                else:
                    depth = len(text_transformer(l_holder.transformer).encoder.layers)
                    index = int(l_holder.layer_idx)
                    plans["clip_l"] = _plan(family, "clip_l", depth + 1 - index if index >= 0 else -index, False)
            if g_holder is not None:
                plans["clip_g"] = _plan(family, "clip_g", 1 if g_holder.layer == "last" else 2, False)
        elif family == "sd2" and "clip_h" in holders:
            plans["clip_h"] = _plan(family, "clip_h", int(holders["clip_h"].layer_idx) + 1, True)
        elif family == "sd3":
            for tower in ("clip_l", "clip_g"):
                holder = holders.get(tower)
                if holder is None:
                    continue
                if holder.layer == "last":
                    plans[tower] = _plan(family, tower, 1, True)
                else:
                    index = int(holder.layer_idx)
                    n = -index if index < 0 else holder.num_layers - index
                    plans[tower] = _plan(family, tower, n, bool(holder.layer_norm_hidden_state))
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
        if family == "sd3" and "t5xxl" not in _text_towers(model):
            notes.append("T5 off (Settings → Stable Diffusion 3 → Enable T5, then reload the model)")
        return "; ".join(notes) or None

    # -- after the model changed -----------------------------------------------------------------

    def after_swap(self, model: Any, changed: list[str]) -> None:
        self.sync_chunk_lengths(model)
        self.clear_cond_caches()
        self._refresh_empty_cond(model)

    def sync_chunk_lengths(self, model: Any = None) -> None:
        """Prompt chunks follow each tower's position count (248 → 246 tokens); the token counter
        reads the wrapper's ``chunk_length``. Wrappers are new objects after every (re)hijack."""
        model = self.live_model() if model is None else model
        if model is None:
            return
        for wrapper, tower, holders in _chunked_wrappers(model):
            positions = _positions(tower)
            wrapper.chunk_length = chunk_length(positions)
            for holder in holders:
                if hasattr(holder, "max_length"):
                    holder.max_length = positions

    def clear_cond_caches(self) -> None:
        """Empty A1111's cond caches in place (processing objects hold the same lists)."""
        from modules import processing

        for class_name, names in CACHE_LISTS:
            holder = getattr(processing, class_name, None)
            for name in names:
                cache = getattr(holder, name, None)
                if isinstance(cache, list) and len(cache) >= 2:
                    cache[0] = None
                    cache[1] = None

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
        towers = {n: m for n, m in _text_towers(model).items() if self.engine.applied(_probe(n, m)) is not None}
        if not towers:
            return []
        with _named_as_hijacked(towers.values()):
            return [name for name, module in towers.items() if self.engine.restore(_slot_for(name, module))]

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

    def install(self) -> None:
        if self._patched:
            return
        from modules import patches

        for obj, field, make in self._patch_targets():
            if patches.original(self.patch_key, obj, field) is not None:
                patches.undo(self.patch_key, obj, field)  # left by an earlier import of this module
            patches.patch(self.patch_key, obj, field, make(getattr(obj, field)))
            self._patched.append((obj, field))

    def uninstall(self) -> None:
        from modules import patches

        for obj, field in reversed(self._patched):
            if patches.original(self.patch_key, obj, field) is not None:
                patches.undo(self.patch_key, obj, field)
        self._patched.clear()

    def _patch_targets(self) -> list[tuple[Any, str, Callable[[Callable[..., Any]], Callable[..., Any]]]]:
        """(object, attribute, replacement maker) for every class-level patch."""
        from modules import processing, sd_hijack_clip, sd_hijack_open_clip, sd_models

        targets: list[tuple[Any, str, Callable[[Callable[..., Any]], Callable[..., Any]]]] = [
            (sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords, "encode_with_transformers", self._hf_clip_patch("sd1")),
            (
                sd_hijack_clip.FrozenCLIPEmbedderForSDXLWithCustomWords,
                "encode_with_transformers",
                self._hf_clip_patch("sdxl"),
            ),
            (
                sd_hijack_open_clip.FrozenOpenCLIPEmbedderWithCustomWords,
                "encode_with_transformers",
                self._open_clip_h_patch,
            ),
            (
                sd_hijack_open_clip.FrozenOpenCLIPEmbedder2WithCustomWords,
                "encode_with_transformers",
                self._open_clip_g_patch,
            ),
            (processing.StableDiffusionProcessing, "cached_params", self._cached_params_patch),
            (sd_models, "load_model_weights", self._load_model_weights_patch),
        ]
        try:
            from modules.models.sd3 import sd3_cond

            targets.append((sd3_cond.Sd3ClipLG, "encode_with_transformers", self._sd3_patch))
        except ImportError:
            pass  # before 1.10: no SD3
        return targets

    def _hf_clip_patch(self, family: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(original)
            def encode_with_transformers(wrapper: Any, tokens: torch.Tensor) -> torch.Tensor:
                transformer = wrapper.wrapped.transformer
                n = self._user_skip(family, "clip_l")
                dtype = self._slot_dtype("clip_l", transformer)
                if n is None and dtype is None:
                    return original(wrapper, tokens)
                with _own_precision(dtype, transformer):
                    if n is None:
                        z = original(wrapper, tokens)
                    else:
                        z = _hf_clip_layer(transformer, tokens, n, FINAL_LAYER_NORM[family])
                return _as_host_dtype(z, dtype)

            return encode_with_transformers

        return make

    def _open_clip_h_patch(self, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def encode_with_transformers(wrapper: Any, tokens: torch.Tensor) -> torch.Tensor:
            wrapped = wrapper.wrapped
            n = self._user_skip("sd2", "clip_h")
            dtype = self._slot_dtype("clip_h", wrapped.model)
            if n is None and dtype is None:
                return original(wrapper, tokens)
            # ldm's own loop stops layer_idx blocks before the end, then applies ln_final (SD2's LN)
            with _own_precision(dtype, wrapped.model), _attribute(wrapped, "layer_idx", None if n is None else n - 1):
                z = original(wrapper, tokens)
            return _as_host_dtype(z, dtype)

        return encode_with_transformers

    def _open_clip_g_patch(self, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def encode_with_transformers(wrapper: Any, tokens: torch.Tensor) -> torch.Tensor:
            wrapped = wrapper.wrapped
            n = self._user_skip(self._g_family(wrapped.model), "clip_g")
            dtype = self._slot_dtype("clip_g", wrapped.model)
            if n is None and dtype is None:
                return original(wrapper, tokens)
            with _own_precision(dtype, wrapped.model):
                z = original(wrapper, tokens) if n is None else _open_clip_g_layer(wrapped, tokens, n)
            return _as_host_dtype(z, dtype)

        return encode_with_transformers

    def _sd3_patch(self, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def encode_with_transformers(wrapper: Any, tokens: torch.Tensor) -> torch.Tensor:
            n_l, n_g = self._user_skip("sd3", "clip_l"), self._user_skip("sd3", "clip_g")
            dtype_l = self._slot_dtype("clip_l", wrapper.clip_l.transformer)
            dtype_g = self._slot_dtype("clip_g", wrapper.clip_g.transformer)
            if n_l is None and n_g is None and dtype_l is None and dtype_g is None:
                return original(wrapper, tokens)
            # both towers give pooled vectors, so every layer runs; A1111's own SDClipModel picks the
            # layer (cloned, no final LN) and returns float32 whatever the weights hold
            with (
                _own_precision(dtype_l or dtype_g, wrapper.clip_l.transformer),
                _clip_layer(wrapper.clip_l, n_l),
                _clip_layer(wrapper.clip_g, n_g),
            ):
                return original(wrapper, tokens)

        return encode_with_transformers

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

    # -- helpers for the patched encode ---------------------------------------------------------

    def _user_skip(self, family: str, tower: str) -> int | None:
        """The N the running generation asks of ``tower``; None: A1111's own layer."""
        selection = self.active
        if selection is None or selection.clip_skip is None:
            return None
        return clip_skip.tower_skip(family, tower, selection.clip_skip, selection.scope)

    def _slot_dtype(self, name: str, module: torch.nn.Module) -> torch.dtype | None:
        return self.engine.compute_dtype(_probe(name, module))

    def _g_family(self, module: torch.nn.Module) -> str:
        model = self.live_model()
        if model is not None and hasattr(model, "conditioner") and self.family(model) == "sdxl-refiner":
            return "sdxl-refiner"  # one tower: the scope does not apply
        return "sdxl"


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


def _positions(tower: torch.nn.Module) -> int:
    table = getattr(tower, "positional_embedding", None)
    if isinstance(table, torch.Tensor):
        return int(table.shape[0])
    return int(text_transformer(tower).embeddings.position_embedding.weight.shape[0])


def _probe(name: str, module: torch.nn.Module) -> LiveSlot:
    """A slot good for engine queries (they only need the module)."""
    return LiveSlot(name, module, dict)


def _slot_for(name: str, module: torch.nn.Module) -> LiveSlot:
    if hasattr(module, "positional_embedding"):
        slot = openclip_slot(name, module)
    elif hasattr(getattr(module, "encoder", None), "block"):
        slot = t5_slot(name, module)
    else:
        slot = hf_clip_slot(name, module)
    return _through_hijack(slot)


def _through_hijack(slot: LiveSlot) -> LiveSlot:
    """A1111 wraps token embeddings in ``EmbeddingsWithFixes``: their weight is ``….wrapped.weight``."""
    live = set(slot.module.state_dict().keys())
    if not any(".wrapped." in key for key in live):
        return slot
    to_host = slot.to_host

    def through(sd: Mapping[str, Weight]) -> dict[str, Weight]:
        return {_live_key(key, live): value for key, value in to_host(sd).items()}

    return dataclasses.replace(slot, to_host=through)


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


def _plan(family: str, tower: str, n: int, final_ln: bool) -> TowerPlan:
    native = n == NATIVE_SKIP[family][tower] and final_ln == FINAL_LAYER_NORM[family]
    return TowerPlan(tower, n, TOWER_LAYERS[tower], final_ln, native)


# ---------------------------------------------------------------------------------------------
# the encode step


def _hf_clip_layer(transformer: torch.nn.Module, tokens: torch.Tensor, n: int, final_ln: bool) -> torch.Tensor:
    """``hidden_states[-n]`` (+ final LN on SD1); the layers after it do not run."""
    text = text_transformer(transformer)
    layers = text.encoder.layers
    with LayerTap(layers[block_for_skip(len(layers), n)], stop=True) as tap:
        transformer(input_ids=tokens)  # the module itself: lowvram's pre-hook must fire
    if tap.output is None:
        raise RuntimeError(f"CLIP layer {len(layers) - n + 1} never ran")
    return text.final_layer_norm(tap.output) if final_ln else tap.output


def _open_clip_g_layer(wrapped: Any, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """SDXL's G: block ``32 - n``'s output (no LN) with the pooled vector of the full tower."""
    blocks = wrapped.model.transformer.resblocks
    with LayerTap(blocks[block_for_skip(len(blocks), n)], stop=False) as tap:
        d = wrapped.encode_with_transformer(tokens)
    if tap.output is None:
        raise RuntimeError(f"CLIP-G layer {len(blocks) - n + 1} never ran")
    z = tap.output.permute(1, 0, 2)  # LND -> NLD, as sgm's own "penultimate"
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
def _clip_layer(model: Any, n: int | None) -> Iterator[None]:
    """SD3's SDClipModel picks ``hidden_states[-n]`` through its own ``set_clip_options``."""
    if n is None:
        yield
        return
    saved = (model.layer, model.layer_idx, model.return_projected_pooled)
    model.set_clip_options({"layer": -n})
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

    device_types = {p.device.type for p in module.parameters()} | {torch.device(devices.device or "cpu").type}
    with contextlib.ExitStack() as stack:
        for device_type in sorted(device_types):
            with contextlib.suppress(RuntimeError):  # a device without autocast support
                stack.enter_context(torch.autocast(device_type, enabled=False))
        stack.enter_context(_manual_cast_lifted())
        yield


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

    pooled = getattr(z, "pooled", None)
    z = z.to(devices.dtype)
    if pooled is not None:
        z.pooled = pooled.to(devices.dtype)
    return z
