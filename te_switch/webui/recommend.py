"""The clip-skip recommendation in a WebUI: which files the loaded checkpoint and the prompt's LoRAs
are, what they say (``te_switch.core.recommend``), the automatic mode, and the panel's line.

* Files: the checkpoint from ``sd_checkpoint_info.filename``; a LoRA by the host's own lookup
  (the Lora extension's ``networks.available_network_aliases``, with its forbidden-alias rule), else by
  file name under ``--lora-dir``. The host's "Add network to prompt" LoRA (``opts.sd_lora``) counts too.
* Prompts: every prompt of the generation, and the hires-fix prompts, so X/Y/Z "Prompt S/R" cells and
  API requests are read the same way as the tab.
* Automatic (opt-in): a clip skip left on Auto at every level becomes the value every model that says
  something agrees on; when they disagree, Auto stays the host's own and the generation says why.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from te_switch.core.recommend import Advice, Finding, ModelAdvice, Reader, combine, lora_names
from te_switch.core.selection import FAMILY_LABELS, Selection
from te_switch.webui import memory, options, runtime
from te_switch.webui.i18n import tr

AUTOMATIC = options.AUTOMATIC
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")

_reader = Reader(on_warning=lambda line: print(f"{runtime.PREFIX}{line}"))


def _opts() -> Any:
    try:
        from modules import shared
    except ImportError:
        return None
    return shared.opts


def automatic() -> bool:
    return bool(getattr(_opts(), AUTOMATIC, False))


# ---------------------------------------------------------------------------------------------
# which files


def _networks() -> Any:
    """The host's Lora extension module (A1111 ``extensions-builtin/Lora``, Forge ``sd_forge_lora``)."""
    module = sys.modules.get("networks")
    return module if hasattr(module, "available_network_aliases") else None


def _lora_dirs() -> list[str]:
    try:
        from modules import shared
    except ImportError:
        return []
    cmd = shared.cmd_opts
    dirs = [getattr(cmd, "lora_dir", None), getattr(cmd, "lyco_dir_backcompat", None)]
    return [d for d in dirs if isinstance(d, str) and os.path.isdir(d)]


def lora_path(name: str) -> str | None:
    """The file the host would load for ``<lora:name:…>`` (None when there is none)."""
    networks = _networks()
    if networks is not None:
        forbidden = getattr(networks, "forbidden_network_aliases", {})
        table = networks.available_networks if name.lower() in forbidden else networks.available_network_aliases
        entry = table.get(name)
        if entry is not None:
            return getattr(entry, "filename", None)
        return None
    for folder in _lora_dirs():
        for root, _dirs, files in os.walk(folder, followlinks=True):
            for file in sorted(files):
                stem, suffix = os.path.splitext(file)
                if stem == name and suffix.lower() in LORA_SUFFIXES:
                    return os.path.join(root, file)
    return None


def checkpoint_file(model: Any) -> tuple[str, str | None]:
    info = getattr(model, "sd_checkpoint_info", None)
    name = runtime.checkpoint_key(model) if model is not None else ""
    return name, getattr(info, "filename", None)


def prompts_of(p: Any) -> list[str]:
    """Every positive prompt a generation encodes (batches and hires fix), where LoRAs are named."""
    prompts = list(getattr(p, "all_prompts", None) or [getattr(p, "prompt", "") or ""])
    if getattr(p, "enable_hr", False):
        prompts += list(getattr(p, "all_hr_prompts", None) or [getattr(p, "hr_prompt", "") or ""])
    return [x for x in prompts if isinstance(x, str)]


def _added_lora() -> str | None:
    """The Lora extension's "Add network to prompt" setting (appended to every prompt when it runs)."""
    value = getattr(_opts(), "sd_lora", None)
    return value if isinstance(value, str) and value and value != "None" else None


# ---------------------------------------------------------------------------------------------
# what they say


def advice_for(prompts: Iterable[str], model: Any = None) -> Advice:
    """The loaded checkpoint and every LoRA of ``prompts``, put together for the loaded family."""
    model = runtime.live_model() if model is None else model
    models: list[ModelAdvice] = []
    if model is not None:
        name, filename = checkpoint_file(model)
        if name or filename:
            own = memory.recall_checkpoint_clip_skip(name)
            models.append(_reader.advise("checkpoint", name or os.path.basename(filename or ""), filename, own))
    names = lora_names(prompts)
    added = _added_lora()
    if added and added not in names:
        names.append(added)
    models += [_reader.advise("lora", name, lora_path(name), memory.recall_lora(name)) for name in names]
    return combine(models, runtime.family())


def advice_for_p(p: Any) -> Advice:
    return advice_for(prompts_of(p), getattr(p, "sd_model", None) or None)


def apply_automatic(p: Any, sel: Selection) -> Selection:
    """Auto everywhere and the automatic mode on: the models' agreed value, else the host's own."""
    if sel.clip_skip is not None or not automatic():
        return sel
    try:
        advice = advice_for_p(p)
    except Exception as e:  # reading recommendations must never cost a generation
        print(f"{runtime.PREFIX}{tr('clip skip recommendation unavailable: {reason}', reason=str(e))}")
        return sel
    if advice.value is not None:
        sources = ", ".join(model_label(m) for m in advice.speaking)
        print(f"{runtime.PREFIX}{tr('Auto: Clip skip {n}, as {models} recommend', n=advice.value, models=sources)}")
        return replace(sel, clip_skip=advice.value, scope="both")
    if advice.conflict:
        line = f"{runtime.PREFIX}{conflict_text(advice)} {tr('Auto stays the host’s own.')}"
        print(line)
        if hasattr(p, "comment"):
            p.comment(line)
    return sel


