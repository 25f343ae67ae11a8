"""What A1111 and Forge share as descendants of stable-diffusion-webui (``modules.*``).

* ``modules.patches``: the registry every class-level patch goes through (:class:`HostAdapter`
  installs an adapter's ``patch_targets()`` with it), so a re-imported adapter replaces what an
  earlier one left instead of wrapping it.
* the class-level cond caches of ``modules.processing``, emptied after a swap.
* the pooled vector the WebUIs carry as a ``pooled`` attribute of the cond tensor.

Only functions import ``modules``, so this module imports anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# (owner, attribute, make): ``make(original)`` returns the replacement for ``owner.attribute``
PatchTarget = tuple[Any, str, Callable[[Callable[..., Any]], Callable[..., Any]]]
# class name -> the cond-cache lists it holds (instances alias them, so they are emptied in place)
COND_CACHES = (
    ("StableDiffusionProcessing", ("cached_c", "cached_uc")),
    ("StableDiffusionProcessingTxt2Img", ("cached_hr_c", "cached_hr_uc")),
)


def install_patches(key: str, targets: list[PatchTarget]) -> list[tuple[Any, str]]:
    """Patch every target under ``key``; a patch an earlier import left under the same key is undone
    first, so ours wraps the host's own function. Returns what was patched (for :func:`undo_patches`)."""
    from modules import patches

    done = []
    for owner, attribute, make in targets:
        if patches.original(key, owner, attribute) is not None:
            patches.undo(key, owner, attribute)
        patches.patch(key, owner, attribute, make(getattr(owner, attribute)))
        done.append((owner, attribute))
    return done


def undo_patches(key: str, patched: list[tuple[Any, str]]) -> None:
    from modules import patches

    for owner, attribute in reversed(patched):
        if patches.original(key, owner, attribute) is not None:
            patches.undo(key, owner, attribute)


def clear_cond_caches() -> None:
    """Empty the WebUI's cond caches in place (processing objects hold the same lists)."""
    try:
        from modules import processing
    except ImportError:
        return
    for class_name, names in COND_CACHES:
        cls = getattr(processing, class_name, None)
        for name in names:
            cache = vars(cls).get(name) if cls is not None else None
            if isinstance(cache, list):
                cache[:] = [None] * len(cache)


def cast_cond(z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``z`` in ``dtype``, its ``pooled`` vector too (the WebUIs hang it on the cond tensor)."""
    pooled = getattr(z, "pooled", None)
    z = z.to(dtype)
    if pooled is not None:
        z.pooled = pooled.to(dtype)
    return z
