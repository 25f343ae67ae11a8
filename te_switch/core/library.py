"""The encoder files a user has: folder scan, header cache, short hashes.

Scanning reads headers only and remembers what it learnt per (path, size, mtime), in memory and
optionally in a JSON file, so a rescan of an unchanged folder only ``stat``s. Short hashes are the
WebUI's checkpoint convention: the first 10 hex digits of the file's sha256, computed once
(``core.digest``: a swap that read the file first has already hashed it, beside its own read).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field

from te_switch.core.detect import TowerInfo, inspect_path
from te_switch.core.digest import sha256 as sha256_of  # once per file state, shared with the swap engine
from te_switch.core.errors import TESwitchError
from te_switch.core.readers import INDEX_SUFFIX, iter_weight_files

CACHE_VERSION = 1
SHORT_HASH_LEN = 10


@dataclass
class EncoderFile:
    """One file of the library and every tower in it."""

    path: str
    name: str  # path relative to its library folder, '/'-separated: what users see and infotext records
    size: int
    mtime: float
    towers: list[TowerInfo] = field(default_factory=list)

    @property
    def error(self) -> str | None:
        return next((t.error for t in self.towers if t.error), None)


@dataclass(frozen=True)
class EncoderChoice:
    """A selectable encoder: one tower of one file."""

    file: EncoderFile
    tower: TowerInfo

    @property
    def label(self) -> str:
        """Unique display name; a whole checkpoint's towers get the slot they came from appended."""
        if len(self.file.towers) > 1 and self.tower.tower:
            return f"{self.file.name} » {self.tower.tower}"
        return self.file.name

    @property
    def kind(self) -> str | None:
        return self.tower.kind


def file_identity(path: str) -> tuple[int, float]:
    """(size, mtime) — for a sharded index, the newest and total over the index and its shards."""
    st = os.stat(path)
    if not path.endswith(INDEX_SUFFIX):
        return st.st_size, st.st_mtime
    size, mtime = st.st_size, st.st_mtime
    folder = os.path.dirname(path)
    try:
        with open(path, encoding="utf-8") as f:
            shards = set(json.load(f).get("weight_map", {}).values())
    except (OSError, ValueError, AttributeError):
        shards = set()
    for shard in shards:
        try:
            s = os.stat(os.path.join(folder, str(shard)))
        except OSError:
            continue
        size += s.st_size
        mtime = max(mtime, s.st_mtime)
    return size, mtime


