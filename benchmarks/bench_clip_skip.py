"""Prompt-encode time for clip skip N: the truncated forward (LayerTap stops after the chosen block,
as the diffusers adapter and the WebUI hosts run it) vs the full forward with
``output_hidden_states=True`` (what diffusers and A1111 do).

    python benchmarks/bench_clip_skip.py [--positions 77|248] [--repeats 5] [--threads N] [--device cuda]

The encoder is a real-size CLIP-L (12 layers x 768, MLP 3072, 123M weights) with random weights;
one "encode" is the prompt and the negative prompt (batch 2), as a generation does. Both paths are
checked to give the same hidden states before they are timed. Timings are the best of
``--repeats``; the ratio is measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from te_switch.core.clip_skip import LayerTap, block_for_skip
from te_switch.hosts.slots import text_transformer

SKIPS = (1, 2, 6, 12)


def clip_l(positions: int, device: torch.device) -> torch.nn.Module:
    """A real-size CLIP-L text model with random weights (made on the meta device, then filled)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=positions, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )  # fmt: skip
    with torch.device("meta"):
        model = CLIPTextModel(config)
    model.to_empty(device=device)
    generator = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if "norm" in name:
                p.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.02 * noise)
            else:
                p.copy_(noise * (0.02 if p.ndim < 2 or "embedding" in name else p.shape[1] ** -0.5))
        emb = text_transformer(model).embeddings
        emb.position_ids = torch.arange(positions, device=device).expand((1, -1))
    return model.eval()


def truncated(model: torch.nn.Module, ids: torch.Tensor, skip: int) -> torch.Tensor:
    tt = text_transformer(model)
    blocks = tt.encoder.layers
    with LayerTap(blocks[block_for_skip(len(blocks), skip)], stop=True) as tap:
        model(ids)
    return tt.final_layer_norm(tap.output)


def full(model: torch.nn.Module, ids: torch.Tensor, skip: int) -> torch.Tensor:
    out = model(ids, output_hidden_states=True)
    return text_transformer(model).final_layer_norm(out.hidden_states[-skip])


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def best_pair(
    a: Callable[[], object], b: Callable[[], object], repeats: int, device: torch.device
) -> tuple[float, float]:
    """Best times of ``a`` and ``b``, run alternately so both see the same machine load."""
    a(), b()  # warm-up
    times_a, times_b = [], []
    for _ in range(repeats):
        times_a.append(timed(a, device))
        times_b.append(timed(b, device))
    return min(times_a), min(times_b)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, default=77, choices=(77, 248), help="77, or 248 for Long-CLIP")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = clip_l(args.positions, device)
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 49406, (2, args.positions), generator=torch.Generator().manual_seed(1)).to(device)
    print(
        f"CLIP-L {params / 1e6:.0f}M weights, batch 2 x {args.positions} tokens, {device}, "
        f"{torch.get_num_threads()} threads, best of {args.repeats}"
    )
    print(f"{'clip skip':>9} {'layers run':>10} {'truncated':>10} {'full':>10} {'full/truncated':>15}  same output")
    with torch.inference_mode():
        for skip in SKIPS:
            a, b = truncated(model, ids, skip), full(model, ids, skip)
            same = (a - b).abs().max().item()
            t_trunc, t_full = best_pair(
                lambda skip=skip: truncated(model, ids, skip),
                lambda skip=skip: full(model, ids, skip),
                args.repeats,
                device,
            )
            run = block_for_skip(12, skip) + 1
            print(
                f"{skip:>9} {run:>7}/12 {t_trunc * 1e3:>8.1f}ms {t_full * 1e3:>8.1f}ms {t_full / t_trunc:>14.2f}x"
                f"  max |diff| {same:.1e}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
