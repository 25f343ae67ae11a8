"""Dequantisation speed: te_switch's pure-torch GGUF decoders vs gguf-py's numpy reference, and the
per-forward cost of keeping a Linear weight compressed (core.lowbit) vs a dense Linear.

    python benchmarks/bench_dequant.py [--device cuda] [--repeats 3] [--threads N]

The weight is a T5-XXL FFN matrix (10240 x 4096). Blocks are random (valid float16 scales): decode
time does not depend on the values, and random blocks are instant to make for every type. Timings
are the best of ``--repeats`` runs; the baseline is measured in the same run on the same bytes.
Torch uses one CPU thread unless ``--threads`` says otherwise (the baseline is single-threaded).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # tests/synth_gguf.py writes the blocks

from synth_gguf import random_blocks  # noqa: E402

from te_switch.core import (  # noqa: E402
    gguf_reader,  # noqa: F401  (registers the decoders)
    lowbit,
)
from te_switch.core.tensors import DEQUANTIZERS, PackedTensor  # noqa: E402

SHAPE = (10240, 4096)  # T5-XXL wi_0 / wi_1 (wo is the transpose)
QTYPES = ("Q8_0", "Q4_K", "Q5_K", "Q6_K")


def best_of(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up: allocator, kernels, lazy init
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_decoders(device: torch.device, repeats: int) -> None:
    import gguf

    print(f"dequantise {SHAPE[0]}x{SHAPE[1]} ({SHAPE[0] * SHAPE[1] / 1e6:.0f}M values)")
    print(f"{'type':6} {'gguf numpy':>11} {'torch fp32':>11} {'torch fp16':>11} {'speed-up':>9}  identical")
    shape = torch.Size(SHAPE)
    for qtype in QTYPES:
        data = random_blocks(qtype, SHAPE, seed=1)
        ggml_type = gguf.GGMLQuantizationType[qtype]
        raw = torch.from_numpy(data).to(device)
        decode = DEQUANTIZERS[qtype]
        baseline = best_of(lambda d=data, t=ggml_type: gguf.quants.dequantize(d, t), max(1, repeats - 1), device)
        ours32 = best_of(lambda r=raw, q=decode: q(r, shape, torch.float32), repeats, device)
        ours16 = best_of(lambda r=raw, q=decode: q(r, shape, torch.float16), repeats, device)
        same = torch.equal(
            decode(raw, shape, torch.float32).cpu(), torch.from_numpy(gguf.quants.dequantize(data, ggml_type))
        )
        print(f"{qtype:6} {baseline:10.3f}s {ours32:10.3f}s {ours16:10.3f}s {baseline / ours32:8.1f}x  {same}")


def bench_lowbit(device: torch.device, repeats: int) -> None:
    dtype = torch.float16 if device.type == "cuda" else torch.float32  # CPU half matmuls are not representative
    x = torch.randn(1, 256, SHAPE[1], device=device, dtype=dtype)
    dense = torch.nn.Linear(SHAPE[1], SHAPE[0], bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        t_dense = best_of(lambda: dense(x), repeats, device)
    print(f"\nLinear {SHAPE[1]}->{SHAPE[0]} forward on {tuple(x.shape)} {str(dtype).removeprefix('torch.')}")
    print(f"{'weight':8} {'forward':>9} {'vs dense':>9} {'expand cost':>12} {'weight bytes':>13}")
    print(f"{'dense':8} {t_dense * 1e3:7.1f}ms {1.0:8.2f}x {0.0:10.1f}ms {dense.weight.nbytes / 2**20:10.1f}MiB")
    for qtype in (*QTYPES[:2], "fp8"):
        if qtype == "fp8":
            weight: PackedTensor | torch.Tensor = torch.randn(SHAPE, device=device).to(torch.float8_e4m3fn)
        else:
            raw = torch.from_numpy(random_blocks(qtype, SHAPE, seed=2)).to(device)
            weight = PackedTensor(qtype, raw, torch.Size(SHAPE))
        module = torch.nn.Linear(SHAPE[1], SHAPE[0], bias=False, device="meta", dtype=dtype)
        lowbit.attach(module, weight, dtype=dtype)
        with torch.no_grad():
            t = best_of(lambda m=module: m(x), repeats, device)
            ref = F.linear(x, lowbit.packed_weight(module).dequantize(dtype, device))
            assert torch.equal(module(x), ref)
        size = lowbit.compressed_bytes(module) / 2**20
        print(f"{qtype:8} {t * 1e3:7.1f}ms {t / t_dense:8.2f}x {(t - t_dense) * 1e3:10.1f}ms {size:10.1f}MiB")
        lowbit.detach(module)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    # one thread by default: gguf-py's numpy baseline is single-threaded, and on a shared machine
    # torch's multi-threaded kernels stall on every per-op barrier (minutes instead of seconds)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU threads\n")
    bench_decoders(device, args.repeats)
    bench_lowbit(device, args.repeats)


if __name__ == "__main__":
    main()