def remember(p: Any, clip_skip: int | None) -> None:
    """After a generation with a clip skip the user chose: remember it for the prompt's LoRAs."""
    if clip_skip is None or not memory.enabled():
        return
    names = lora_names(prompts_of(p))
    try:
        memory.remember_loras(names, clip_skip)
    except OSError as e:
        print(f"{runtime.PREFIX}cannot save the per-model memory: {e}")


# ---------------------------------------------------------------------------------------------
# words


def model_label(model: ModelAdvice) -> str:
    if model.kind == "checkpoint":
        return tr("the checkpoint")
    return tr("LoRA “{name}”", name=model.name)


def source_text(finding: Finding) -> str:
    if finding.source == "yours":
        return tr("remembered")
    if finding.source == "card":
        field = {"notes": tr("notes"), "description": tr("description")}.get(finding.detail, finding.detail)
        return tr("its card’s {field}", field=field)
    if finding.source == "file":
        return tr("from its file")
    count, _, total = finding.detail.partition("/")
    return tr("{count} of {total} sample images", count=count, total=total)


def finding_text(model: ModelAdvice, finding: Finding, *, alone: bool) -> str:
    """'This LoRA was trained with Clip skip 2 (from its file)' and the like."""
    if model.kind == "checkpoint":
        subject = tr("This checkpoint")
    else:
        subject = tr("This LoRA") if alone else tr("LoRA “{name}”", name=model.name)
    if finding.source == "yours":
        return tr("{subject}: you used Clip skip {n} with it (remembered)", subject=subject, n=finding.value)
    if finding.source == "file":
        return tr("{subject} was trained with Clip skip {n} ({source})", subject=subject, n=finding.value,
                  source=source_text(finding))  # fmt: skip
    return tr("{subject} recommends Clip skip {n} ({source})", subject=subject, n=finding.value,
              source=source_text(finding))  # fmt: skip


def conflict_text(advice: Advice) -> str:
    parts = ", ".join(f"{model_label(m)}: {m.best.value}" for m in advice.speaking if m.best is not None)
    return tr("⚠ The models disagree ({parts}).", parts=parts)


def current_clip_skip(sel: Selection) -> int | None:
    """The N the first CLIP tower will use with ``sel`` (the host's own layer when Auto)."""
    if sel.clip_skip is not None:
        return sel.clip_skip
    host = runtime.adapter()
    if host is None or runtime.live_model() is None:
        return None
    try:
        plans = host.plans(sel)
    except Exception:
        return None
    return plans[0].skip if plans else None


def lines(advice: Advice, current: int | None, *, auto: bool) -> tuple[list[str], int | None]:
    """The panel's lines and the value its "Use N" button offers (None: no button).

    ``auto``: the tab's clip skip resolves to Auto (then the automatic mode, when on, takes the
    recommendation).
    """
    out: list[str] = []
    speaking = advice.speaking
    alone = len(advice.models) == 1 or (len(speaking) == 1 and speaking[0].kind == "lora"
                                        and sum(m.kind == "lora" for m in advice.models) == 1)  # fmt: skip
    for model in speaking:
        best = model.best
        assert best is not None
        line = finding_text(model, best, alone=alone)
        others = model.disagreeing()
        if others:
            line += " · " + tr("also: {others}", others=", ".join(f"{f.value} ({source_text(f)})" for f in others))
        out.append(line)
    notes = []
    for model in advice.off_family:
        family = FAMILY_LABELS.get(model.base or "", model.base or "")
        notes.append(tr("LoRA “{name}” was made for {family}: not counted here", name=model.name, family=family))
    if not out:
        return notes, None
    you_use = " · " + tr("you use {n}", n=current) if current is not None else ""
    if advice.conflict:
        out.append(conflict_text(advice) + " " + tr("Choose the clip skip yourself; Auto does not pick one.") + you_use)
        return out + notes, None
    offer = advice.value
    if auto and automatic():
        out.append(tr("Auto uses Clip skip {n} (Settings: Auto follows the recommendation).", n=offer))
        return out + notes, None
    out[-1] += you_use
    return out + notes, (offer if offer != current else None)


def for_panel(prompt: str, sel: Selection) -> tuple[list[str], int | None]:
    """The panel's lines for the tab's prompt and selection (the levels under the tab included)."""
    effective = runtime.effective_for_display(sel)
    return lines(advice_for([prompt]), current_clip_skip(effective), auto=effective.clip_skip is None)


def explanation() -> str:
    """The feature's one explanation, with the state of its two settings."""
    on, off = tr("on"), tr("off")
    return tr(
        "Per model: a clip skip you used with a model counts first, then its card, its file, its sample images. "
        "Remembering: {memory} · Auto follows them: {automatic} (Settings › CLIP Skip & Text Encoders)",
        memory=on if memory.enabled() else off,
        automatic=on if automatic() else off,
    )


def use_label(n: int) -> str:
    return tr("Use {n}", n=n)


def payload(advice: Advice) -> dict[str, Any]:
    """The API's form of an :class:`Advice`."""

    def model(m: ModelAdvice) -> dict[str, Any]:
        return {
            "kind": m.kind,
            "name": m.name,
            "base": m.base,
            "clip_skip": m.best.value if m.best else None,
            "findings": [{"source": f.source, "value": f.value, "detail": f.detail} for f in m.findings],
        }

    return {
        "clip_skip": advice.value,
        "conflict": advice.conflict,
        "family": advice.family,
        "automatic": automatic(),
        "models": [model(m) for m in advice.models],
        "other_family": [model(m) for m in advice.off_family],
    }
