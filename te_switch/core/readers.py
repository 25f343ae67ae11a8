"""Open any weights file lazily: safetensors, weights-only pickles, sharded HF folders, GGUF.

The format is told by the file's first bytes, never by its name. Opening reads headers only;
``load(key)`` reads one tensor. Every failure is a :class:`BadFileError` with a one-line reason.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import pickle
import struct
import warnings
import zipfile
from collections.abc import Iterator
from typing import Any

import torch

from te_switch.core.errors import BadFileError
from te_switch.core.source import TensorSource
from te_switch.core.tensors import ITEMSIZES, SAFETENSORS_DTYPES, TensorInfo, Weight, dtype_name

SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the limit the safetensors library itself enforces
WEIGHT_SUFFIXES = (".safetensors", ".sft", ".gguf", ".pt", ".pth", ".ckpt", ".bin")
INDEX_SUFFIX = ".index.json"


# ---------------------------------------------------------------------------------------------
# safetensors


class SafetensorsSource(TensorSource):
    """Own header parser (precise errors, no dtype surprises) + zero-copy mmap reads."""

    format = "safetensors"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.size = os.path.getsize(path)
        if self.size < 8:
            raise self.fail(f"truncated: {self.size} bytes, too short for a safetensors header")
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > SAFETENSORS_MAX_HEADER:
                raise self.fail(f"header claims {header_len} bytes, over the {SAFETENSORS_MAX_HEADER >> 20} MB limit")
            if 8 + header_len > self.size:
                raise self.fail(f"truncated: header claims {header_len} bytes but the file has {self.size}")
            raw = f.read(header_len)
        try:
            header = json.loads(raw.decode("utf-8").rstrip(" \x00"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self.fail(f"malformed safetensors header ({type(e).__name__})") from None
        if not isinstance(header, dict):
            raise self.fail("malformed safetensors header (not a JSON object)")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict):
            raise self.fail("malformed safetensors header (__metadata__ is not an object)")
        self.metadata = {str(k): str(v) for k, v in meta.items()}
        self.data_start = 8 + header_len
        data_size = self.size - self.data_start
        self._entries: dict[str, tuple[TensorInfo, int, int]] = {}
        for name, entry in header.items():
            # hot loop (whole checkpoints have thousands of entries): validate with cheap checks only
            try:
                dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
                nbytes = math.prod(shape) * ITEMSIZES[dtype]
                ok = type(begin) is int and type(end) is int and 0 <= begin <= end and min(shape, default=0) >= 0
            except KeyError:
                if isinstance(entry, dict) and "dtype" in entry and entry["dtype"] not in ITEMSIZES:
                    raise self.fail(f"unknown dtype {entry['dtype']!r} for tensor {name!r}") from None
                ok = False
            except (TypeError, ValueError):
                ok = False
            if not ok or not all(type(d) is int for d in shape):
                raise self.fail(f"malformed header entry for tensor {name!r}")
            if end - begin != nbytes:
                raise self.fail(f"tensor {name!r}: {end - begin} bytes do not match shape {list(shape)} {dtype}")
            if end > data_size:
                raise self.fail(f"truncated: tensor {name!r} runs past the end of the file")
            self._entries[name] = (TensorInfo(tuple(shape), dtype), begin, end)
        self._mm: mmap.mmap | None = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def info(self, key: str) -> TensorInfo:
        return self._entries[key][0]

    def span(self, key: str) -> tuple[int, int]:
        """Where ``key``'s bytes lie in the file (absolute offsets, end exclusive)."""
        _, begin, end = self._entries[key]
        return self.data_start + begin, self.data_start + end

    def load(self, key: str) -> torch.Tensor:
        info, begin, end = self._entries[key]
        dtype = SAFETENSORS_DTYPES[info.dtype]
        if end == begin:
            return torch.empty(info.shape, dtype=dtype)
        if self._mm is None:
            with open(self.path, "rb") as f:
                # copy-on-write: tensors are writable without ever touching the file
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        if len(self._mm) < self.data_start + end:
            raise self.fail("truncated: the file shrank while it was being read")
        flat = torch.frombuffer(self._mm, dtype=torch.uint8, count=end - begin, offset=self.data_start + begin)
        return flat.view(dtype).reshape(info.shape)

    def close(self) -> None:
        # tensors handed out keep the mapping alive; dropping our reference lets GC unmap it
        self._mm = None


