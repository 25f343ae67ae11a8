"""Computing an encode in a chosen dtype (a slot's explicit precision, DESIGN "Swap semantics").

fp32 must really compute in fp32: whatever autocast the host (or the user's code) wrapped around
the encode is switched off for the encode's devices. Every host uses this one context; a host that
casts layers by other means (A1111's ``devices.manual_cast``) lifts that on top of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def autocast_off(*devices: torch.device | str | None) -> Iterator[None]:
    """No autocast on the types of ``devices`` (and the CPU) inside the block.

    Device types without autocast support are skipped, so this never fails where a plain
    ``torch.autocast(..., enabled=False)`` would (older torch on MPS, custom backends).
    """
    types = {torch.device(d).type for d in devices if d is not None} | {"cpu"}
    with contextlib.ExitStack() as stack:
        for device_type in sorted(types):
            try:
                stack.enter_context(torch.autocast(device_type, enabled=False))
            except (RuntimeError, ValueError):
                continue
        yield
