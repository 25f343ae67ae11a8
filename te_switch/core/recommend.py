"""What a checkpoint or a LoRA says about its own clip skip, read from the files beside it.

Host-free: paths in, findings out. Sources, in the order they count (:data:`SOURCES`):

* ``yours``   — the user's own value for that model (the WebUI layer's per-model memory; given by the caller);
* ``card``    — A1111's user metadata ``<model>.json`` (what the Checkpoints/Lora cards edit): a
  ``"clip skip"`` entry, else one "Clip skip N" in its notes, else in its description;
* ``file``    — the safetensors header's ``ss_clip_skip`` (kohya sd-scripts), read without touching a
  tensor; ``ss_base_model_version`` says which family the model was trained on (SDXL/SD3/Flux training
  has no clip skip, so an ``ss_clip_skip`` there says nothing);
* ``samples`` — the sample images recorded by CivitAI helper extensions (``<model>.civitai.info``,
  ``<model>.json``, ``<model>.api_info.json``): the majority ``Clip skip`` / ``clipSkip`` of the images
  that state one.

A model's recommendation is its first source that says something; :func:`combine` puts the models of
one generation together and reports a disagreement instead of picking a side. A malformed file is
ignored with one warning (through ``on_warning``, once per version of the file), never an exception.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from te_switch.core.errors import BadFileError
from te_switch.core.readers import SafetensorsSource
from te_switch.core.selection import CLIP_SKIP_MAX

SOURCES = ("yours", "card", "file", "samples")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
USER_METADATA_SUFFIX = ".json"  # A1111 extra_networks.get_user_metadata: <stem>.json
SAMPLE_SIDECARS = (".civitai.info", ".json", ".api_info.json")  # Civitai Helper, A1111/Browser+, Browser+
CARD_KEYS = ("clip skip", "clip_skip", "clipSkip")  # an explicit entry; A1111 itself writes none
CARD_TEXT_KEYS = ("notes", "description")
SAMPLE_KEYS = ("Clip skip", "clipSkip", "clip_skip", "Clip Skip")
SIDECAR_MAX_BYTES = 32 << 20  # a sidecar is JSON text; anything bigger is not one

# ss_base_model_version (kohya) / modelspec.architecture -> family; first matching prefix wins
BASE_MODEL_PREFIXES: tuple[tuple[str, str], ...] = (
    ("sdxl", "sdxl"),
    ("stable-diffusion-xl", "sdxl"),
    ("sd3", "sd3"),
    ("stable-diffusion-3", "sd3"),
    ("flux", "flux"),
    ("sd_v2", "sd2"),
    ("v2", "sd2"),
    ("stable-diffusion-v2", "sd2"),
    ("sd_v1", "sd1"),
    ("v1", "sd1"),
    ("stable-diffusion-v1", "sd1"),
)
NO_CLIP_SKIP_TRAINING = ("sdxl", "sd3", "flux")  # their trainers condition on a fixed layer

# "Clip skip: 2", "clip_skip 2", "CLIP Skip = 2", "clipskip2" — but not "clip skip 1-2" / "1 or 2"
_TEXT_CLIP_SKIP = re.compile(r"clip[\s_-]*skip\s*[:=]?\s*(\d{1,2})(?!\d|\s*(?:[-~–/,]|or\b|to\b)\s*\d)", re.IGNORECASE)


@dataclass(frozen=True)
class Finding:
    """One source's value: ``detail`` says where exactly (e.g. ``"notes"``, ``"3 of 4"``)."""

    source: str
    value: int
    detail: str = ""


@dataclass(frozen=True)
class ModelAdvice:
    """Everything one model's files say, in :data:`SOURCES` order."""

    kind: str  # "checkpoint" | "lora"
    name: str
    findings: tuple[Finding, ...] = ()
    base: str | None = None  # the family it was trained on, when its file says

    @property
    def best(self) -> Finding | None:
        return self.findings[0] if self.findings else None

    def disagreeing(self) -> tuple[Finding, ...]:
        """Lower sources whose value differs from the one that counts (shown, never used)."""
        best = self.best
        return tuple(f for f in self.findings[1:] if best is not None and f.value != best.value)


@dataclass(frozen=True)
class Advice:
    """The models of one generation together."""

    models: tuple[ModelAdvice, ...] = ()
    family: str | None = None  # the loaded model's family (LoRAs made for another one do not count)
    off_family: tuple[ModelAdvice, ...] = field(default=())

    @property
    def speaking(self) -> tuple[ModelAdvice, ...]:
        return tuple(m for m in self.models if m.best is not None)

    @property
    def values(self) -> tuple[int, ...]:
        return tuple(sorted({m.best.value for m in self.speaking if m.best is not None}))

    @property
    def conflict(self) -> bool:
        return len(self.values) > 1

    @property
    def value(self) -> int | None:
        """The one value every model that says something agrees on, else None."""
        values = self.values
        return values[0] if len(values) == 1 else None


