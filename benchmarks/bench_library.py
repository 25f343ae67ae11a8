"""Scan a folder of 200 encoder files: cold (headers parsed) and warm (cached) against plain ``stat``.

Files carry real-size headers (CLIP-L, CLIP-G, T5-XXL, whole SDXL checkpoints...) but are sparse, so
the folder takes almost no disk. The scan never reads tensor data, which is the point being measured.

    python benchmarks/bench_library.py [--files 200] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import tempfile
import time

from te_switch.core.library import EncoderLibrary

SIZES = {"F16": 2, "F32": 4, "BF16": 2}


def clip_keys(prefix: str, width: int, layers: int, positions: int, ff: int, projection: bool) -> dict:
    shapes = {
        f"{prefix}text_model.embeddings.token_embedding.weight": [49408, width],
        f"{prefix}text_model.embeddings.position_embedding.weight": [positions, width],
        f"{prefix}text_model.final_layer_norm.weight": [width],
        f"{prefix}text_model.final_layer_norm.bias": [width],
    }
    for i in range(layers):
        h = f"{prefix}text_model.encoder.layers.{i}."
        for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{h}self_attn.{p}.weight"] = [width, width]
            shapes[f"{h}self_attn.{p}.bias"] = [width]
        for ln in ("layer_norm1", "layer_norm2"):
            shapes[f"{h}{ln}.weight"] = [width]
            shapes[f"{h}{ln}.bias"] = [width]
        shapes[f"{h}mlp.fc1.weight"] = [ff, width]
        shapes[f"{h}mlp.fc1.bias"] = [ff]
        shapes[f"{h}mlp.fc2.weight"] = [width, ff]
        shapes[f"{h}mlp.fc2.bias"] = [width]
    if projection:
        shapes[f"{prefix}text_projection.weight"] = [width, width]
    return shapes


def t5_keys(d_model: int = 4096, blocks: int = 24, ff: int = 10240) -> dict:
    shapes = {"shared.weight": [32128, d_model], "encoder.final_layer_norm.weight": [d_model]}
    for i in range(blocks):
        h = f"encoder.block.{i}.layer."
        for p in "qkv":
            shapes[f"{h}0.SelfAttention.{p}.weight"] = [d_model, d_model]
        shapes[f"{h}0.SelfAttention.o.weight"] = [d_model, d_model]
        if i == 0:
            shapes[f"{h}0.SelfAttention.relative_attention_bias.weight"] = [32, 64]
        shapes[f"{h}0.layer_norm.weight"] = [d_model]
        shapes[f"{h}1.DenseReluDense.wi_0.weight"] = [ff, d_model]
        shapes[f"{h}1.DenseReluDense.wi_1.weight"] = [ff, d_model]
        shapes[f"{h}1.DenseReluDense.wo.weight"] = [d_model, ff]
        shapes[f"{h}1.layer_norm.weight"] = [d_model]
    return shapes


def sdxl_checkpoint_keys() -> dict:
    shapes = clip_keys("conditioner.embedders.0.transformer.", 768, 12, 77, 3072, False)
    g = clip_keys("", 1280, 32, 77, 5120, True)
    for k, v in g.items():  # stored in OpenCLIP layout in real checkpoints; HF names are enough for a header
        shapes["conditioner.embedders.1.model." + k] = v
    for i in range(700):  # a UNet's worth of extra keys for the header parser to skip
        shapes[f"model.diffusion_model.input_blocks.{i}.0.weight"] = [320, 320]
    return shapes


def write_sparse_safetensors(path: str, shapes: dict, dtype: str = "F16") -> None:
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = SIZES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)  # sparse: the data never touches the disk


def make_folder(folder: str, count: int) -> None:
    makers = [
        ("clip_l", lambda: clip_keys("", 768, 12, 77, 3072, False)),
        ("long_clip_l", lambda: clip_keys("", 768, 12, 248, 3072, True)),
        ("clip_g", lambda: clip_keys("", 1280, 32, 77, 5120, True)),
        ("t5xxl", t5_keys),
        ("sdxl_checkpoint", sdxl_checkpoint_keys),
    ]
    headers = {name: make() for name, make in makers}
    for i in range(count):
        name, _ = makers[i % len(makers)]
        sub = os.path.join(folder, f"group{i % 7}")
        os.makedirs(sub, exist_ok=True)
        write_sparse_safetensors(os.path.join(sub, f"{name}_{i:03d}.safetensors"), headers[name])


def timed(fn, repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "CLIP")
        make_folder(folder, args.files)
        paths = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
        apparent = sum(os.path.getsize(p) for p in paths) / 1e9

        def stat_all() -> None:
            for p in paths:
                os.stat(p)

        cache = os.path.join(tmp, "cache.json")

        def cold() -> None:
            if os.path.exists(cache):
                os.remove(cache)
            EncoderLibrary([folder], cache_file=cache).scan()

        lib = EncoderLibrary([folder], cache_file=cache)
        lib.scan()

        def warm_same_process() -> None:
            lib.scan()

        def warm_from_cache_file() -> None:
            EncoderLibrary([folder], cache_file=cache).scan()

        t_stat = timed(stat_all, args.repeat)
        t_cold = timed(cold, args.repeat)
        EncoderLibrary([folder], cache_file=cache).scan()  # leave a cache file for the next two
        t_warm = timed(warm_same_process, args.repeat)
        t_file = timed(warm_from_cache_file, args.repeat)
        kinds = sorted({t.kind or "?" for f in lib.files for t in f.towers})
        print(f"{len(paths)} files, {apparent:.0f} GB apparent size (sparse), kinds: {', '.join(kinds)}")
        print(f"{'stat only (baseline)':32s} {t_stat * 1e3:9.2f} ms   1.0x")
        for label, t in (
            ("cold scan (headers parsed)", t_cold),
            ("warm scan (in-memory cache)", t_warm),
            ("warm scan (from cache file)", t_file),
        ):
            print(f"{label:32s} {t * 1e3:9.2f} ms {t / t_stat:6.1f}x   ({t / len(paths) * 1e3:.3f} ms/file)")


if __name__ == "__main__":
    main()
