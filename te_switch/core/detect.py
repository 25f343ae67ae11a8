"""Say what a weights file holds — by its keys and shapes only, never its name.

A file may hold one bare tower (an encoder file), several (a whole SD/SDXL/SD3/Flux checkpoint,
a CLIP model with its vision tower), or none (a UNet, a VAE, a LoRA...). :func:`detect` reads
headers only and returns one :class:`TowerInfo` per text-encoder tower found.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from te_switch.core.errors import BadFileError, TESwitchError, one_line
from te_switch.core.layouts import ANCHOR_SUFFIXES, LAYOUTS, Layout
from te_switch.core.readers import TensorSource, open_file

KINDS = (
    "clip-l",
    "long-clip-l",
    "clip-h",
    "clip-g",
    "t5-xxl",
    "t5-xl",
    "t5-base",
    "umt5-xxl",
    "not-a-text-encoder",
    "unknown",
)
CLIP_KINDS = ("clip-l", "long-clip-l", "clip-h", "clip-g")
T5_KINDS = ("t5-xxl", "t5-xl", "t5-base", "umt5-xxl")

CLIP_VOCAB = 49408
LONG_CLIP_POSITIONS = 248

# Where whole checkpoints and bundles keep their towers, and the slot each one fills.
# (SD1 old layout = `cond_stage_model.transformer.` + HF names without `text_model.`.)
TOWER_PREFIXES: dict[str, str] = {
    "cond_stage_model.transformer.": "clip_l",  # SD1
    "cond_stage_model.model.": "clip_h",  # SD2 (OpenCLIP)
    "conditioner.embedders.0.transformer.": "clip_l",  # SDXL base
    "conditioner.embedders.1.model.": "clip_g",  # SDXL base (OpenCLIP)
    "conditioner.embedders.0.model.": "clip_g",  # SDXL refiner (OpenCLIP)
    "text_encoders.clip_l.transformer.": "clip_l",  # SD3 / Flux / Cascade
    "text_encoders.clip_g.transformer.": "clip_g",
    "text_encoders.clip_h.transformer.": "clip_h",
    "text_encoders.t5xxl.transformer.": "t5xxl",
    "text_encoder.": "clip_l",  # diffusers component dumps
    "text_encoder_2.": "clip_g",
    "text_encoder_3.": "t5xxl",
}

# keys that sit beside quantised weights and are not weights themselves
QUANT_SIDE_SUFFIXES = (".scale_weight", ".scale_input", ".weight_scale", ".input_scale", ".comfy_quant")
FLOAT8_NAMES = ("F8_E4M3", "F8_E5M2")


@dataclass
class TowerInfo:
    """One text-encoder tower in a file (or why the file is not one). See docs/ARCHITECTURE.md."""

    path: str
    tower: str | None = None
    kind: str | None = None
    family: str | None = None  # 'clip' | 't5' (None when no tower)
    layout: str | None = None
    prefix: str = ""
    layers: int | None = None
    width: int | None = None
    positions: int | None = None
    vocab: int | None = None
    dtypes: list[str] = field(default_factory=list)
    params: int = 0
    format: str | None = None
    quant: str | None = None
    features: list[str] = field(default_factory=list)
    note: str | None = None
    error: str | None = None

    @property
    def usable(self) -> bool:
        return self.error is None and self.kind in CLIP_KINDS + T5_KINDS

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _find_anchors(keys: list[str]) -> list[tuple[str, Layout]]:
    """(prefix, layout) for every text-tower anchor."""
    found: list[tuple[str, Layout]] = []
    key_set = set(keys)
    for key in keys:
        if not key.endswith(ANCHOR_SUFFIXES):
            continue
        for layout in LAYOUTS:
            m = layout.pattern.match(key)
            if m and layout.is_text_tower(m.group(1), key_set):
                found.append((m.group(1), layout))
                break
    return found


def _count_indexed(keys: list[str], head: str) -> int:
    """Number of distinct N in keys shaped like ``head + N + '.'…`` (layers / blocks)."""
    seen = set()
    n = len(head)
    for k in keys:
        if k.startswith(head):
            rest = k[n:]
            idx, _, _ = rest.partition(".")
            if idx.isdigit():
                seen.add(int(idx))
    return len(seen)


def _clip_kind(width: int | None, layers: int, positions: int | None) -> tuple[str, str | None]:
    if width == 768 and layers == 12:
        if positions == 77:
            return "clip-l", None
        if positions == LONG_CLIP_POSITIONS:
            return "long-clip-l", None
        return "unknown", f"CLIP-L with {positions} positions (expected 77 or 248)"
    if width == 1024 and layers in (23, 24):
        return "clip-h", None
    if width == 1280 and layers == 32:
        return "clip-g", None
    return "unknown", f"CLIP text tower {layers}x{width} is not CLIP-L, CLIP-H or CLIP-G"


def _t5_kind(width: int | None, gated: bool, per_block_bias: bool, vocab: int | None) -> tuple[str, str | None]:
    if not gated:
        return "unknown", "original T5 1.0 (non-gated feed-forward); no supported model uses it"
    if per_block_bias or vocab == 256384:
        if width == 4096:
            return "umt5-xxl", None
        return "unknown", f"UMT5 with d_model {width} (only UMT5-XXL is supported)"
    kinds = {4096: "t5-xxl", 2048: "t5-xl", 768: "t5-base"}
    if width in kinds:
        return kinds[width], None
    return "unknown", f"T5 v1.1 with d_model {width} is not XXL, XL or base"


def _describe_clip(src: TensorSource, info: TowerInfo, layout: Layout, keys: list[str]) -> None:
    p = info.prefix
    info.layers = _count_indexed(keys, p + layout.blocks)
    info.features += [name for name, marks in layout.features if any(p + k in keys for k in marks)]
    if any(k.endswith(".theta") for k in keys):
        info.features.append("gmp")
    tok, pos = p + layout.token_embedding[0], p + layout.positions
    if tok in keys:
        info.vocab, info.width = src.info(tok).shape[:2]
    if pos in keys:
        info.positions = src.info(pos).shape[0]
    info.kind, info.note = _clip_kind(info.width, info.layers or 0, info.positions)


def _describe_t5(src: TensorSource, info: TowerInfo, layout: Layout, keys: list[str]) -> None:
    p = info.prefix
    info.layers = _count_indexed(keys, p + layout.blocks)
    gated = any(layout.gate in k for k in keys)
    per_block_bias = p + layout.second_bias in keys
    emb = next((p + k for k in layout.token_embedding if p + k in keys), None)
    if emb is not None and emb != p + layout.token_embedding[0]:
        info.features.append("embed-tokens-only")  # a WebUI-style T5: no `shared.weight`
    if emb is not None:
        info.vocab, info.width = src.info(emb).shape[:2]
    else:
        info.width = src.info(p + layout.anchor).shape[-1]  # block 0's q is [inner, d_model]
        info.features.append("no-embedding")
    info.kind, info.note = _t5_kind(info.width, gated, per_block_bias, info.vocab)


def _quant_of(src: TensorSource, info: TowerInfo, keys: list[str]) -> str | None:
    if any(k.endswith(QUANT_SIDE_SUFFIXES) for k in keys) or "scaled_fp8" in src or info.prefix + "scaled_fp8" in src:
        return "scaled-fp8"
    if src.format == "gguf" and any(d not in ("F32", "F16", "BF16") for d in info.dtypes):
        return "gguf"
    if any(d in FLOAT8_NAMES for d in info.dtypes):
        return "fp8"
    return None


def _not_an_encoder_reason(keys: list[str]) -> str | None:
    """Name what a tower-less file is, when it is something we know."""
    joined = keys[:2000]
    if any(".lora_" in k or k.startswith(("lora_", "lora.")) or ".lora_A." in k or ".lora_B." in k for k in joined):
        return "a LoRA"
    if any(k in ("string_to_param.*", "emb_params") or k.startswith("string_to_param") for k in joined) or (
        keys and set(keys) <= {"clip_l", "clip_g", "emb_params", "string_to_token", "string_to_param.*"}
    ):
        return "a textual-inversion embedding"
    # a VAE first, by its own keys (a diffusers VAE's `encoder.down_blocks.` would look like a UNet's)
    vae_prefixes = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
    if joined and all(k.startswith(vae_prefixes) for k in joined):
        return "a VAE"
    unet_marks = ("model.diffusion_model.", "input_blocks.", "down_blocks.", "double_blocks.", "joint_blocks.")
    if any(m in k for k in joined for m in unet_marks):
        return "a diffusion model (UNet/DiT) without a text encoder"
    vae_marks = ("first_stage_model.", "encoder.down.", "decoder.up.", "decoder.conv_in.", "decoder.up_blocks.")
    if any(k.startswith(vae_marks) or ".decoder.conv_in." in k for k in joined):
        return "a VAE"
    if any(k.startswith(("vision_model.", "visual.")) for k in joined):
        return "a CLIP vision tower without a text tower"
    return None


def detect(src: TensorSource) -> list[TowerInfo]:
    """Every text-encoder tower in ``src`` (header only). Never returns an empty list."""
    keys = src.keys()
    anchors = _find_anchors(keys)
    if not anchors:
        reason = _not_an_encoder_reason(keys)
        if reason:
            return [TowerInfo(src.path, kind="not-a-text-encoder", format=src.format, note=reason)]
        note = "no text-encoder tower found" + (f" among {len(keys)} tensors" if keys else " (no tensors)")
        return [TowerInfo(src.path, kind="unknown", format=src.format, note=note)]
    towers = []
    for prefix, layout in anchors:
        info = TowerInfo(src.path, prefix=prefix, layout=layout.name, family=layout.family, format=src.format)
        keys_here = layout.keys(keys, prefix)
        try:
            describe = _describe_clip if layout.family == "clip" else _describe_t5
            describe(src, info, layout, keys_here)
        except (KeyError, ValueError, IndexError) as e:
            info.kind, info.note = "unknown", f"inconsistent {layout.family.upper()} tensors ({one_line(e)})"
        weights = [k for k in keys_here if not k.endswith(QUANT_SIDE_SUFFIXES) and not k.endswith("position_ids")]
        infos = [src.info(k) for k in weights]
        info.dtypes = sorted({i.dtype for i in infos})
        info.params = sum(i.numel for i in infos)
        info.quant = _quant_of(src, info, keys_here)
        if any(k.startswith((prefix + "visual.", prefix + "vision_model.")) for k in keys):
            info.features.append("vision-tower")
        towers.append(info)
    for t in towers:
        # a bare file (or one wrapped in e.g. `model.`) fills no named slot; bundles name theirs
        t.tower = TOWER_PREFIXES.get(t.prefix) or (_slot_of_kind(t.kind) if len(towers) > 1 else None)
    return towers


def _slot_of_kind(kind: str | None) -> str | None:
    return {
        "clip-l": "clip_l",
        "long-clip-l": "clip_l",
        "clip-g": "clip_g",
        "clip-h": "clip_h",
    }.get(kind or "", "t5xxl" if kind in T5_KINDS else None)


def inspect_path(path: str) -> list[TowerInfo]:
    """Like :func:`detect` on a path, but a bad file becomes one entry with ``error`` set."""
    try:
        with open_file(path) as src:
            return detect(src)
    except BadFileError as e:
        return [TowerInfo(path, error=str(e))]
    except TESwitchError as e:
        return [TowerInfo(path, error=one_line(e))]
    except (OSError, MemoryError, ValueError) as e:
        return [TowerInfo(path, error=f"{path}: {one_line(e)}")]