def combine(models: Iterable[ModelAdvice], family: str | None = None) -> Advice:
    """Put a generation's models together; a LoRA trained on another family than ``family`` does not count."""
    kept: list[ModelAdvice] = []
    off: list[ModelAdvice] = []
    for model in models:
        if family is not None and model.base is not None and model.base != family and model.kind == "lora":
            off.append(model)
        else:
            kept.append(model)
    return Advice(tuple(kept), family, tuple(off))


# ---------------------------------------------------------------------------------------------
# values


def clip_skip_value(value: Any) -> int | None:
    """A stated clip skip -> 1..12, or None when it states nothing usable (``"None"``, ``0``, junk)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text or text.lower() in ("none", "null", "auto"):
            return None
        try:
            value = float(text)
        except ValueError:
            return None
    if not isinstance(value, int | float) or value != value or int(value) != value:
        return None
    n = int(value)
    return n if 1 <= n <= CLIP_SKIP_MAX else None


def base_family(metadata: Mapping[str, str]) -> str | None:
    """The family a model was trained on, from ``ss_base_model_version`` or ``modelspec.architecture``."""
    for key in ("ss_base_model_version", "modelspec.architecture"):
        text = str(metadata.get(key) or "").strip().lower()
        if not text or text == "none":
            continue
        for prefix, family in BASE_MODEL_PREFIXES:
            if text.startswith(prefix):
                return family
    if str(metadata.get("ss_v2", "")).lower() == "true":
        return "sd2"
    return None


def from_file_metadata(metadata: Mapping[str, str]) -> tuple[Finding | None, str | None, str | None]:
    """(finding, base family, warning) from a safetensors ``__metadata__``."""
    base = base_family(metadata)
    raw = metadata.get("ss_clip_skip")
    if raw is None or str(raw).strip().lower() in ("", "none", "null"):
        return None, base, None
    value = clip_skip_value(raw)
    if value is None:
        return None, base, f"ss_clip_skip {str(raw)[:40]!r} is not 1-{CLIP_SKIP_MAX}"
    if base in NO_CLIP_SKIP_TRAINING:
        return None, base, None  # kohya ignores --clip_skip when training these
    return Finding("file", value), base, None


def from_text(text: Any) -> int | None:
    """The one clip skip a free text names ("Clip skip: 2"); None when it names none or several."""
    if not isinstance(text, str) or not text:
        return None
    values = {int(m) for m in _TEXT_CLIP_SKIP.findall(text)}
    values = {v for v in values if 1 <= v <= CLIP_SKIP_MAX}
    return values.pop() if len(values) == 1 else None


def from_user_metadata(data: Any) -> Finding | None:
    """A1111's user metadata (``<model>.json``): an explicit entry, else its notes, else its description."""
    if not isinstance(data, dict):
        return None
    for key in CARD_KEYS:
        value = clip_skip_value(data.get(key))
        if value is not None:
            return Finding("card", value, key)
    for key in CARD_TEXT_KEYS:
        value = from_text(data.get(key))
        if value is not None:
            return Finding("card", value, key)
    return None


def sample_metas(data: Any, filename: str, sidecar: str) -> list[dict[str, Any]]:
    """The ``meta`` dicts of a sidecar's sample images.

    ``.civitai.info`` is one model version (``images``); ``.api_info.json`` is the whole model
    (``modelVersions``), of which only the version that lists this file counts.
    """
    if not isinstance(data, dict):
        return []
    versions: list[Any] = [data]
    if sidecar == ".api_info.json":
        versions = [
            v
            for v in data.get("modelVersions") or []
            if isinstance(v, dict)
            and any(isinstance(f, dict) and f.get("name") == filename for f in v.get("files") or [])
        ]
    out = []
    for version in versions:
        images = version.get("images") if isinstance(version, dict) else None
        for image in images if isinstance(images, list) else []:
            meta = image.get("meta") if isinstance(image, dict) else None
            if isinstance(meta, dict):
                out.append(meta)
    return out


def from_samples(metas: Iterable[Mapping[str, Any]]) -> Finding | None:
    """The majority clip skip of the images that state one; None on a tie or when none does."""
    counts: Counter[int] = Counter()
    for meta in metas:
        for key in SAMPLE_KEYS:
            if key in meta:
                value = clip_skip_value(meta[key])
                if value is not None:
                    counts[value] += 1
                break
    if not counts:
        return None
    ranked = counts.most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        return None
    value, count = ranked[0]
    return Finding("samples", value, f"{count}/{sum(counts.values())}")


# ---------------------------------------------------------------------------------------------
# files


def _stem(path: str) -> str:
    return os.path.splitext(path)[0]


def _signature(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns)


def sidecar_paths(path: str) -> dict[str, str]:
    """Every sidecar name this module reads, for ``path`` (existing or not)."""
    stem = _stem(path)
    return {suffix: stem + suffix for suffix in {USER_METADATA_SUFFIX, *SAMPLE_SIDECARS}}