class EncoderLibrary:
    """Encoder files under a list of folders (later folders never shadow earlier ones)."""

    def __init__(self, folders: list[str], cache_file: str | None = None) -> None:
        self.folders = [os.path.abspath(f) for f in folders]
        self.cache_file = cache_file
        self._lock = threading.RLock()
        self._cache: dict[str, dict] = {}
        self._files: list[EncoderFile] = []
        self._dirty = False
        self.scans = 0  # bumped by every scan: what was found before may have moved
        self._load_cache()

    # -- persistence ------------------------------------------------------------------------

    def _load_cache(self) -> None:
        if not self.cache_file or not os.path.isfile(self.cache_file):
            return
        try:
            with open(self.cache_file, encoding="utf-8") as f:
                data = json.load(f)
            if isinstance(data, dict) and data.get("version") == CACHE_VERSION and isinstance(data.get("files"), dict):
                self._cache = {k: v for k, v in data["files"].items() if isinstance(v, dict)}
        except (OSError, ValueError):
            self._cache = {}  # a damaged cache is only a slower first scan

    def save_cache(self) -> None:
        if not self.cache_file or not self._dirty:
            return
        with self._lock:
            os.makedirs(os.path.dirname(os.path.abspath(self.cache_file)), exist_ok=True)
            tmp = f"{self.cache_file}.tmp-{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"version": CACHE_VERSION, "files": self._cache}, f)
            os.replace(tmp, self.cache_file)
            self._dirty = False

    # -- scanning ---------------------------------------------------------------------------

    def scan(self) -> list[EncoderFile]:
        """(Re)list every file; only new or changed files are opened."""
        with self._lock:
            files: list[EncoderFile] = []
            seen: set[str] = set()
            for root in self.folders:
                if not os.path.isdir(root):
                    continue
                for path in iter_weight_files(root):
                    real = os.path.realpath(path)
                    if real in seen:
                        continue
                    seen.add(real)
                    try:
                        size, mtime = file_identity(path)
                    except OSError:
                        continue
                    name = os.path.relpath(path, root).replace(os.sep, "/")
                    files.append(EncoderFile(path, name, size, mtime, self._towers(path, size, mtime)))
            self._files = files
            self.scans += 1
            self.save_cache()
            return list(files)

    def _towers(self, path: str, size: int, mtime: float) -> list[TowerInfo]:
        entry = self._cache.setdefault(path, {})
        if entry.get("size") != size or entry.get("mtime") != mtime:
            entry.clear()  # the file changed: its hash is stale too
        elif "towers" in entry:
            try:
                return [TowerInfo(**t) for t in entry["towers"]]
            except TypeError:
                pass  # written by another version of TowerInfo: read the file again
        towers = inspect_path(path)
        entry.update(size=size, mtime=mtime, towers=[t.to_json() for t in towers])
        self._dirty = True
        return towers

    @property
    def files(self) -> list[EncoderFile]:
        with self._lock:
            if not self._files:
                return self.scan()
            return list(self._files)

    def choices(self, kinds: tuple[str, ...] | None = None) -> list[EncoderChoice]:
        """Usable towers, optionally only of some kinds, in folder order."""
        return [
            EncoderChoice(f, t) for f in self.files for t in f.towers if t.usable and (kinds is None or t.kind in kinds)
        ]

    def find(self, label: str) -> EncoderChoice | None:
        """The choice with this label; a bare file name also matches when it is unique."""
        choices = self.choices()
        for c in choices:
            if c.label == label:
                return c
        by_base = [c for c in choices if os.path.basename(c.file.name) == label]
        return by_base[0] if len(by_base) == 1 else None

    def find_by_hash(self, short_hash: str, label: str | None = None) -> EncoderChoice | None:
        """The choice whose file has this short hash (preferring one with the given label)."""
        matches = [c for c in self.choices() if self.short_hash(c.file.path) == short_hash]
        for c in matches:
            if c.label == label:
                return c
        return matches[0] if matches else None

    # -- hashes -----------------------------------------------------------------------------

    def cached_short_hash(self, path: str) -> str | None:
        """The short hash if already known for the file as it is now (never hashes)."""
        with self._lock:
            try:
                size, mtime = file_identity(path)
            except OSError:
                return None
            entry = self._cache.get(path) or {}
            if entry.get("size") == size and entry.get("mtime") == mtime and "sha256" in entry:
                return str(entry["sha256"])[:SHORT_HASH_LEN]
            return None

    def short_hash(self, path: str) -> str:
        with self._lock:
            size, mtime = file_identity(path)
            entry = self._cache.setdefault(path, {})
            if entry.get("size") != size or entry.get("mtime") != mtime:
                entry.clear()
                entry.update(size=size, mtime=mtime)
            if "sha256" not in entry:
                entry["sha256"] = sha256_of(path)
                self._dirty = True
            digest = entry["sha256"]
        self.save_cache()
        return digest[:SHORT_HASH_LEN]

    # -- paths ------------------------------------------------------------------------------

    def contains(self, path: str) -> bool:
        """True when ``path`` resolves inside one of the library folders (API paths must)."""
        real = os.path.realpath(path)
        for root in self.folders:
            root_real = os.path.realpath(root)
            if real == root_real or real.startswith(root_real + os.sep):
                return True
        return False

    def resolve(self, name: str) -> str:
        """A user-given name or relative path → an existing file inside the library folders."""
        candidates = [name] if os.path.isabs(name) else [os.path.join(root, name) for root in self.folders]
        for path in candidates:
            if self.contains(path) and os.path.exists(path):
                return path
        if any(not self.contains(p) for p in candidates):
            raise TESwitchError(f"{name}: outside the encoder folders ({', '.join(self.folders)})")
        raise TESwitchError(f"{name}: no such file in the encoder folders")
