"""What a text-encoder swap and Built-in cost, against a raw read of the same file, at real shapes.

    python benchmarks/bench_swap.py [--t5 fp16|fp8] [--t5-blocks N] [--file PATH] [--threads N]
                                    [--case gmp|gguf|fp8-clip] [--precision auto|fp32|bf16|fp16]
                                    [--cycles 20] [--repeats 3] [--cold] [--dir DIR]

Default: a real-shape CLIP-L (123M weights, fp16 file of 246 MB) into the CLIP-L slot of an SD1.5
checkpoint's text encoder (a transformers ``CLIPTextModel`` at fp16, loaded from the checkpoint the way
A1111 loads one: copied into its own parameters). ``--t5 fp16|fp8``: a real-shape T5-XXL encoder
(d_model 4096, d_ff 10240, 64 heads; 24 blocks, or ``--t5-blocks N`` for a cut-down depth) into a T5
slot already holding the checkpoint's T5 at fp16; fp8 is e4m3fn, kept packed at Auto. Files are
written sparsely in ``--dir`` (default: a temporary folder, deleted afterwards) with random values in
the first rows of every tensor. ``--file PATH``: swap in that file instead (a real T5-XXL or CLIP-L;
its depth sets the checkpoint's). Run the real-size T5 under ``flock /work/rigs/.heavy.lock``.
``--case``: a file that needs converting on its way in — ``gmp``: a real-shape CLIP-GmP training
checkpoint in OpenAI layout (fp32, ``r``/``theta`` per MLP Linear, fused ``in_proj``) into the SD1.5
CLIP-L slot; ``gguf``: a T5-XXL GGUF (Q8_0 matrices, real width, ``--t5-blocks`` deep) into the T5
slot; ``fp8-clip``: a CLIP-L stored e4m3fn. ``--precision``: the slot's precision for the swap (with
``gguf`` or ``fp8-clip``, anything but Auto expands the weights instead of keeping them packed).
``--threads N``: torch's intra-op threads for the whole run (on a shared, oversubscribed machine one
thread avoids OpenMP stalls that say nothing about the engine; the baseline uses none either way).

Measured in one run. ``warm``: the file was read once just before (page cache warm); ``cold`` (with
``--file``, or ``--cold``): it was evicted from the page cache just before (``posix_fadvise``
DONTNEED), so it comes from the disk — what a first swap of a big file costs where it does not stay
in the page cache:

* **raw read**: every tensor of the file read into freshly allocated memory (``readinto``): what any
  loader pays at least to have the file in RAM — the baseline, one per cache state; **read+decode**
  (``--case gguf|fp8-clip`` at a precision): every tensor read and expanded to that precision by another
  decoder (gguf-py's numpy dequantiser, torch's cast) — the least a converting load pays; **disk read
  (cold)**: every byte through one reused buffer (the disk alone, nothing materialised);
* **swap**: ``SwapEngine.apply`` with the file on first use: open, map, check every key/shape/value
  (reading each tensor once), start its sha256 beside (``core.digest``), fingerprint the slot and
  prove its source (first swap only), stream the file in; the steps line says where the time and
  the disk reads went; **sha256 ready**: from the start of the swap until the file's hash (the
  infotext's short hash) is known; **restore**: Built-in from the checkpoint, proven against the
  fingerprint, against **raw read, checkpoint**: the checkpoint's tensors read into fresh memory, warm,
  just before each restore (the same memory state) where that fits, else before the slot is loaded;
* **from disk**: bytes the process (every thread) had fetched from storage (``/proc/self/io``
  read_bytes) during the operation, as multiples of the file: 1.00× is one read, 2.00× two;
* **peak extra anonymous memory**: ``RssAnon`` (/proc/self/status) sampled every 2 ms during the
  operation, minus the larger of before/after, as a share of the file size;
* **cycles**: ``RssAnon`` after N swap/restore cycles against after the first one (must not grow).

``--min-available-gb`` (default 1.5): the run exits when the machine's MemAvailable drops below it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import shutil
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from te_switch.core import digest
from te_switch.core.detect import inspect_path
from te_switch.core.readers import open_file
from te_switch.core.selection import SlotChoice
from te_switch.core.tensors import PRECISIONS, SAFETENSORS_DTYPES
from te_switch.hosts import engine as engine_mod
from te_switch.hosts.engine import BuiltinSource, EncoderSource, SlotRequest, SwapEngine
from te_switch.hosts.slots import hf_clip_slot, t5_slot

CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "hidden_act": "quick_gelu", "projection_dim": 768, "vocab_size": 49408, "max_position_embeddings": 77}  # fmt: skip
T5_XXL = {"d_model": 4096, "d_ff": 10240, "num_heads": 64, "d_kv": 64, "vocab_size": 32128,
          "feed_forward_proj": "gated-gelu", "is_gated_act": True, "dense_act_fn": "gelu_new"}  # fmt: skip
SAFETENSORS_NAMES = {torch.float16: "F16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3"}


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def disk_bytes(this_thread: bool = False) -> int:
    """Bytes this process (every thread, or only the calling one) has had fetched from storage: page-cache
    misses, not cache hits."""
    where = f"/proc/self/task/{threading.get_native_id()}/io" if this_thread else "/proc/self/io"
    with open(where) as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    return 0


def available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def guard(min_available: int) -> None:
    """Exit the whole process, loudly, before the machine runs out of memory (a real-size T5 is most of it)."""

    def watch() -> None:
        while True:
            if available() < min_available:
                print(f"MemAvailable below {min_available / 1e9:.1f} GB: benchmark aborted", flush=True)
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


def evict(path: str) -> None:
    """Drop ``path``'s pages from the page cache (the next read comes from the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: str) -> None:
    """Read ``path`` once through a small reused buffer: its pages cached, no memory of ours kept."""
    buf = bytearray(8 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def disk_read(path: str) -> float:
    """Every byte of ``path`` through a reused buffer: the disk's (or the page cache's) speed alone."""
    started = time.perf_counter()
    warm(path)
    return time.perf_counter() - started


def cached_share(path: str) -> float:
    """The share of ``path``'s pages in the page cache now (``mincore``)."""
    import mmap

    size = os.path.getsize(path)
    page = mmap.PAGESIZE
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mm:
        pages = (size + page - 1) // page
        vec = (ctypes.c_ubyte * pages)()
        address = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
        ok = libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vec) == 0
        return int((torch.frombuffer(vec, dtype=torch.uint8) & 1).sum()) / pages if ok else float("nan")