def read_json(path: str) -> Any:
    """A sidecar's JSON; raises ValueError/OSError with a short reason."""
    if os.path.getsize(path) > SIDECAR_MAX_BYTES:
        raise ValueError(f"over {SIDECAR_MAX_BYTES >> 20} MB")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class Reader:
    """Reads and caches what each model file and its sidecars say, keyed by their size and mtime.

    ``on_warning(line)`` hears about malformed files once per version of the file.
    """

    def __init__(self, on_warning: Callable[[str], None] | None = None) -> None:
        self.on_warning = on_warning or (lambda line: None)
        self._cache: dict[str, tuple[Any, tuple[Finding, ...], str | None]] = {}
        self._lock = threading.Lock()

    def _warn(self, path: str, reason: str) -> None:
        self.on_warning(f"ignoring {os.path.basename(path)} for clip skip: {reason}")

    def _read(self, path: str) -> tuple[tuple[Finding, ...], str | None]:
        findings: list[Finding] = []
        base = None
        sidecars = sidecar_paths(path)
        jsons: dict[str, Any] = {}
        for suffix, sidecar in sidecars.items():
            if not os.path.isfile(sidecar):
                continue
            try:
                jsons[suffix] = read_json(sidecar)
            except (OSError, ValueError, UnicodeDecodeError) as e:
                self._warn(sidecar, _reason(e))
        card = from_user_metadata(jsons.get(USER_METADATA_SUFFIX))
        if card is not None:
            findings.append(card)
        if path.lower().endswith(SAFETENSORS_SUFFIXES) and os.path.isfile(path):
            try:
                metadata = SafetensorsSource(path).metadata  # header only: no tensor is read
            except (BadFileError, OSError) as e:
                self._warn(path, _reason(e))
                metadata = {}
            finding, base, warning = from_file_metadata(metadata)
            if warning:
                self._warn(path, warning)
            if finding is not None:
                findings.append(finding)
        filename = os.path.basename(path)
        metas = [
            m for suffix in SAMPLE_SIDECARS if suffix in jsons for m in sample_metas(jsons[suffix], filename, suffix)
        ]
        samples = from_samples(metas)
        if samples is not None:
            findings.append(samples)
        return tuple(findings), base

    def advise(self, kind: str, name: str, path: str | None, own: int | None = None) -> ModelAdvice:
        """What ``path`` and its sidecars say (``own``: the user's value, counted first)."""
        findings: tuple[Finding, ...] = ()
        base = None
        if path:
            key = os.path.abspath(path)
            signature = tuple(_signature(p) for p in (key, *sidecar_paths(key).values()))
            with self._lock:
                cached = self._cache.get(key)
            if cached is not None and cached[0] == signature:
                findings, base = cached[1], cached[2]
            else:
                findings, base = self._read(key)
                with self._lock:
                    self._cache[key] = (signature, findings, base)
        if own is not None:
            findings = (Finding("yours", own), *findings)
        return ModelAdvice(kind, name, findings, base)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()


def _reason(e: BaseException) -> str:
    if isinstance(e, BadFileError):
        return e.reason
    if isinstance(e, json.JSONDecodeError):
        return f"not JSON (line {e.lineno})"
    return str(e).splitlines()[0] if str(e) else type(e).__name__


# ---------------------------------------------------------------------------------------------
# prompts

# A1111/Forge extra-network syntax (modules/extra_networks.py re_extra_net): <name:arg1:arg2...>
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
LORA_NETWORKS = ("lora", "lyco")  # A1111 registers "lyco" as an alias of its Lora network


def _multiplier(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def lora_names(prompts: Iterable[str]) -> list[str]:
    """The LoRAs the prompts activate, in order, once each.

    Arguments follow the hosts' ``ExtraNetworkLora.activate``: ``name[:te[:unet[:dyn]]]`` with named
    ``te=``/``unet=`` overrides, unet defaulting to te; a LoRA at 0 for both does nothing and is left out.
    """
    out: list[str] = []
    for prompt in prompts:
        for network, args in _EXTRA_NETWORK.findall(prompt or ""):
            if network not in LORA_NETWORKS:  # the hosts' registry lookup is case-sensitive
                continue
            items = args.split(":")
            parts = [item.split("=", 2) for item in items]
            named = {part[0]: part[1] for part in parts if len(part) == 2}
            positional = [item for item, part in zip(items, parts, strict=True) if len(part) != 2]
            if not positional or not positional[0].strip():
                continue
            name = positional[0].strip()
            te = _multiplier(positional[1]) if len(positional) > 1 else 1.0
            te = _multiplier(named["te"]) if "te" in named else te
            unet = _multiplier(positional[2]) if len(positional) > 2 else te
            unet = _multiplier(named["unet"]) if "unet" in named else unet
            if te == 0 and unet == 0:
                continue
            if name not in out:
                out.append(name)
    return out
