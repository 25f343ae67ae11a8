"""CLIP tokenizer files made offline from the BPE vocabulary that ships inside ``open_clip_torch``.

The result is byte-identical to the ``vocab.json``/``merges.txt`` of ``openai/clip-vit-large-patch14``
(49408 tokens, ``<|startoftext|>`` = 49406, ``<|endoftext|>`` = 49407), so nothing is fetched
from a hub. Only the package's data file is read; open_clip itself is never imported.
"""

from __future__ import annotations

import gzip
import importlib
import importlib.util
import json
import os
import subprocess
import sys

BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
MERGES = 49152 - 256 - 2  # the merges OpenAI's CLIP uses from that file
PACKAGES = ("open_clip", "clip")  # open_clip_torch, clip-anytorch (byte-identical copies)
# The one place the vocabulary's package is pinned (tests/run.sh installs it through ensure_bpe too).
# --no-deps: only its data file is read, and its torchvision pin does not import beside the CPU torch
# (and would pull CUDA builds).
VOCAB_PACKAGE = "open_clip_torch==3.3.0"
INSTALL_COMMAND = ("pip", "install", "--no-deps", VOCAB_PACKAGE)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character map that CLIP's BPE is defined over."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def bpe_path() -> str:
    """Where the BPE vocabulary lies (raises FileNotFoundError with what to install)."""
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            path = os.path.join(folder, BPE_NAME)
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(
        f"{BPE_NAME} not found: install {VOCAB_PACKAGE} ({' '.join(INSTALL_COMMAND)}) to get CLIP's vocabulary"
    )


def ensure_bpe() -> str:
    """:func:`bpe_path`, installing :data:`VOCAB_PACKAGE` (``--no-deps``) into this Python first if it is missing."""
    try:
        return bpe_path()
    except FileNotFoundError:
        pass
    print(
        f"CLIP's tokenizer vocabulary comes from {VOCAB_PACKAGE}, which is not installed: "
        f"installing it with {' '.join(INSTALL_COMMAND)} (its data file is all TE Switch reads)",
        file=sys.stderr,
        flush=True,
    )
    proc = subprocess.run(
        [sys.executable, "-m", *INSTALL_COMMAND, "-q", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        check=False,
    )
    importlib.invalidate_caches()
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise FileNotFoundError(f"could not install {VOCAB_PACKAGE} ({last}); run: {' '.join(INSTALL_COMMAND)}")
    return bpe_path()


def clip_vocab_and_merges(path: str | None = None) -> tuple[dict[str, int], list[str]]:
    with gzip.open(path or ensure_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : MERGES + 1]  # line 0 is a header
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, merges


def write_clip_tokenizer(folder: str, *, pad_token: str = "<|endoftext|>", max_length: int = 77) -> str:
    """Write a complete HF CLIP tokenizer folder (loadable with ``CLIPTokenizer.from_pretrained``).

    ``pad_token``: ``<|endoftext|>`` for CLIP-L (SD1, SDXL ``tokenizer``), ``!`` for CLIP-G/H
    (SDXL ``tokenizer_2``, SD2). ``max_length``: 77, or 248 for Long-CLIP.
    """
    os.makedirs(folder, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        f.write(json.dumps(vocab, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    with open(os.path.join(folder, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(special, f, indent=2)
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "do_lower_case": True,
        "model_max_length": max_length,
        "errors": "replace",
        **special,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return folder


if __name__ == "__main__":  # `python -m te_switch.standalone.tokenizers`: make sure the vocabulary is there
    print(ensure_bpe())