def trim() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def peak_anon() -> Iterator[dict[str, int]]:
    """RssAnon sampled every 2 ms while the block runs: {'before', 'peak', 'after'}."""
    out = {"before": rss_anon(), "peak": 0, "after": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            out["peak"] = max(out["peak"], rss_anon())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["after"] = rss_anon()
        out["peak"] = max(out["peak"], out["after"])


def write_sparse(path: str, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], seed: int) -> None:
    """A safetensors file of these shapes; the first rows of each tensor random, the rest left sparse (zeros)."""
    header, offset = {}, 0
    for name, (shape, dtype) in shapes.items():
        n = 1
        for d in shape:
            n *= d
        size = n * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": SAFETENSORS_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        start = f.tell()
        for name, (_shape, dtype) in shapes.items():
            begin = header[name]["data_offsets"][0]
            head = min(4096, header[name]["data_offsets"][1] - begin) // torch.empty((), dtype=dtype).element_size()
            values = (torch.randn(head, generator=g) * 0.02).to(dtype)
            f.seek(start + begin)
            f.write(values.view(torch.uint8).numpy().tobytes())
        f.truncate(start + offset)


def clip_shapes(prefix: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**CLIP_L))
    keys = {k: v for k, v in model.state_dict().items() if "position_ids" not in k}
    return {
        prefix + ("text_model." + k if not k.startswith("text_model.") else k): (tuple(v.shape), torch.float16)
        for k, v in keys.items()
    }