# ---------------------------------------------------------------------------------------------
# pickles (.pt/.ckpt/.bin): weights_only or nothing


# dicts that wrap a whole state dict; anything else nested keeps its name as a key prefix
_WRAPPERS = ("state_dict", "model_state_dict", "model", "module", "ema", "params", "weights")


def _state_dict_from_pickle(obj: Any) -> dict[str, torch.Tensor]:
    """The tensors of a loaded pickle: unwrap ``state_dict``-like wrappers, name other nested dicts."""
    if not isinstance(obj, dict):
        return {}
    for wrapper in _WRAPPERS:
        if isinstance(obj.get(wrapper), dict) and any(isinstance(v, torch.Tensor) for v in obj[wrapper].values()):
            return _state_dict_from_pickle(obj[wrapper])
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors:
        return tensors
    # e.g. A1111 embeddings: {"string_to_param": {"*": tensor}, ...} -> "string_to_param.*"
    nested = {str(k): v for k, v in obj.items() if isinstance(v, dict)}
    for name, inner in nested.items():
        tensors.update({f"{name}.{k}": v for k, v in _state_dict_from_pickle(inner).items()})
    return tensors


class PickleSource(TensorSource):
    format = "pickle"

    def __init__(self, path: str, *, is_zip: bool) -> None:
        super().__init__(path)
        try:
            with warnings.catch_warnings():
                # torch warns about legacy (non-zip) pickles; the file is read weights_only either way
                warnings.simplefilter("ignore", UserWarning)
                if path.endswith(".safetensors"):
                    # torch.load sends *.safetensors paths to safetensors by name; a file object keeps it a pickle
                    with open(path, "rb") as f:
                        obj = torch.load(f, map_location="cpu", weights_only=True)
                else:
                    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
        except pickle.UnpicklingError as e:
            if "weights_only" in str(e) or "Weights only" in str(e):
                raise self.fail(
                    "refused: this pickle needs code execution to load (it is not weights_only-safe);"
                    " use a safetensors copy of it"
                ) from None
            raise self.fail(f"corrupt pickle ({' '.join(str(e).split())[:120]})") from None
        except (EOFError, zipfile.BadZipFile):
            raise self.fail("truncated or corrupt PyTorch file") from None
        except RuntimeError as e:
            msg = str(e)
            if "zip" in msg or "archive" in msg or "storage" in msg or "size" in msg:
                raise self.fail("truncated or corrupt PyTorch file") from None
            raise self.fail(f"cannot read PyTorch file ({' '.join(msg.split())[:120]})") from None
        except Exception as e:  # weights_only unpickler raises plain errors on hostile opcodes too
            raise self.fail(f"cannot read PyTorch file ({type(e).__name__})") from None
        self._tensors = _state_dict_from_pickle(obj)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, key: str) -> TensorInfo:
        t = self._tensors[key]
        return TensorInfo(tuple(t.shape), dtype_name(t.dtype))

    def load(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def close(self) -> None:
        self._tensors = {}


# ---------------------------------------------------------------------------------------------
# sharded HF checkpoints: an *.index.json with a weight_map


class ShardedSource(TensorSource):
    """Shards are opened only when one of their tensors is asked for."""

    format = "sharded"

    def __init__(self, index_path: str) -> None:
        super().__init__(index_path)
        try:
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            raise self.fail("not a valid *.index.json (needs a weight_map)") from None
        folder = os.path.dirname(os.path.abspath(index_path))
        self._shard_of: dict[str, str] = {}
        for key, shard in weight_map.items():
            shard_path = os.path.normpath(os.path.join(folder, str(shard)))
            if os.path.dirname(shard_path) != folder:
                raise self.fail(f"shard {shard!r} lies outside the index's folder")
            self._shard_of[str(key)] = shard_path
        self.metadata = {str(k): str(v) for k, v in (index.get("metadata") or {}).items()}
        self._open: dict[str, TensorSource] = {}

    def _shard(self, key: str) -> TensorSource:
        path = self._shard_of[key]
        src = self._open.get(path)
        if src is None:
            if not os.path.isfile(path):
                raise self.fail(f"missing shard {os.path.basename(path)}")
            src = open_file(path)
            if isinstance(src, ShardedSource):
                raise self.fail(f"shard {os.path.basename(path)} is itself an index")
            self._open[path] = src
        if key not in src:
            raise self.fail(f"shard {os.path.basename(path)} lacks {key!r} named in the index")
        return src

    def keys(self) -> list[str]:
        return list(self._shard_of)

    def info(self, key: str) -> TensorInfo:
        return self._shard(key).info(key)

    def load(self, key: str) -> Weight:
        return self._shard(key).load(key)

    def close(self) -> None:
        for src in self._open.values():
            src.close()
        self._open.clear()


# ---------------------------------------------------------------------------------------------
# dispatch


def _folder_entry(folder: str) -> str:
    """The one weights file (or index) that makes a folder a single HF model."""
    names = sorted(os.listdir(folder))
    indexes = [n for n in names if n.endswith(INDEX_SUFFIX)]
    if indexes:
        # prefer safetensors shards over pickles when both are published
        indexes.sort(key=lambda n: (not n.startswith("model.safetensors"), n))
        return os.path.join(folder, indexes[0])
    weights = [n for n in names if n.endswith(WEIGHT_SUFFIXES)]
    if len(weights) == 1:
        return os.path.join(folder, weights[0])
    raise BadFileError(folder, "a folder, not a weights file (list it to see its files)")


def open_file(path: str | os.PathLike[str]) -> TensorSource:
    """Open ``path`` as a :class:`TensorSource`, choosing the reader from the content."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = _folder_entry(path)
    if not os.path.exists(path):
        raise BadFileError(path, "no such file")
    if not os.path.isfile(path):
        raise BadFileError(path, "not a regular file")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise BadFileError(path, f"cannot read ({e.strerror or e})") from None
    if size == 0:
        raise BadFileError(path, "empty file (0 bytes)")
    if head.startswith(b"GGUF"):
        from te_switch.core.gguf_reader import GGUFSource

        return GGUFSource(path)
    if head.startswith(b"PK\x03\x04"):
        return PickleSource(path, is_zip=True)
    if len(head) >= 9 and head[8:9] == b"{":
        # before the pickle test: a header length's low byte may well be 0x80
        return SafetensorsSource(path)
    if head[:1] == b"\x80":  # legacy torch.save / plain pickle protocol 2+
        return PickleSource(path, is_zip=False)
    if head.lstrip()[:1] == b"{" and path.endswith(".json"):
        return ShardedSource(path)
    if len(head) < 9 or size < 9:
        raise BadFileError(path, f"truncated: {size} bytes is too short to be a weights file")
    raise BadFileError(path, "not a recognised weights format (safetensors, GGUF, PyTorch pickle, *.index.json)")


def iter_weight_files(folder: str, *, recursive: bool = True) -> Iterator[str]:
    """Weights files (and index files) under ``folder``; shards listed by an index are skipped."""
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        if not recursive:
            dirs.clear()
        indexed: set[str] = set()
        for name in files:
            if name.endswith(INDEX_SUFFIX):
                try:
                    with open(os.path.join(root, name), encoding="utf-8") as f:
                        indexed.update(str(v) for v in json.load(f).get("weight_map", {}).values())
                except (OSError, ValueError, AttributeError):
                    pass  # reported when the index itself is opened
        for name in sorted(files):
            if name.endswith(INDEX_SUFFIX) or (name.endswith(WEIGHT_SUFFIXES) and name not in indexed):
                yield os.path.join(root, name)
