"""One image on a diffusers pipeline with a Selection: swap, encode (the diffusers adapter), run, infotext."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from te_switch.core import infotext
from te_switch.core.selection import Selection
from te_switch.hosts.diffusers import DiffusersAdapter

DEFAULT_GUIDANCE = {"flux": 3.5}


@dataclass
class GenerationResult:
    image: Any  # PIL.Image.Image
    infotext: str
    params: dict[str, Any]
    timings: dict[str, float]  # seconds: swap, encode, generate
    warnings: list[str] = field(default_factory=list)


def save_png(image: Any, path: str, text: dict[str, str]) -> str:
    """Write ``image`` as a lossless PNG with ``text`` chunks (``parameters``: the infotext), atomically."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)
    return path


def save_result(result: GenerationResult, path: str) -> str:
    """One generated image as a WebUI saves it: the PNG with its infotext under ``parameters``."""
    return save_png(result.image, path, {"parameters": result.infotext})


def generate(
    adapter: DiffusersAdapter,
    selection: Selection,
    prompt: str,
    negative_prompt: str = "",
    seed: int = 0,
    steps: int = 20,
    size: int | tuple[int, int] | None = None,
    guidance: float | None = None,
    *,
    model_name: str | None = None,
) -> GenerationResult:
    """Apply ``selection``, encode, run the pipeline; returns the image, its infotext and timings.

    An empty negative prompt follows the pipeline's own convention (see ``DiffusersAdapter.encode``).
    """
    pipe = adapter.pipe
    family = adapter.family(pipe)
    started = time.perf_counter()
    adapter.apply(selection)
    swapped = time.perf_counter()
    embeds = adapter.encode(selection, prompt, negative_prompt or None)
    encoded = time.perf_counter()
    width, height = default_size(pipe, size)
    guidance = DEFAULT_GUIDANCE.get(family or "", 7.0) if guidance is None else guidance
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    with _embeds_kept_as_given(adapter, family):
        output = pipe(
            **embeds,
            num_inference_steps=int(steps),
            guidance_scale=float(guidance),
            width=width,
            height=height,
            generator=generator,
            output_type="pil",
        )
    done = time.perf_counter()
    params = generation_params(
        adapter, selection, prompt, negative_prompt, seed, steps, (width, height), guidance, model_name
    )
    timings = {"swap": swapped - started, "encode": encoded - swapped, "generate": done - encoded}
    text = infotext.format_infotext(params)
    return GenerationResult(output.images[0], text, params, timings, list(adapter.last_warnings))


@contextlib.contextmanager
def _embeds_kept_as_given(adapter: DiffusersAdapter, family: str | None) -> Iterator[None]:
    """SD1/SD2/SDXL's ``__call__`` re-casts given embeds to the text encoder's dtype; a slot computing
    at another precision than the UNet would then feed it the wrong dtype. For the call, that
    encoder is hidden from the pipeline (which then casts to the UNet's dtype) — not from its config."""
    pipe = adapter.pipe
    attr = {"sd1": "text_encoder", "sd2": "text_encoder", "sdxl": "text_encoder_2"}.get(family or "")
    encoder = getattr(pipe, attr, None) if attr else None
    if encoder is None or encoder.dtype == adapter.denoiser_dtype():
        yield
        return
    object.__setattr__(pipe, attr, None)  # bypasses DiffusionPipeline.__setattr__: config untouched
    try:
        yield
    finally:
        object.__setattr__(pipe, attr, encoder)


def generation_params(
    adapter: DiffusersAdapter,
    selection: Selection,
    prompt: str,
    negative_prompt: str,
    seed: int,
    steps: int,
    size: tuple[int, int],
    guidance: float,
    model_name: str | None = None,
) -> dict[str, Any]:
    """WebUI-style generation parameters (what the infotext says) for one image."""
    pipe = adapter.pipe
    params: dict[str, Any] = {
        infotext.PROMPT: prompt,
        infotext.NEGATIVE: negative_prompt,
        "Steps": int(steps),
        "Sampler": type(pipe.scheduler).__name__.removesuffix("Scheduler"),
        "CFG scale": float(guidance),
        "Seed": int(seed),
        "Size": f"{size[0]}x{size[1]}",
        "Model": model_name or pipeline_name(pipe),
    }
    params.update(infotext.clip_skip_entries(selection))
    for slot_name, slot in adapter.slots(pipe).items():
        applied = adapter.engine.applied(slot)
        if applied is None:
            continue
        src = applied.source
        encoder = infotext.encoder_value(src.label, src.short_hash) if src is not None else None
        params.update(infotext.slot_entries(slot_name, encoder, applied.precision))
    return params


def default_size(pipe: Any, size: int | tuple[int, int] | None = None) -> tuple[int, int]:
    """(width, height): ``size`` as given, else the pipeline's own default."""
    if size is None:
        default = getattr(pipe, "default_sample_size", None)
        if default is None:
            default = pipe.unet.config.sample_size
        side = int(default) * int(pipe.vae_scale_factor)
        return side, side
    if isinstance(size, int):
        return size, size
    return int(size[0]), int(size[1])


def pipeline_name(pipe: Any) -> str:
    """The model's folder name (what the infotext's ``Model`` says), else the pipeline class."""
    path = getattr(getattr(pipe, "config", None), "_name_or_path", "") or ""
    return os.path.basename(os.path.normpath(path)) if path else type(pipe).__name__