def t5_shapes(blocks: int, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    c = T5_XXL
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"shared.weight": ((c["vocab_size"], c["d_model"]), dtype)}
    inner = c["num_heads"] * c["d_kv"]
    for i in range(blocks):
        h = f"encoder.block.{i}.layer."
        for p in "qkv":
            out[f"{h}0.SelfAttention.{p}.weight"] = ((inner, c["d_model"]), dtype)
        out[f"{h}0.SelfAttention.o.weight"] = ((c["d_model"], inner), dtype)
        if i == 0:
            out[f"{h}0.SelfAttention.relative_attention_bias.weight"] = ((32, c["num_heads"]), torch.float32)
        out[f"{h}0.layer_norm.weight"] = ((c["d_model"],), torch.float32)
        out[f"{h}1.DenseReluDense.wi_0.weight"] = ((c["d_ff"], c["d_model"]), dtype)
        out[f"{h}1.DenseReluDense.wi_1.weight"] = ((c["d_ff"], c["d_model"]), dtype)
        out[f"{h}1.DenseReluDense.wo.weight"] = ((c["d_model"], c["d_ff"]), dtype)
        out[f"{h}1.layer_norm.weight"] = ((c["d_model"],), torch.float32)
    out["encoder.final_layer_norm.weight"] = ((c["d_model"],), torch.float32)
    return out


def gmp_openai_shapes() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """A CLIP-GmP training checkpoint's text tower (zer0int): OpenAI names, fused in_proj, r/theta, fp32."""
    c, f32 = CLIP_L, torch.float32
    width, ff = c["hidden_size"], c["intermediate_size"]
    out = {"token_embedding.weight": ((c["vocab_size"], width), f32),
           "positional_embedding": ((c["max_position_embeddings"], width), f32),
           "text_projection": ((width, c["projection_dim"]), f32)}  # fmt: skip
    for i in range(c["num_hidden_layers"]):
        b = f"transformer.resblocks.{i}."
        out[f"{b}attn.in_proj_weight"] = ((3 * width, width), f32)
        out[f"{b}attn.in_proj_bias"] = ((3 * width,), f32)
        out[f"{b}attn.out_proj.weight"] = ((width, width), f32)
        for name in ("attn.out_proj.bias", "ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias"):
            out[b + name] = ((width,), f32)
        for name, (o, i_) in (("c_fc", (ff, width)), ("c_proj", (width, ff))):
            out[f"{b}mlp.{name}.r"] = ((o, 1), f32)
            out[f"{b}mlp.{name}.theta"] = ((o, i_), f32)
            out[f"{b}mlp.{name}.bias"] = ((o,), f32)
    out["ln_final.weight"] = out["ln_final.bias"] = ((width,), f32)
    return out


def write_sparse_gguf_t5(path: str, blocks: int) -> None:
    """A T5-XXL GGUF (llama.cpp names, Q8_0 matrices, F16 relative bias, F32 norms); data a sparse hole."""
    import gguf
    import numpy as np

    from te_switch.core.layouts import GGUF_T5_BLOCK, GGUF_T5_TOP

    top = {v: k for k, v in GGUF_T5_TOP.items()}
    block = {v: k for k, v in GGUF_T5_BLOCK.items()}
    writer = gguf.GGUFWriter(path, "t5encoder")
    total = 0
    for name, (shape, _dtype) in t5_shapes(blocks, torch.float16).items():
        if name in top:
            gname = top[name]
        else:
            i, rest = name[len("encoder.block.") :].split(".", 1)
            gname = f"enc.blk.{i}.{block[rest]}"
        qtype = "F32" if len(shape) == 1 else "F16" if "attn_rel_b" in gname else "Q8_0"
        qt = gguf.GGMLQuantizationType[qtype]
        per_block, size = gguf.GGML_QUANT_SIZES[qt]
        nbytes = shape[0] * (shape[1] if len(shape) > 1 else 1) // per_block * size
        writer.add_tensor_info(gname, shape, np.dtype(np.float32), nbytes, raw_dtype=qt)
        total += gguf.GGUFWriter.ggml_pad(nbytes, writer.data_alignment)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]
    writer.write_padding(fout, fout.tell())
    start = fout.tell()
    writer.close()
    with open(path, "r+b") as f:
        f.truncate(start + total)


