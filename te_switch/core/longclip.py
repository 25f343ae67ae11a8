"""Long-CLIP position tables (Zhang et al., 2024): 248 positions, 246-token chunks.

Long-CLIP keeps the first 20 positions of CLIP's 77 and interpolates the rest ×4 — the
"knowledge-preserving stretch". The same stretch aligns SDXL's CLIP-G with a Long-CLIP-L so both
towers see the same 248-token chunks.
"""

from __future__ import annotations

import torch

LONG_POSITIONS = 248
SHORT_POSITIONS = 77
KEEP = 20  # positions copied unchanged
FACTOR = 4  # 77 -> 20 + 4 * (77 - 20 - 1) + 4 = 248


def chunk_length(positions: int) -> int:
    """Prompt tokens per chunk for a tower with ``positions`` positions (BOS and EOS take two)."""
    return positions - 2


def effective_table(pe: torch.Tensor, pe_res: torch.Tensor) -> torch.Tensor:
    """Original Long-CLIP files: rows < 20 come from ``positional_embedding``, the rest from ``_res``."""
    return torch.cat([pe[:KEEP], pe_res[KEEP:]], dim=0)


def stretch_positions(pe: torch.Tensor, keep: int = KEEP) -> torch.Tensor:
    """77 → 248 rows exactly as Long-CLIP's ``load_from_clip`` / SDXL ``kps`` computes them.

    Rows < keep are copied; each later gap i gets the row itself and three interpolations
    ``(k·a)/4 + ((4-k)·b)/4``; the last four rows extrapolate from the final two positions.
    Arithmetic follows the reference's operation order (in fp32), so results match it exactly.
    """
    length, dim = pe.shape
    pre = pe.to(torch.float32)
    a = pre[keep : length - 1]  # pre[i + keep] for i in 0 .. length-keep-2
    b = pre[keep + 1 : length]  # pre[i + 1 + keep]
    gaps = torch.stack([a, (3 * a) / 4 + (1 * b) / 4, (2 * a) / 4 + (2 * b) / 4, (1 * a) / 4 + (3 * b) / 4], dim=1)
    last, before = pre[length - 1], pre[length - 2]
    tail = torch.stack([last + (j * (last - before)) / 4 for j in range(FACTOR)])
    out = torch.cat([pre[:keep], gaps.reshape(-1, dim), tail], dim=0)
    return out.to(pe.dtype)


def causal_mask(positions: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> torch.Tensor:
    """OpenCLIP's additive attention mask: -inf above the diagonal, 0 elsewhere."""
    mask = torch.full((positions, positions), float("-inf"), dtype=dtype, device=device)
    return mask.triu_(1)
