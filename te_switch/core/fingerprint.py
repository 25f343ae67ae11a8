"""Cheap facts about live tensors: a sampled fingerprint, and whether a tensor is a view of a mapped file.

A fingerprint hashes a tensor's shape, dtype and a fixed sample of its bytes: all of them for small
tensors, 32 evenly spaced windows of 256 bytes for the rest. It is computed where the tensor lives
(on a GPU only the sample crosses to the CPU) and reads a few pages of a memory-mapped file, so it is
cheap enough to take of every tensor of a slot before the first swap. What it proves: the same layout,
dtype and rounding (a transposed, mis-split or re-rounded tensor differs in every window) and the same
whole-tensor edits (a merged model, a baked-in LoRA); what it cannot see is an edit confined to bytes
between the windows (one changed token row).

``mapped_ranges`` reads ``/proc/self/maps`` (Linux): a CPU tensor whose storage lies in a file mapping is
a view of that file (safetensors, transformers and Forge load weights that way). Such storage is never
written into: copy-on-write would turn the page cache into anonymous memory, or, for a shared mapping,
write to the file. Elsewhere nothing counts as mapped.

``prefault`` asks the kernel to map a tensor's pages of a file in one call (Linux ≥ 5.14
``MADV_POPULATE_READ``) before a pass reads it: page-cache pages are wired into the page table in one
walk instead of one fault per 64 KB, and nothing is copied (the mapping stays page cache).
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import hashlib
import sys
from collections.abc import Iterator

import torch

WINDOWS = 32
WINDOW_BYTES = 256
WHOLE_BYTES = 1 << 16  # tensors up to this size are hashed whole


def _flat_indices(idx: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Row-major element numbers -> one index tensor per dimension (``torch.unravel_index`` needs torch 2.2)."""
    out = []
    for size in reversed(t.shape):
        out.append(idx % size)
        idx = idx // size
    return tuple(reversed(out))


def sample(t: torch.Tensor) -> torch.Tensor:
    """The sampled elements of ``t`` (contiguous, on ``t``'s device); any view or layout works."""
    n = t.numel()
    width = max(1, WINDOW_BYTES // max(1, t.element_size()))
    if n * t.element_size() <= WHOLE_BYTES or n <= WINDOWS * width:
        return t.reshape(-1).contiguous() if t.dim() else t.reshape(1)
    starts = torch.linspace(0, n - width, WINDOWS, dtype=torch.float64).long()
    idx = (starts[:, None] + torch.arange(width)).reshape(-1).to(t.device)
    if t.is_contiguous():
        return t.reshape(-1).index_select(0, idx)
    return t[_flat_indices(idx, t)]


def fingerprint(t: torch.Tensor) -> bytes:
    """16 bytes that change with the shape, the dtype and the sampled bytes of ``t``."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(t.shape), str(t.dtype))).encode())
    if t.numel():
        with torch.no_grad(), _pages_only(t):
            data = sample(t.detach()).cpu().contiguous()
        h.update(data.view(torch.uint8).numpy().tobytes() if data.dtype != torch.uint8 else data.numpy().tobytes())
    return h.digest()


@contextlib.contextmanager
def _pages_only(t: torch.Tensor) -> Iterator[None]:
    """While sampling a CPU tensor: no read-around. A page fault on a mapped file otherwise reads the
    device's read-ahead window around it (8 MB on some disks): 32 windows of a cold 80 MB tensor then
    read all of it from the disk instead of 32 pages."""
    size = t.numel() * t.element_size()
    if _madvise is None or t.device.type != "cpu" or size <= WHOLE_BYTES:
        yield
        return
    start = t.data_ptr()
    length = start + size - (start - start % PAGE)
    start -= start % PAGE
    random = _madvise(start, length, MADV_RANDOM) == 0
    try:
        yield
    finally:
        if random:
            _madvise(start, length, MADV_NORMAL)


def mapped_ranges() -> list[tuple[int, int]]:
    """Sorted (start, end) address ranges of this process's file mappings (empty where unknown)."""
    out = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].startswith("/"):
                    lo, hi = parts[0].split("-")
                    out.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    out.sort()
    return out


def is_mapped(t: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    """True when ``t``'s storage lies in one of ``ranges`` (a CPU view of a memory-mapped file)."""
    if t.device.type != "cpu" or not ranges:
        return False
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return False
    i = bisect.bisect_right(ranges, (ptr, float("inf"))) - 1
    return i >= 0 and ranges[i][0] <= ptr < ranges[i][1]


MADV_NORMAL, MADV_RANDOM, MADV_POPULATE_READ = 0, 1, 22
PAGE = 4096
_madvise = None
_populate = True  # MADV_POPULATE_READ: False once the kernel says it does not know it
if sys.platform == "linux":
    try:
        _madvise = ctypes.CDLL(None, use_errno=True).madvise
        _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    except (OSError, AttributeError):
        _madvise = None


def prefault(t: torch.Tensor) -> None:
    """Map the pages under ``t`` (a CPU view of a mapped file) before it is read; a no-op elsewhere."""
    global _populate
    if _madvise is None or not _populate or t.device.type != "cpu" or t.numel() * t.element_size() < 16 * PAGE:
        return
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    start -= start % PAGE
    if _madvise(start, end - start, MADV_POPULATE_READ) != 0 and ctypes.get_errno() in (22, 38):
        _populate = False  # EINVAL/ENOSYS: an older kernel, or not a file mapping; stop asking
