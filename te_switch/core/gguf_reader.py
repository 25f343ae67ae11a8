"""GGUF files as a :class:`TensorSource`: llama.cpp tensor names, torch-order shapes, lazy loads.

The header is parsed once with ``gguf.GGUFReader`` (which memory-maps the file); everything needed
later (names, shapes, types, byte spans, metadata) is copied out and the reader is dropped before
``__init__`` returns, so the file is not mapped or held open while the source lives: Windows
users can delete or rename it. ``load()`` reads one tensor's bytes with an ordinary read into
fresh memory; the tensors handed out own their data.

``F32``/``F16``/``BF16`` (and the rarely used ``F64``/``I8``..``I64``) load as plain tensors, BF16
bit-exact. Block formats (``Q8_0``, ``Q4_K``...) load as :class:`PackedTensor` with ``raw`` shaped
``(rows, bytes_per_row)``; their decoders are in ``tensors.DEQUANTIZERS`` (``core.dequant``).

``import gguf`` happens only when a file is opened: the rest of the core works without it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from te_switch.core import dequant
from te_switch.core.source import TensorSource
from te_switch.core.tensors import DEQUANTIZERS, ITEMSIZES, SAFETENSORS_DTYPES, PackedTensor, TensorInfo

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # what gguf.GGUFReader reads; v1 used 32-bit counts
MIN_HEADER = 24  # magic, version, tensor count, key/value count
# ggml types that load as plain tensors; the names are the safetensors dtype names
PLAIN_TYPES = ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64")
ORIG_SHAPE_PREFIX = "comfy.gguf.orig_shape."  # ComfyUI-GGUF: the torch shape before reshaping for ggml
_PSEUDO_FIELDS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")  # GGUFReader's, not the file's
NEED_GGUF = "GGUF files need the `gguf` package: pip install gguf"
_READ_CHUNK = 64 << 20
PIECE_BYTES = 16 << 20  # what a values check holds of a tensor at a time


class _HeaderError(Exception):
    """A precise reason found while the header is parsed (becomes a BadFileError)."""


@dataclass(frozen=True)
class _Entry:
    info: TensorInfo
    ggml_type: str
    offset: int  # absolute file offset of the data
    nbytes: int
    raw_shape: tuple[int, int] | None  # (rows, bytes_per_row) for block formats


@functools.lru_cache(maxsize=1)
def _reader_class(gguf: Any) -> type:
    """``gguf.GGUFReader`` with precise errors for truncation, unknown types and data past the end."""

    class Reader(gguf.GGUFReader):
        def _get(self, offset: int, dtype: Any, count: int = 1, *args: Any, **kwargs: Any) -> Any:
            import numpy as np

            end = int(offset) + np.dtype(dtype).itemsize * int(count)
            if end > len(self.data):
                raise _HeaderError(f"truncated: the header runs past the end of the file ({len(self.data)} bytes)")
            return super()._get(offset, dtype, count, *args, **kwargs)

        def _build_tensors(self, start_offs: int, fields: list[Any], *args: Any, **kwargs: Any) -> Any:
            for field in fields:
                _check_tensor_field(gguf, field, int(start_offs), len(self.data))
            return super()._build_tensors(start_offs, fields, *args, **kwargs)

    return Reader


def _check_tensor_field(gguf: Any, field: Any, data_start: int, file_size: int) -> None:
    _name_len, name_data, _n_dims, dims, raw_type, offset = field.parts[:6]
    name = bytes(name_data).decode("utf-8", errors="replace")
    type_id = int(raw_type[0])
    try:
        ggml_type = gguf.GGMLQuantizationType(type_id)
    except ValueError:
        raise _HeaderError(
            f"tensor {name!r} has unknown GGUF type id {type_id} (newer than the gguf package?)"
        ) from None
    if ggml_type not in gguf.GGML_QUANT_SIZES:
        raise _HeaderError(f"tensor {name!r} has GGUF type {ggml_type.name}, which the gguf package cannot size")
    block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    ne = [int(d) for d in dims]
    if block_size > 1 and (not ne or ne[0] % block_size):
        raise _HeaderError(f"tensor {name!r}: shape {ne[::-1]} is not a whole number of {ggml_type.name} blocks")
    n_elements = 1
    for d in ne:
        n_elements *= d
    end = data_start + int(offset[0]) + n_elements // block_size * type_size
    if end > file_size:
        raise _HeaderError(f"truncated: tensor {name!r} runs past the end of the file ({end} > {file_size} bytes)")


@functools.cache
def _numpy_can_decode(gguf: Any, type_name: str) -> bool:
    import numpy as np

    ggml_type = gguf.GGMLQuantizationType[type_name]
    _, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), ggml_type)
    except NotImplementedError:
        return False
    return True


def _field_text(gguf: Any, field: Any) -> str:
    """A key/value field as a string: scalars and strings verbatim, arrays summarised."""
    types = field.types
    if types[0] == gguf.GGUFValueType.ARRAY:
        item = types[1].name.lower() if len(types) > 1 else "empty"
        return f"array[{item} x {len(field.data)}]"
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(field.parts[-1]).decode("utf-8", errors="replace")
    return str(field.parts[-1][0])


def _orig_shape(gguf: Any, field: Any) -> tuple[int, ...] | None:
    if field.types[:1] != [gguf.GGUFValueType.ARRAY] or len(field.types) < 2:
        return None
    if field.types[1].name not in ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"):
        return None
    return tuple(int(v) for v in field.contents())


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:120]}" if text else type(err).__name__


def _state(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class GGUFSource(TensorSource):
    """A GGUF file: keys are the stored (llama.cpp) names, ``info`` shapes are torch order."""

    format = "gguf"
    fresh_reads = True

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(os.fspath(path))
        try:
            import gguf
        except ImportError:
            raise self.fail(NEED_GGUF) from None
        self._check_preamble()
        self._state = _state(os.stat(self.path))  # every later read must find this same file
        self._entries: dict[str, _Entry] = {}
        # Parse, copy out what we need, and let the reader (and its memory map) go before any error
        # leaves this frame: an exception's traceback would otherwise keep the file mapped.
        reason = None
        try:
            self._read_header(gguf, _reader_class(gguf)(self.path))
        except _HeaderError as e:
            reason = str(e)
        except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError, MemoryError) as e:
            reason = f"malformed GGUF header ({_short(e)})"
        except OSError as e:
            reason = f"cannot read ({e.strerror or e})"
        if reason is not None:
            raise self.fail(reason)
        for name, entry in self._entries.items():
            if entry.raw_shape is not None and entry.ggml_type not in DEQUANTIZERS:
                if not _numpy_can_decode(gguf, entry.ggml_type):
                    raise self.fail(f"tensor {name!r} uses GGUF type {entry.ggml_type}, which has no decoder")
                dequant.register_fallback(DEQUANTIZERS, entry.ggml_type)

    def _check_preamble(self) -> None:
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                head = f.read(8)
        except OSError as e:
            raise self.fail(f"cannot read ({e.strerror or e})") from None
        if size == 0:
            raise self.fail("empty file (0 bytes)")
        if head[:4] != GGUF_MAGIC:
            if len(head) < 4 and GGUF_MAGIC.startswith(head):
                raise self.fail(f"truncated: {size} bytes is too short for a GGUF header")
            raise self.fail(f"not a GGUF file (starts with {head[:4]!r})")
        if len(head) < 8:
            raise self.fail(f"truncated: {size} bytes is too short for a GGUF header")
        version = int.from_bytes(head[4:8], "little")
        if version not in SUPPORTED_VERSIONS:
            if int.from_bytes(head[4:8], "big") in SUPPORTED_VERSIONS:
                raise self.fail("big-endian GGUF files are not supported")
            raise self.fail(f"unsupported GGUF version {version} (readable: 2, 3)")
        if size < MIN_HEADER:
            raise self.fail(f"truncated: {size} bytes is too short for a GGUF header")

    def _read_header(self, gguf: Any, reader: Any) -> None:
        orig_shapes: dict[str, tuple[int, ...]] = {}
        for name, field in reader.fields.items():
            if name in _PSEUDO_FIELDS or not field.types:
                continue
            self.metadata[name] = _field_text(gguf, field)
            if name.startswith(ORIG_SHAPE_PREFIX):
                shape = _orig_shape(gguf, field)
                if shape is None:
                    raise _HeaderError(f"field {name!r} is not an integer array")
                orig_shapes[name.removeprefix(ORIG_SHAPE_PREFIX)] = shape
        for t in reader.tensors:
            type_name = t.tensor_type.name
            ne = [int(d) for d in t.shape]
            shape = tuple(reversed(ne))
            if t.name in orig_shapes:
                shape = orig_shapes.pop(t.name)
                numel = 1
                for d in shape:
                    numel *= d
                if numel != int(t.n_elements) or any(d < 0 for d in shape):
                    raise _HeaderError(f"tensor {t.name!r}: original shape {list(shape)} does not match {ne[::-1]}")
            raw_shape = None
            if type_name not in PLAIN_TYPES:
                block_size, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
                row = ne[0] if ne else 1
                rows = int(t.n_elements) // row if row else 0
                raw_shape = (rows, row // block_size * type_size)
            info = TensorInfo(shape, type_name)
            self._entries[t.name] = _Entry(info, type_name, int(t.data_offset), int(t.n_bytes), raw_shape)
        if orig_shapes:
            raise _HeaderError(f"{ORIG_SHAPE_PREFIX}{next(iter(orig_shapes))} names no tensor in the file")

    def keys(self) -> list[str]:
        return list(self._entries)

    def info(self, key: str) -> TensorInfo:
        return self._entries[key].info

    def load(self, key: str) -> torch.Tensor | PackedTensor:
        entry = self._entries[key]
        data = self._read(entry)
        if entry.raw_shape is None:
            return data.view(SAFETENSORS_DTYPES[entry.ggml_type]).reshape(entry.info.shape)
        return PackedTensor(entry.ggml_type, data.reshape(entry.raw_shape), torch.Size(entry.info.shape))

    def pieces(self, key: str, limit: int | None = None) -> Iterator[torch.Tensor]:
        """``key``'s stored bytes front to back, as uint8 pieces of whole rows (whole blocks) of at most
        ``limit`` bytes (default ``PIECE_BYTES``), read into one reused buffer: a piece is valid until the
        next one is asked for."""
        limit = limit or PIECE_BYTES
        entry = self._entries[key]
        unit = entry.raw_shape[1] if entry.raw_shape is not None else ITEMSIZES[entry.ggml_type]
        step = max(1, limit // unit) * unit
        buf = torch.empty(min(step, entry.nbytes), dtype=torch.uint8)
        for begin in range(0, entry.nbytes, step):
            n = min(step, entry.nbytes - begin)
            self._read_into(entry, begin, buf[:n])
            yield buf[:n]

    def _read_into(self, entry: _Entry, begin: int, out: torch.Tensor) -> None:
        """Bytes ``begin``… of the entry's data into ``out`` (uint8) with plain reads."""
        view = memoryview(out.numpy())
        try:
            with open(self.path, "rb") as f:
                if _state(os.fstat(f.fileno())) != self._state:
                    raise self.fail("the file changed on disk after it was opened")
                f.seek(entry.offset + begin)
                done = 0
                while done < len(view):
                    n = f.readinto(view[done : done + _READ_CHUNK])
                    if not n:
                        raise self.fail("truncated: the file shrank after it was opened")
                    done += n
        except OSError as e:
            raise self.fail(f"cannot read ({e.strerror or e})") from None

    def _read(self, entry: _Entry) -> torch.Tensor:
        """The entry's bytes as a fresh uint8 tensor (a plain read: nothing stays mapped or open)."""
        out = torch.empty(entry.nbytes, dtype=torch.uint8)
        self._read_into(entry, 0, out)
        return out
