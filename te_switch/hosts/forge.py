"""Forge 2.x host adapter (lllyasviel/stable-diffusion-webui-forge, ``backend`` architecture).

Where things live in Forge
--------------------------
* The model is ``modules.sd_models.model_data.sd_model`` (a ``FakeInitialModel`` until the first
  generation, rebuilt as new objects by ``forge_model_reload``). Its encoders are the children of
  ``forge_objects.clip.cond_stage_model`` (a ``JointTextEncoder``): ``clip_l``/``clip_g``/``clip_h`` are
  ``IntegratedCLIP`` (``.transformer`` = HF ``CLIPTextModel`` with a square ``text_projection``
  Linear), ``t5xxl`` is ``IntegratedT5`` (``.transformer`` = Forge's own T5). Forge's CLIP-G is HF
  layout. Forge's SD2 text encoder has 23 layers (OpenCLIP-H without its last block): a 24-layer
  CLIP-H file is accepted by dropping layer 23, and clip skip counts in the original 24 layers, so
  N=1 does not exist there and acts as 2.
* Prompts are encoded by ``ClassicTextProcessingEngine`` (CLIP) and ``T5TextProcessingEngine``;
  Forge calls ``sd_model.set_clip_skip(opts.CLIP_stop_at_last_layers)`` right before each encode.

Clip skip
---------
``ClassicTextProcessingEngine.encode_with_transformers`` is patched at class level (survives model
reloads). Forge's own code runs unchanged when no generation is active, or when clip skip is Auto and
the engine's slot is Built-in. Otherwise the tower's layer comes from the selection (Auto: Forge's own
``max(clip_skip, minimal_clip_skip)``) and a truncated forward stops after that block, unless the
engine must also return the pooled vector (SDXL/refiner CLIP-G, SD3 CLIP-L/G, Flux CLIP-L): then the
forward runs to the end and the pooled vector is Forge's own (projected for non-L towers).
SD1/SD2/Flux apply the final layer norm, SDXL/SD3 do not. Embeddings are cast to fp32 as Forge does;
with an explicit slot precision the whole tower computes in that dtype and the result is cast to
fp32 (what Forge returns). T5's encode is patched only to honour an explicit precision.

Swaps
-----
Before any slot changes, the CLIP patcher is unloaded from ``memory_management.current_loaded_models``
and LoRA is undone (``lora_loader.refresh({})``), so loads land in the checkpoint's own Parameters and
LoRA's backups stay right; Forge reloads and re-merges LoRA on its next ``load_model_gpu``. The swap
engine then loads in place (inside ``torch.inference_mode``: Forge creates its parameters there).
Long-CLIP sets ``chunk_length`` 246 on every CLIP engine whose tower has 248 positions (SDXL's CLIP-G
is stretched to 248 by the engine), 75 again after a restore. Cond caches: ``cached_params`` gets the
adapter's ``cond_signature()`` appended; after a swap the class-level cache lists are emptied in place.
After ``forge_model_reload`` call :meth:`ForgeAdapter.on_model_loaded` (register it with
``script_callbacks.on_model_loaded``): it re-applies the last selection to the new objects.

Decisions
---------
* CLIP files are always loaded dense (Forge upcasts fp8 CLIP files too); at Auto in ``text_encoder_dtype()``,
  the whole tower, as Forge's loader stores a CLIP file: not in the live dtypes, since Forge's encode casts
  the embeddings to fp32 in place (from their fp16 values) and a swap after an encode would otherwise keep
  a file's fp32 values there that Forge itself would have rounded.
* T5 at Auto precision is what Forge itself makes of the same file (``load_huggingface_component``
  and its layers), whatever the slot holds now, so a swap equals Forge loading that file through its
  *VAE / Text Encoder* menu: Linear weights of a dense file (fp16/bf16/fp32) are stored in
  ``text_encoder_dtype()`` (fp16), an fp8 / scaled-fp8 file's stay fp8 (kept packed, ``core.lowbit``,
  expanded per forward to the activations' dtype, times the scale, as ``ForgeOperations.Linear`` does),
  a GGUF file's stay packed and expand through Forge's own GGUF decoder (``ParameterGGUF``: baked, then
  dequantised in its fp16 computation dtype, then cast to the activations' dtype); ``shared``, the norms
  and the relative bias are fp32 as Forge holds them (``shared`` from a GGUF through the same fp16
  decoder, as ``replace_state_dict`` does). Forge's own encode then runs: fp32 activations. At an
  explicit precision everything is expanded exactly (our decoders) to that dtype and computed in it.
* T5 into a slot Forge holds as scaled fp8: the slot's ``scale_weight`` values are set to 1 while a
  dense file is in (Forge multiplies by them). Built-in brings back the fp8 weights and scales.
* T5 slots Forge holds as GGUF/NF4/FP4 (a GGUF from its *VAE / Text Encoder* menu: ``ParameterGGUF``
  weights in ``ForgeOperationsGGUF.Linear``): only those layer classes compute with such weights, so
  their Linear weights are ``LiveSlot.held``: every swap keeps Forge's own Parameter objects aside and
  attaches the incoming weight packed (a dense file's in fp16), and Built-in puts the objects back —
  bit for bit, no copy, no file read. ``shared``, the norms and the bias are fp32 and restored from the
  GGUF file through Forge's decoder.
* Chroma (T5 only, no clip skip in Forge; its T5 engine pads to 1 token and passes no mask) has its T5
  slot, swapped and computed exactly as on Flux; the layer line says clip skip has no effect there.
* LoRA merged into a T5 that is held compressed is not supported (Forge's merge rewrites the weight).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any

import torch

from te_switch.core import clip_skip as cs
from te_switch.core.clip_skip import TowerPlan
from te_switch.core.compute import autocast_off
from te_switch.core.longclip import chunk_length as longclip_chunk_length
from te_switch.core.lowbit import FP8_QTYPES
from te_switch.core.selection import SLOTS_BY_FAMILY, Selection
from te_switch.core.tensors import SAFETENSORS_DTYPES, LazyWeight, PackedTensor, Weight, as_dense, derive
from te_switch.hosts import sdwebui
from te_switch.hosts.base import HostAdapter, Resolver, tower_in, tower_positions
from te_switch.hosts.engine import BuiltinSource, LiveSlot, SlotRequest, SwapEngine, default_pack_kind
from te_switch.hosts.slots import hf_clip_blocks, hf_clip_slot, t5_slot, text_transformer

FAMILY_BY_CLASS = {
    "StableDiffusion": "sd1",
    "StableDiffusion2": "sd2",
    "StableDiffusionXL": "sdxl",
    "StableDiffusionXLRefiner": "sdxl-refiner",
    "StableDiffusion3": "sd3",
    "Flux": "flux",
    "Chroma": "chroma",
}
CLIP_ENGINE_ATTRS = ("text_processing_engine", "text_processing_engine_l", "text_processing_engine_g")


@dataclass(frozen=True)
class EncodePlan:
    """How one CLIP engine encodes during this generation (None plan: Forge's own code)."""

    layer: TowerPlan  # the layer and layer norm (the plan the panel shows)
    missing: int  # final blocks Forge's copy of the tower lacks (SD2: 1)
    stop: bool  # truncated forward: no pooled vector needed from this engine
    dtype: torch.dtype | None  # explicit compute dtype; None: Forge's fp32-with-cast path


def _forge_pack_kind(module: torch.nn.Module) -> str | None:
    """Forge's ``ForgeOperations.Linear`` is a plain Module with Linear's attributes: it can keep a
    compressed weight too (while attached, its own forward and ``scale_weight`` are not used). T5's
    embeddings stay dense: Forge holds ``shared`` in fp32 whatever the file, so it is written in place."""
    if isinstance(module, torch.nn.Embedding):
        return None
    kind = default_pack_kind(module)
    if kind is not None:
        return kind
    looks_linear = type(module).__name__ == "Linear" and hasattr(module, "in_features")
    has_weight = isinstance(module._parameters.get("weight"), torch.Tensor)
    return "linear" if looks_linear and has_weight else None


def _forge_quantized(p: Any) -> bool:
    """A GGUF (``ParameterGGUF``) or bitsandbytes parameter: only Forge's own layer classes compute with it."""
    return hasattr(p, "gguf_cls") or hasattr(p, "bnb_quantized")


def _linear_weight_keys(t5: torch.nn.Module) -> list[str]:
    return [f"{name}.weight" for name, m in t5.named_modules() if type(m).__name__ == "Linear"]


def _quantized_linear_keys(t5: torch.nn.Module) -> frozenset[str]:
    """Linear weights of Forge's GGUF / bitsandbytes layers (``ForgeOperationsGGUF.Linear``, NF4/FP4):
    only those classes compute with them, so a swap keeps them aside and never writes them."""
    out = set()
    for name, m in t5.named_modules():
        weight = m._parameters.get("weight")
        own_class = type(m).__qualname__.startswith(("ForgeOperationsGGUF.", "ForgeOperationsBNB4bits."))
        if type(m).__name__ == "Linear" and (own_class or _forge_quantized(weight)):
            out.add(f"{name}.weight")
    return frozenset(out)


def _forge_dense_dtype() -> torch.dtype:
    """The dtype Forge stores a dense T5 file's Linear weights in (``load_huggingface_component``)."""
    from backend import memory_management

    return memory_management.text_encoder_dtype()


def _forge_gguf_decoder(linear: bool) -> Callable[[PackedTensor], torch.Tensor] | None:
    """Forge's own GGUF expansion for a packed weight, or None where Forge has none.

    ``ParameterGGUF`` weights are baked, then dequantised by ``gguf_cls.dequantize_pytorch`` in their
    ``computation_dtype``: for a Linear, ``text_encoder_dtype()`` when that is fp16/bf16, else fp16
    (``ForgeOperationsGGUF.Linear``); for ``shared`` fp16 (``dequantize_as_pytorch_parameter``).
    """
    try:
        from backend import operations_gguf
    except ImportError:
        return None
    classes = {getattr(k, "name", str(k)): v for k, v in getattr(operations_gguf, "quants_mapping", {}).items()}
    compute = _forge_dense_dtype() if linear else torch.float16
    if compute not in (torch.float16, torch.bfloat16):
        compute = torch.float16

    def decode(packed: PackedTensor) -> torch.Tensor:
        cls = classes.get(packed.qtype)
        if cls is None:  # a type Forge cannot expand: our exact decoder, in Forge's dtype
            return packed.dequantize(compute)
        carrier = SimpleNamespace(data=packed.raw, baked=False, computation_dtype=compute, shape=packed.shape)
        cls.bake(carrier)
        return cls.dequantize_pytorch(carrier)

    return decode


def _as_forge_loads(to_host: Callable[[Mapping[str, Weight]], dict[str, Weight]]) -> Callable[..., dict[str, Weight]]:
    """``to_host`` whose GGUF weights expand through Forge's own decoder (Auto precision)."""
    linear, shared = _forge_gguf_decoder(linear=True), _forge_gguf_decoder(linear=False)
    if linear is None or shared is None:
        return to_host

    def mapped(sd: Mapping[str, Weight]) -> dict[str, Weight]:
        out = to_host(sd)
        for key, value in out.items():
            gguf = value.dtype not in SAFETENSORS_DTYPES if isinstance(value, LazyWeight) else None
            if gguf or (isinstance(value, PackedTensor) and value.qtype not in FP8_QTYPES):
                decode = shared if key.endswith(("shared.weight", "embed_tokens.weight")) else linear
                out[key] = derive(_decoding(decode), value, shape=tuple(value.shape), dtype=value.dtype)  # type: ignore[arg-type]
        return out

    return mapped


def _decoding(decode: Callable[[PackedTensor], torch.Tensor]) -> Callable[[PackedTensor], PackedTensor]:
    return lambda value: replace(value, decode=decode)


def _t5_storage(module: torch.nn.Module) -> str:
    """How Forge stores a T5: 'dense', 'fp8', 'scaled-fp8' or 'quantized' (GGUF / bitsandbytes)."""
    scaled = fp8 = False
    for name, p in module.named_parameters():
        if _forge_quantized(p):
            return "quantized"
        if name.endswith("scale_weight"):
            scaled = True
        elif p.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            fp8 = True
    return "scaled-fp8" if scaled else "fp8" if fp8 else "dense"


class ForgeAdapter(HostAdapter):
    name = "forge"

    def __init__(self, engine: SwapEngine | None = None) -> None:
        super().__init__(engine)
        # how Forge stored each T5 before we touched it (the live dtype changes while swapped)
        self._t5_origin: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()

    # -- the live model -----------------------------------------------------------------------

    def live_model(self) -> Any | None:
        try:
            from modules import sd_models
        except ImportError:
            return None
        model = getattr(getattr(sd_models, "model_data", None), "sd_model", None)
        if model is None or getattr(model, "forge_objects", None) is None:
            return None  # FakeInitialModel before the first generation, None during a reload
        return model

    def family(self, model: Any) -> str | None:
        for cls in type(model).__mro__:
            family = FAMILY_BY_CLASS.get(cls.__name__)
            if family is not None:
                return family
        return None

    def _joint(self, model: Any) -> torch.nn.Module:
        return model.forge_objects.clip.cond_stage_model

    def slots(self, model: Any) -> dict[str, LiveSlot]:
        family = self.family(model)
        joint = self._joint(model)
        out: dict[str, LiveSlot] = {}
        for name in SLOTS_BY_FAMILY.get(family or "", ()):
            child = joint._modules.get(name)
            if child is None:
                continue
            out[name] = (
                self._t5_slot(child.transformer) if name == "t5xxl" else self._clip_slot(name, child.transformer)
            )
        return out

    def _clip_slot(self, name: str, transformer: torch.nn.Module) -> LiveSlot:
        slot = hf_clip_slot(name, transformer)
        live = transformer.state_dict()
        live_keys = set(live)
        lead = "text_model." if any(k.startswith("text_model.") for k in live_keys) else ""
        blocks = len(hf_clip_blocks(transformer))
        drop_from = blocks if name == "clip_h" else None
        base = slot.to_host

        def to_host(sd: Mapping[str, Weight]) -> dict[str, Weight]:
            canonical: dict[str, Weight] = {}
            for key, value in sd.items():
                is_block = key.startswith("text_model.encoder.layers.")
                if drop_from is not None and is_block and int(key.split(".")[3]) >= drop_from:
                    continue  # SD2: Forge's CLIP-H stops one block early
                canonical[key] = as_dense(value)
            return base(canonical)

        slot.to_host = to_host
        # the TI wrapper registers the token table twice (``weight`` and ``wrapped.weight``): one load fills both
        slot.derived = slot.derived | ({f"{lead}embeddings.token_embedding.wrapped.weight"} & live_keys)
        # a Forge Linear that its checkpoint never filled keeps a ``dummy`` (SD1/SDXL CLIP-L's projection)
        slot.optional = slot.optional | {k for k in live_keys if k.endswith(".dummy")}
        # at Auto a file is stored as Forge's loader stores one (the whole tower in ``text_encoder_dtype()``),
        # not in the live dtypes: Forge's encode has cast the embeddings to fp32 in place, from fp16 values
        store = _forge_dense_dtype()
        slot.store_dtypes = {k: store for k, v in live.items() if v.is_floating_point()}
        return slot

    def _t5_slot(self, t5: torch.nn.Module) -> LiveSlot:
        slot = t5_slot("t5xxl", t5)
        slot.pack_kind = _forge_pack_kind
        dense_dtype = _forge_dense_dtype()
        slot.store_dtypes = dict.fromkeys(_linear_weight_keys(t5), dense_dtype)
        slot.held = _quantized_linear_keys(t5)
        origin = self._t5_origin.get(t5)
        if origin is None or not self.is_swapped("t5xxl", t5):
            origin = self._t5_origin[t5] = _t5_storage(t5)
        if origin == "scaled-fp8":
            live = t5.state_dict()
            scales = {k: torch.ones_like(v, dtype=torch.float32) for k, v in live.items() if k.endswith("scale_weight")}
            base = slot.to_host

            def to_host(sd: Mapping[str, Weight]) -> dict[str, Weight]:
                return {**base(sd), **scales}  # Forge multiplies weights by these: neutral while swapped

            slot.to_host = to_host
        return slot

    # -- what the UI shows ---------------------------------------------------------------------

    def _clip_engines(self, model: Any) -> list[Any]:
        return [e for e in (getattr(model, a, None) for a in CLIP_ENGINE_ATTRS) if e is not None]

    def _engine_for(self, model: Any, tower: str) -> Any | None:
        return next((e for e in self._clip_engines(model) if e.embedding_key == tower), None)

    def _host_clip_skip(self) -> int:
        try:
            from modules.shared import opts

            return int(opts.CLIP_stop_at_last_layers)
        except (ImportError, AttributeError, TypeError, ValueError):
            return 1

    def auto_plans(self, model: Any, family: str) -> list[TowerPlan]:
        """What Forge does with its own setting: ``hidden_states[-max(N, minimal)]`` of its copy of each tower."""
        n = self._host_clip_skip()
        engines = [(t, self._engine_for(model, t)) for t in cs.clip_towers(family)]
        return [_forge_plan(family, tower, engine, n) for tower, engine in engines if engine is not None]

    def missing_layers(self, model: Any) -> dict[str, int]:
        """Forge's SD2 text encoder has 23 of OpenCLIP-H's 24 layers."""
        out = {}
        for engine in self._clip_engines(model):
            missing = _missing(engine)
            if missing:
                out[engine.embedding_key] = missing
        return out

    def layer_note(self, model: Any, family: str, selection: Selection) -> str | None:
        if family == "sd2" and selection.clip_skip == 1:
            return "Forge's SD2 text encoder has 23 of CLIP-H's 24 layers: clip skip 1 acts as 2"
        if family == "sd3" and selection.clip_skip is None and self._host_clip_skip() <= 1:
            return "Forge's SD3 default is the last layer (diffusers uses the penultimate: clip skip 2)"
        if family in ("sdxl", "sdxl-refiner") and selection.clip_skip == 1:
            return "last layer without final norm (Forge's own slider stops at 2)"
        return None

    # -- making the model match -----------------------------------------------------------------

    def requests(self, model: Any, selection: Selection, resolve: Resolver) -> list[SlotRequest]:
        out = []
        for request in super().requests(model, selection, resolve):
            t5_at_auto = request.choice.precision == "auto" and not request.choice.is_builtin
            if request.slot.name == "t5xxl" and t5_at_auto:  # compute as Forge would from this file
                slot = replace(request.slot, to_host=_as_forge_loads(request.slot.to_host))
                request = replace(request, slot=slot)
            out.append(request)
        return out

    def commit(self, model: Any, requests: list[SlotRequest]) -> list[str]:
        if any(self.engine.would_change(r) for r in requests):
            self._release(model)
        with torch.inference_mode():  # Forge creates (and LoRA-merges) its parameters in inference mode
            return super().commit(model, requests)

    def _release(self, model: Any) -> None:
        """Take the text encoders off Forge's loaded list and undo LoRA, so loads hit the real weights."""
        from backend import memory_management

        clip = model.forge_objects.clip
        joint = clip.cond_stage_model
        for loaded in list(memory_management.current_loaded_models):
            if getattr(loaded.model, "model", None) is joint:
                loaded.model_unload()
                memory_management.current_loaded_models.remove(loaded)
        loader = getattr(joint, "lora_loader", None)
        if loader is not None:
            loader.refresh(lora_patches={}, offload_device=clip.patcher.offload_device)
        # Forge bakes GGUF weights on its first load of the model; a held weight set aside before that would
        # come back unbaked into a model marked baked
        memory_management.bake_gguf_model(joint)
        memory_management.soft_empty_cache()

    def after_swap(self, model: Any) -> None:
        for engine in self._clip_engines(model):
            engine.chunk_length = longclip_chunk_length(tower_positions(engine.text_encoder.transformer))
        sdwebui.clear_cond_caches()

    def builtin_source(self, model: Any, name: str) -> BuiltinSource | None:
        """Forge built the slot from the checkpoint, or from a file of its *VAE / Text Encoder* menu that
        holds such a tower (``replace_state_dict``: the later file wins), cast to the slot's dtype (fp8
        and fp16 Linear weights stay views of the file). A menu changed since the model was built is
        caught by the engine's fingerprint (it then keeps a copy)."""
        from modules import sd_models

        params = getattr(sd_models.model_data, "forge_loading_parameters", None) or {}
        info = getattr(model, "sd_checkpoint_info", None) or params.get("checkpoint_info")
        files = [*reversed(params.get("additional_modules") or []), getattr(info, "filename", None)]
        tower = next((t for path in files if (t := tower_in(path, name)) is not None), None)
        if tower is None:
            return None
        to_host = None
        if name == "t5xxl":
            t5 = self._joint(model).t5xxl.transformer
            if self._t5_origin.get(t5) == "scaled-fp8":
                to_host = t5_slot(name, t5).to_host  # the file's own scales
            if tower.quant == "gguf":  # shared came through Forge's fp16 GGUF decoder
                to_host = _as_forge_loads(to_host or t5_slot(name, t5).to_host)
        return BuiltinSource(tower.path, tower, to_host=to_host)

    def on_model_loaded(self, sd_model: Any) -> list[str]:
        """``script_callbacks.on_model_loaded``: Forge built new encoder objects; make them match again.

        Errors propagate (one-line ``TESwitchError``): the caller reports them; the new model keeps its
        own encoders.
        """
        return self.reapply()

    # -- the encode ---------------------------------------------------------------------------

    def encode_plan(self, engine: Any) -> EncodePlan | None:
        """The plan for a CLIP engine during this generation; None: run Forge's own code.

        An explicit clip skip takes the tower's plan from :meth:`plans` (what the panel shows); Auto
        follows Forge's own clip skip through the same rule as :meth:`auto_plans`.
        """
        selection = self.active
        if selection is None:
            return None
        model = self.live_model()
        family = self.family(model) if model is not None else None
        if family is None or not any(engine is e for e in self._clip_engines(model)):
            return None
        tower = engine.embedding_key
        transformer = engine.text_encoder.transformer
        if selection.clip_skip is None:
            if not self.is_swapped(tower, transformer):
                return None
            plan = _forge_plan(family, tower, engine, engine.clip_skip)  # set by Forge right before the encode
        else:
            plan = self.active_plan(tower, model)
            if plan is None:
                return None
        return EncodePlan(plan, _missing(engine), not engine.return_pooled, self.slot_dtype(tower, transformer))

    def encode_clip(self, engine: Any, tokens: torch.Tensor, plan: EncodePlan) -> torch.Tensor:
        """``encode_with_transformers`` with our layer, LN and dtype; pooled exactly as Forge makes it."""
        from backend import memory_management

        device = memory_management.text_encoder_device()
        transformer = engine.text_encoder.transformer
        text_model = text_transformer(transformer)
        embeddings = text_model.embeddings
        embeddings.position_ids = embeddings.position_ids.to(device=device)
        if plan.dtype is None:
            # Forge's own dtype handling: fp32 activations, weights cast per layer
            embeddings.position_embedding = embeddings.position_embedding.to(dtype=torch.float32)
            embeddings.token_embedding = embeddings.token_embedding.to(dtype=torch.float32)
        tokens = tokens.to(device)
        with autocast_off(device):
            z, outputs = cs.run_to_layer(
                hf_clip_blocks(transformer),
                plan.layer.skip,
                lambda: transformer(tokens, output_hidden_states=False),
                stop=plan.stop,
                missing=plan.missing,
            )
        if plan.layer.final_ln:
            z = text_model.final_layer_norm(z)
        if engine.return_pooled and outputs is not None:
            pooled = outputs.pooler_output
            if engine.text_projection and engine.embedding_key != "clip_l":
                pooled = transformer.text_projection(pooled)
            z.pooled = pooled
        return z if plan.dtype is None else sdwebui.cast_cond(z, torch.float32)

    def t5_dtype(self, engine: Any) -> torch.dtype | None:
        """An explicit precision for this T5 engine's slot during a generation, else None."""
        if self.active is None:
            return None
        return self.slot_dtype("t5xxl", engine.text_encoder)

    # -- patches ------------------------------------------------------------------------------

    def patch_targets(self) -> list[sdwebui.PatchTarget]:
        from backend.text_processing.classic_engine import ClassicTextProcessingEngine
        from backend.text_processing.t5_engine import T5TextProcessingEngine
        from modules.processing import StableDiffusionProcessing

        return [
            (ClassicTextProcessingEngine, "encode_with_transformers", self._clip_encode_patch),
            (T5TextProcessingEngine, "encode_with_transformers", self._t5_encode_patch),
            (StableDiffusionProcessing, "cached_params", self._cached_params_patch),
        ]

    def _clip_encode_patch(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def encode_with_transformers(engine: Any, tokens: torch.Tensor) -> torch.Tensor:
            plan = self.encode_plan(engine)
            return original(engine, tokens) if plan is None else self.encode_clip(engine, tokens, plan)

        return encode_with_transformers

    def _t5_encode_patch(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def t5_encode_with_transformers(engine: Any, tokens: torch.Tensor) -> torch.Tensor:
            dtype = self.t5_dtype(engine)
            if dtype is None:
                return original(engine, tokens)
            from backend import memory_management

            device = memory_management.text_encoder_device()
            with autocast_off(device):
                z = engine.text_encoder(input_ids=tokens.to(device))
            return z.to(torch.float32)

        return t5_encode_with_transformers

    def _cached_params_patch(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def cached_params(p: Any, *args: Any, **kwargs: Any) -> tuple:
            return (*original(p, *args, **kwargs), self.cond_signature())

        return cached_params


def _missing(engine: Any) -> int:
    """Final blocks Forge's copy of this engine's tower lacks (``core.clip_skip.missing_layers``)."""
    return cs.missing_layers(engine.embedding_key, len(hf_clip_blocks(engine.text_encoder.transformer)))


def _forge_plan(family: str, tower: str, engine: Any, n: int) -> TowerPlan:
    """Forge's own rule for its clip skip ``n``: ``hidden_states[-max(n, minimal)]`` of its copy of the tower."""
    missing = _missing(engine)
    skip = max(int(n), engine.minimal_clip_skip) + missing
    return cs.tower_plan(family, tower, skip, final_ln=bool(engine.final_layer_norm), missing=missing)