def tensor_spans(path: str) -> list[tuple[int, int]]:
    """Absolute (begin, end) byte spans of every tensor of a safetensors or GGUF file."""
    with open_file(path) as src:
        if src.format == "gguf":
            return [(e.offset, e.offset + e.nbytes) for e in src._entries.values()]
        return [src.span(k) for k in src.keys()]  # noqa: SIM118


def raw_read(path: str) -> float:
    """Every tensor into fresh memory with plain reads: the baseline."""
    started = time.perf_counter()
    spans = tensor_spans(path)
    held = []
    with open(path, "rb", buffering=0) as f:
        for begin, end in spans:
            buf = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(begin)
            f.readinto(memoryview(buf.numpy()))
            held.append(buf)
    elapsed = time.perf_counter() - started
    del held
    trim()
    return elapsed


def read_decode(path: str, dtype: torch.dtype) -> float:
    """Every tensor read and decoded to ``dtype`` into fresh memory by an independent decoder (gguf-py's
    numpy dequantiser for GGUF, torch's cast for a safetensors file): the baseline for a swap that has to
    convert what it reads."""
    started = time.perf_counter()
    held = []
    if path.endswith(".gguf"):
        import gguf

        for t in gguf.GGUFReader(path).tensors:
            values = gguf.quants.dequantize(t.data, t.tensor_type)
            held.append(torch.from_numpy(values if values.flags.writeable else values.copy()).to(dtype))
    else:
        with open_file(path) as src, open(path, "rb", buffering=0) as f:
            for key in src.keys():  # noqa: SIM118
                begin, end = src.span(key)
                buf = torch.empty(end - begin, dtype=torch.uint8)
                f.seek(begin)
                f.readinto(memoryview(buf.numpy()))
                held.append(buf.view(SAFETENSORS_DTYPES[src.info(key).dtype]).to(dtype))
    elapsed = time.perf_counter() - started
    del held
    trim()
    return elapsed


@dataclass
class Measure:
    seconds: float
    peak: int = 0  # peak extra RssAnon over the larger of before/after
    kept: int = 0  # RssAnon after − before
    disk: int = 0  # bytes fetched from storage (page-cache misses, every thread of the process)


def measured(fn: Callable[[], object], memory: bool = True) -> Measure:
    trim()
    read = disk_bytes()
    if not memory:
        started = time.perf_counter()
        fn()
        return Measure(time.perf_counter() - started, disk=disk_bytes() - read)
    with peak_anon() as mem:
        started = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - started
    return Measure(
        elapsed, mem["peak"] - max(mem["before"], mem["after"]), mem["after"] - mem["before"], disk_bytes() - read
    )


STEP_NAMES = {"prepare": "check+hash", "_remember": "fingerprint", "_load": "copy in", "_put_back": "read back"}


class Steps:
    """Seconds and disk bytes per engine step of an operation (wrapped around the engine instance's methods)."""

    def __init__(self, engine: SwapEngine) -> None:
        self.spent: dict[str, list[float]] = {}
        for name in STEP_NAMES:
            setattr(engine, name, self._timed(name, getattr(engine, name)))

    def _timed(self, name: str, method: Callable) -> Callable:
        def run(*args: object, **kwargs: object) -> object:
            started, read, mine = time.perf_counter(), disk_bytes(), disk_bytes(this_thread=True)
            try:
                return method(*args, **kwargs)
            finally:
                entry = self.spent.setdefault(name, [0.0, 0.0, 0.0])
                entry[0] += time.perf_counter() - started
                entry[1] += disk_bytes() - read
                entry[2] += disk_bytes(this_thread=True) - mine

        return run

    def take(self, size: int) -> str:
        out = ", ".join(
            f"{STEP_NAMES[n]} {t:.2f}s/{d / size:.2f}× file from disk ({m / size:.2f}× by the engine's thread)"
            for n, (t, d, m) in self.spent.items()
            if t > 0.005
        )
        self.spent = {}
        return out


