"""What a text-encoder swap costs on a diffusers pipeline, against what it replaces.

    python benchmarks/bench_swap.py [--big] [--cycles 20] [--repeats 3] [--keep DIR]

Files come from the page cache (they were just written), as they would on a second use. Real
sizes, random weights: a CLIP-L (123M weights, files in fp16 as they are published) on an
SD1.5 pipeline whose UNet also has its real size (860M, zeros: load time does not depend on
values). ``--big`` swaps SDXL's CLIP-G (695M) instead, on an SDXL pipeline with a real CLIP-L and
CLIP-G and a tiny UNet (so its "re-load the pipeline" baseline is a lower bound).

Measured in one run, on the same files:

* **read**: merely reading the file's tensors into memory (its bytes, then ``safetensors.torch.load``:
  every byte is read, unlike a lazy mmap);
* **swap**: ``DiffusersAdapter.apply`` with the file: read, convert, check every key/shape/value,
  snapshot the built-in weights (first swap only), load in place;
* **swap B**: a second file while one is already swapped (no snapshot);
* **restore**: back to Built-in, bit for bit;
* **baseline**: re-loading the whole pipeline from disk (``from_pretrained``), what one does without
  TE Switch;
* **peak extra memory** during a swap (RSS sampled every 2 ms, and Python allocations via tracemalloc);
* **resident memory after N swap/restore cycles** (after ``malloc_trim``): must not grow.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import shutil
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from te_switch.core.selection import Selection, SlotChoice
from te_switch.hosts.diffusers import DiffusersAdapter
from te_switch.standalone.pipeline import load_pipeline
from te_switch.standalone.resolver import EncoderResolver

PAGE = os.sysconf("SC_PAGE_SIZE")
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "hidden_act": "quick_gelu", "projection_dim": 768}  # fmt: skip
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
          "hidden_act": "gelu", "projection_dim": 1280}  # fmt: skip
SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "attention_head_dim": 8, "cross_attention_dim": 768,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}  # fmt: skip


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def trim() -> None:
    """Give freed heap back to the OS, so RSS shows what is really held."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def peak_rss() -> Iterator[dict[str, int]]:
    """Sample RSS every 2 ms while the block runs: {'before', 'peak'} in bytes."""
    out = {"before": rss(), "peak": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            out["peak"] = max(out["peak"], rss())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["peak"] = max(out["peak"], rss())


def clip_weights(config: dict, seed: int, *, projection: bool) -> dict[str, torch.Tensor]:
    """A canonical (``text_model.*``) CLIP tower with random fp16 weights."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    full = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, **config)
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(full)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.state_dict().items():
        if "position_ids" in name or (name.startswith("text_projection") and not projection):
            continue
        noise = torch.randn(p.shape, generator=g)
        if "norm" in name:
            value = 1 + 0.1 * noise if name.endswith("weight") else 0.02 * noise
        else:
            value = noise * (0.02 if p.ndim < 2 or "embedding" in name else p.shape[1] ** -0.5)
        out[name] = value.half()
    return out


def write_pipeline(folder: str, big: bool) -> None:
    """A diffusers folder: real-size text encoder(s); the SD1.5 UNet at real size (zeros), or tiny for SDXL."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig

    from te_switch.standalone.tokenizers import write_clip_tokenizer

    def text_encoder(sub: str, config: dict, seed: int, cls: str, projection: bool) -> None:
        os.makedirs(os.path.join(folder, sub))
        cfg = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, **config)
        cfg.architectures = [cls]
        cfg.save_pretrained(os.path.join(folder, sub))
        weights = clip_weights(config, seed, projection=projection)
        if cls == "CLIPTextModel":
            weights = {k: v for k, v in weights.items() if not k.startswith("text_projection")}
        save_file(weights, os.path.join(folder, sub, "model.safetensors"))

    if big:
        unet_config = {**SD15_UNET, "block_out_channels": (32, 64), "layers_per_block": 1,
                       "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
                       "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "cross_attention_dim": 2048,
                       "attention_head_dim": 8, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                       "projection_class_embeddings_input_dim": 6 * 256 + 1280}  # fmt: skip
    else:
        unet_config = SD15_UNET
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    unet.to_empty(device="cpu")
    with torch.no_grad():
        for p in unet.parameters():
            p.zero_()
    unet.half().save_pretrained(os.path.join(folder, "unet"))
    del unet
    vae = AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4)  # fmt: skip
    vae.save_pretrained(os.path.join(folder, "vae"))
    EulerDiscreteScheduler().save_pretrained(os.path.join(folder, "scheduler"))
    write_clip_tokenizer(os.path.join(folder, "tokenizer"))
    index = {"_class_name": "StableDiffusionXLPipeline" if big else "StableDiffusionPipeline",
             "scheduler": ["diffusers", "EulerDiscreteScheduler"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder": ["transformers", "CLIPTextModel"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}  # fmt: skip
    text_encoder("text_encoder", CLIP_L, 1, "CLIPTextModel", False)
    if big:
        text_encoder("text_encoder_2", CLIP_G, 2, "CLIPTextModelWithProjection", True)
        write_clip_tokenizer(os.path.join(folder, "tokenizer_2"), pad_token="!")
        index.update(text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
                     tokenizer_2=["transformers", "CLIPTokenizer"], force_zeros_for_empty_prompt=True)  # fmt: skip
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big", action="store_true", help="swap SDXL's CLIP-G (695M) instead of CLIP-L")
    parser.add_argument("--cycles", type=int, default=20, help="swap/restore cycles for the memory check")
    parser.add_argument("--repeats", type=int, default=3, help="timings are the best of this many")
    parser.add_argument("--keep", help="build the files in this folder and keep them (default: a temp folder)")
    args = parser.parse_args(argv)

    folder = args.keep or tempfile.mkdtemp(prefix="te_switch_bench_swap_")
    os.makedirs(folder, exist_ok=True)
    slot, config, projection = ("clip_g", CLIP_G, True) if args.big else ("clip_l", CLIP_L, False)
    attr = "text_encoder_2" if args.big else "text_encoder"
    try:
        started = time.perf_counter()
        pipeline_dir = os.path.join(folder, "pipeline")
        if not os.path.isdir(pipeline_dir):
            write_pipeline(pipeline_dir, args.big)
        from safetensors.torch import load as load_bytes
        from safetensors.torch import save_file

        files = []
        for name, seed in (("a.safetensors", 11), ("b.safetensors", 12)):
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                save_file(clip_weights(config, seed, projection=projection), path)
            files.append(path)
        print(f"files ready in {time.perf_counter() - started:.1f} s ({folder})")

        torch.set_grad_enabled(False)

        def reload() -> object:
            return load_pipeline(pipeline_dir, dtype=torch.float32, device="cpu")

        pipe = reload()
        adapter = DiffusersAdapter(pipe, EncoderResolver())
        module = getattr(pipe, attr)
        params = sum(p.numel() for p in module.parameters())
        size = os.path.getsize(files[0])
        print(f"{slot}: {params / 1e6:.0f}M weights, file {size / 1e6:.0f} MB fp16, loaded as fp32; "
              f"{torch.get_num_threads()} threads, best of {args.repeats}")  # fmt: skip
        builtin = state(module)
        sel_a = Selection(slots={slot: SlotChoice(files[0])})
        sel_b = Selection(slots={slot: SlotChoice(files[1])})

        t_read, t_swap, t_swap_b, t_restore, t_reload = [], [], [], [], []
        peak = {"rss": 0, "py": 0}
        for _ in range(args.repeats):
            trim()
            t_read.append(timed(lambda: load_bytes(open(files[0], "rb").read())))  # noqa: SIM115
            trim()
            tracemalloc.start()
            with peak_rss() as mem:
                t_swap.append(timed(lambda: adapter.apply(sel_a)))
            peak["py"] = max(peak["py"], tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
            peak["rss"] = max(peak["rss"], mem["peak"] - mem["before"])
            t_swap_b.append(timed(lambda: adapter.apply(sel_b)))
            t_restore.append(timed(lambda: adapter.apply(Selection())))
        after = state(module)
        identical = builtin.keys() == after.keys() and all(torch.equal(builtin[k], after[k]) for k in builtin)
        del after
        for _ in range(min(args.repeats, 2)):  # the baseline is slow: two tries are plenty
            trim()
            t_reload.append(timed(reload))
            gc.collect()

        best = {k: min(v) for k, v in (("read", t_read), ("swap", t_swap), ("swap B", t_swap_b),
                                      ("restore", t_restore), ("re-load pipeline", t_reload))}  # fmt: skip
        print(f"\n{'operation':<18} {'best':>9} {'vs read':>8} {'vs re-load':>11}")
        for name, value in best.items():
            print(f"{name:<18} {value:>8.2f}s {value / best['read']:>7.1f}x {value / best['re-load pipeline']:>10.2f}x")
        print(f"restore bit-identical (values, dtypes, keys): {identical}")
        print(f"peak extra memory during a swap: RSS +{peak['rss'] / 1e6:.0f} MB "
              f"(file {size / 1e6:.0f} MB fp16, module {params * 4 / 1e6:.0f} MB fp32); "
              f"Python allocations {peak['py'] / 1e6:.1f} MB")  # fmt: skip

        adapter.apply(sel_a)
        adapter.apply(Selection())
        trim()
        first = rss()
        for i in range(args.cycles):
            adapter.apply(sel_a if i % 2 == 0 else sel_b)
            adapter.apply(Selection())
        trim()
        last = rss()
        print(f"resident memory after {args.cycles} swap/restore cycles: {last / 1e6:.0f} MB "
              f"(delta {(last - first) / 1e6:+.1f} MB vs after the first cycle)")  # fmt: skip
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
