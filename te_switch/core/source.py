"""The one interface every reader implements: named tensors of one file, read on demand.

Its own module so the readers (``readers``, ``gguf_reader``) import it without importing each other.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from te_switch.core.errors import BadFileError
from te_switch.core.tensors import TensorInfo, Weight


class TensorSource(ABC):
    """Named tensors of one file (or one sharded set), read on demand."""

    format: str = ""
    # load() gives fresh memory that nothing else holds (plain reads, no mapping): a caller may keep it as is
    fresh_reads: bool = False

    def __init__(self, path: str) -> None:
        self.path = path
        self.metadata: dict[str, str] = {}

    @abstractmethod
    def keys(self) -> list[str]: ...

    @abstractmethod
    def info(self, key: str) -> TensorInfo: ...

    @abstractmethod
    def load(self, key: str) -> Weight:
        """The tensor as stored: fp8 stays fp8, GGUF blocks stay packed."""

    def close(self) -> None:  # noqa: B027  (optional for subclasses)
        pass

    def __contains__(self, key: object) -> bool:
        return key in self._key_set()

    def _key_set(self) -> set[str]:
        cached = getattr(self, "_keys_cache", None)
        if cached is None:
            cached = set(self.keys())
            self._keys_cache = cached
        return cached

    def infos(self) -> dict[str, TensorInfo]:
        return {k: self.info(k) for k in self.keys()}

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fail(self, reason: str) -> BadFileError:
        return BadFileError(self.path, reason)