def build_slot(kind: str, ckpt: str, blocks: int) -> tuple[object, BuiltinSource]:
    """The slot's module loaded from the checkpoint at fp16 (copied in, as A1111 does) and its source."""
    from safetensors import safe_open

    if kind == "clip":
        from transformers import CLIPTextConfig, CLIPTextModel

        with torch.device("meta"):
            model = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        model = model.half().to_empty(device="cpu")  # fp16 from the start: no fp32 model on the way
        prefix = "cond_stage_model.transformer."
        slot = hf_clip_slot("clip_l", model)
    else:
        from transformers import T5Config, T5EncoderModel

        with torch.device("meta"):
            model = T5EncoderModel(T5Config(num_layers=blocks, **T5_XXL))
        model = model.half().to_empty(device="cpu")
        prefix = ""
        slot = t5_slot("t5xxl", model)
    live = slot.live_tensors()
    with safe_open(ckpt, framework="pt") as f, torch.no_grad():
        for key in f.keys():  # noqa: SIM118
            name = key[len(prefix) :] if key.startswith(prefix) else key
            target = live.get(name, live.get(name.replace("text_model.", "", 1)))
            if target is not None:
                target.copy_(f.get_tensor(key))
        if kind == "t5":
            model.encoder.embed_tokens.weight = model.shared.weight  # tied, as from_pretrained leaves it
        ids = live.get("text_model.embeddings.position_ids", live.get("embeddings.position_ids"))
        if ids is not None:
            ids.copy_(torch.arange(ids.shape[-1]))
    tower = next(t for t in inspect_path(ckpt) if t.family)
    return slot, BuiltinSource(ckpt, tower)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--t5", choices=("fp16", "fp8"), help="a T5-XXL file of this dtype into a T5 slot")
    parser.add_argument("--t5-blocks", type=int, default=24, help="T5 depth (24 = real T5-XXL)")
    parser.add_argument("--file", help="swap in this file (a real T5-XXL / CLIP-L) instead of a generated one")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--case", choices=("gmp", "gguf", "fp8-clip"), help="a file that needs converting")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--cold",
        action="store_true",
        help="also time each step with the file evicted from the page cache (default with --file)",
    )
    parser.add_argument("--min-available-gb", type=float, default=1.5, help="abort when MemAvailable drops below this")
    parser.add_argument("--dir", help="where to write the files (default: a temporary folder, deleted)")
    args = parser.parse_args(argv)
    guard(int(args.min_available_gb * 1e9))
    folder = args.dir or tempfile.mkdtemp(prefix="te_switch_bench_swap_")
    os.makedirs(folder, exist_ok=True)
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    given = inspect_path(args.file)[0] if args.file else None
    if given is not None and given.family == "t5":
        args.t5, args.t5_blocks = args.t5 or "fp16", given.layers
    if args.case == "gguf":
        args.t5 = "fp16"  # the checkpoint's T5
    cold = args.cold or given is not None  # a generated file is sparse: its holes never come from the disk
    try:
        ckpt = os.path.join(folder, "checkpoint.safetensors")
        suffix = ".gguf" if args.case == "gguf" else ".safetensors"
        incoming = args.file or os.path.join(folder, "incoming" + suffix)
        if args.t5:
            stored = ",".join(given.dtypes) if given is not None else "GGUF Q8_0" if args.case else args.t5
            kind, label = "t5", f"T5-XXL {stored} ({args.t5_blocks} blocks)"
            write_sparse(ckpt, t5_shapes(args.t5_blocks, torch.float16), 1)
            dtype = torch.float16 if args.t5 == "fp16" else torch.float8_e4m3fn
            if args.case == "gguf":
                write_sparse_gguf_t5(incoming, args.t5_blocks)
            elif given is None:
                write_sparse(incoming, t5_shapes(args.t5_blocks, dtype), 2)
        else:
            stored = {"gmp": "GmP fp32 (OpenAI layout)", "fp8-clip": "fp8 e4m3fn"}.get(args.case or "", "fp16")
            kind, label = "clip", f"CLIP-L {stored} into SD1.5"
            shapes = clip_shapes("cond_stage_model.transformer.")
            shapes["model.diffusion_model.out.0.weight"] = ((320, 320), torch.float16)
            write_sparse(ckpt, shapes, 1)
            if args.case == "gmp":
                write_sparse(incoming, gmp_openai_shapes(), 2)
            elif given is None:
                dtype = torch.float8_e4m3fn if args.case == "fp8-clip" else torch.float16
                write_sparse(incoming, {k: (s, dtype) for k, (s, _) in clip_shapes("").items()}, 2)
        label += f", precision {args.precision}"
        if given is not None:
            label += f" — {os.path.basename(incoming)}"
        size = os.path.getsize(incoming)
        caches = ("warm", "cold") if cold else ("warm",)
        # a swap that must expand what it reads (GGUF, fp8 at a precision) is also compared with a read that
        # decodes the same file with another decoder
        decoded = PRECISIONS[args.precision] if args.case in ("gguf", "fp8-clip") else None

        def checkpoint_read() -> None:
            warm(ckpt)
            rows.setdefault("raw read, checkpoint", []).append(measured(lambda: raw_read(ckpt), memory=False))

        def baseline(cache: str) -> None:
            if cache == "cold":
                evict(incoming)
                rows.setdefault("disk read (cold)", []).append(measured(lambda: disk_read(incoming), memory=False))
            (warm if cache == "warm" else evict)(incoming)
            rows.setdefault(f"raw read ({cache})", []).append(measured(lambda: raw_read(incoming), memory=False))
            if cache == "warm" and baselines_first:
                checkpoint_read()
            if decoded is not None and cache == "warm":
                rows.setdefault("read+decode (warm)", []).append(
                    measured(lambda: read_decode(incoming, decoded), memory=False)
                )

        # the raw read materialises a second copy of the file: where that does not fit beside the slot, the
        # baselines run before the slot is loaded (same process, same files)
        slot_bytes = os.path.getsize(ckpt)
        baselines_first = slot_bytes + max(size, slot_bytes) + (1 << 30) > available()
        rows: dict[str, list[Measure]] = {}
        if baselines_first:
            print(
                f"raw reads measured before the slot is loaded: the slot ({slot_bytes / 1e9:.1f} GB) and a second"
                f" copy of the file ({size / 1e9:.1f} GB) do not fit in MemAvailable ({available() / 1e9:.1f} GB)"
            )
            for _ in range(args.repeats):
                for cache in caches:
                    baseline(cache)
        slot, builtin = build_slot(kind, ckpt, args.t5_blocks)
        tower = next(t for t in inspect_path(incoming) if t.family)
        source = EncoderSource(incoming, tower, "incoming")
        engine = SwapEngine()
        steps = Steps(engine)

        def swap() -> None:
            engine.apply([SlotRequest(slot, SlotChoice("incoming", args.precision), source, None, lambda: builtin)])

        def restore() -> None:
            engine.apply([SlotRequest(slot, SlotChoice(None), None, None, lambda: builtin)])

        def first_use() -> None:
            engine_mod._CHECKED.clear()  # values checked and the file hashed again
            digest._known.clear()

        notes: dict[str, list[str]] = {}
        cached_before: dict[str, list[float]] = {}
        cached_after: dict[str, list[float]] = {}
        for _ in range(args.repeats):
            for cache in caches:
                if not baselines_first:
                    baseline(cache)
                first_use()
                (warm if cache == "warm" else evict)(incoming)
                cached_before.setdefault(cache, []).append(cached_share(incoming))
                steps.take(size)
                started = time.perf_counter()
                rows.setdefault(f"swap ({cache}, 1st use)", []).append(measured(swap))
                notes.setdefault(f"swap ({cache}, 1st use)", []).append(steps.take(size))
                cached_after.setdefault(cache, []).append(cached_share(incoming))
                read = disk_bytes()
                digest.sha256(incoming)  # joins the hash the swap started
                rows.setdefault(f"sha256 ready ({cache})", []).append(
                    Measure(time.perf_counter() - started, disk=disk_bytes() - read)
                )
                if not baselines_first:
                    checkpoint_read()  # in the memory state the restore starts from
                warm(ckpt)  # page cache warm for the restore, as for the baseline
                rows.setdefault("restore (warm)", []).append(measured(restore))
                notes.setdefault("restore (warm)", []).append(steps.take(size))
        print(
            f"{label}: file {size / 1e6:.0f} MB, {torch.get_num_threads()} threads, best of {args.repeats};"
            f" MemAvailable {available() / 1e9:.1f} GB with the slot loaded"
        )
        head = (
            f"{'operation':<22} {'best':>8} {'vs raw read':>12} {'from disk':>10} {'peak extra anon':>16} {'÷ file':>7}"
        )
        print(head + f" {'anon after−before':>18}")
        for name, values in rows.items():
            cache = "cold" if "cold" in name else "warm"
            # Built-in rebuilds the slot from the checkpoint: its baseline is a raw read of that file
            against = (
                "raw read, checkpoint"
                if name.startswith(("restore", "raw read, checkpoint"))
                else f"raw read ({cache})"
            )
            base = min(m.seconds for m in rows[against])
            best = min(values, key=lambda m: m.seconds)
            peak = max(m.peak for m in values)
            kept = max(m.kept for m in values)
            print(
                f"{name:<22} {best.seconds:>7.2f}s {best.seconds / base:>11.2f}x {best.disk / size:>9.2f}×"
                f" {peak / 1e6:>13.1f} MB {peak / size:>6.1%} {kept / 1e6:>15.1f} MB"
            )
            if name in notes:
                print(f"{'':<22}   steps (best run): {notes[name][values.index(best)]}")
        if "read+decode (warm)" in rows:
            decode = min(m.seconds for m in rows["read+decode (warm)"])
            warm_swap = min(m.seconds for m in rows["swap (warm, 1st use)"])
            print(
                f"swap (warm) ÷ read+decode of the same file to {args.precision} by another decoder:"
                f" {warm_swap / decode:.2f}x"
            )
        if cold:
            cold_disk = min(m.seconds for m in rows["disk read (cold)"])
            cold_swap = min(m.seconds for m in rows["swap (cold, 1st use)"])
            print(
                f"swap (cold) ÷ one cold disk read of the file: {cold_swap / cold_disk:.2f}x"
                f" (two reads from disk would be ≈ 2.00x plus the copy)"
            )
        for cache, shares in cached_after.items():
            before = cached_before[cache]
            print(
                f"share of the file in the page cache before/after a {cache} swap:"
                f" {min(before):.0%}–{max(before):.0%} / {min(shares):.0%}–{max(shares):.0%}"
            )
        print(f"CPU copies kept by the engine while swapped: {engine.kept_bytes(slot)} bytes")
        swap()
        restore()
        trim()
        first = rss_anon()
        cycle = time.perf_counter()
        for _ in range(args.cycles):
            swap()
            restore()
        cycle = (time.perf_counter() - cycle) / max(1, args.cycles)
        trim()
        print(
            f"RssAnon after {args.cycles} swap/restore cycles: {(rss_anon() - first) / 1e6:+.1f} MB vs after the first"
            f" ({cycle:.1f} s per cycle, file checked already)"
        )
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
