"""A file's sha256, computed once per file state and, where it can be, beside other work.

The infotext names an encoder as ``name [short hash]`` (the WebUI's checkpoint convention: the first
10 hex digits of the file's sha256). Hashing a 9.5 GB T5-XXL costs seconds of one core, so the swap
engine starts it in a background thread when it first reads a file for its values: both read the
same pages, so the disk is read once, and the hash (``hashlib`` releases the GIL) runs on another
core while the engine checks and loads. Whoever asks for the hash later gets the result, waiting for
the thread if it is still running, never a second pass over the file.

Results are kept per file state (path, inode, size, mtime): a file changed on disk is hashed again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from concurrent.futures import Future

CHUNK = 4 << 20  # bytes per read: big enough that hashlib releases the GIL, small enough for the cache
BACKGROUND_NICE = 10

_known: dict[tuple, str] = {}
_running: dict[tuple, Future[str]] = {}
_lock = threading.Lock()


def _state(path: str) -> tuple:
    st = os.stat(path)
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _hash(path: str) -> str:
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def known(path: str) -> str | None:
    """The sha256 if it is already known for the file as it is now (never hashes, never waits)."""
    try:
        key = _state(path)
    except OSError:
        return None
    with _lock:
        return _known.get(key)


def start(path: str) -> None:
    """Begin hashing ``path`` in a background thread unless its hash is known or on its way."""
    try:
        key = _state(path)
    except OSError:
        return
    with _lock:
        if key in _known or key in _running:
            return
        future: Future[str] = _running.setdefault(key, Future())
    threading.Thread(target=_background, args=(path, key, future), name="te-switch-sha256", daemon=True).start()


def _background(path: str, key: tuple, future: Future[str]) -> None:
    # background work: on a busy machine the swap and the generation come first (Linux nices threads alone)
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    _run(path, key, future)


def _run(path: str, key: tuple, future: Future[str]) -> None:
    try:
        digest = _hash(path)
    except BaseException as e:  # the caller of sha256() sees it
        with _lock:
            _running.pop(key, None)
        future.set_exception(e)
        return
    with _lock:
        _known[key] = digest
        _running.pop(key, None)
    future.set_result(digest)


def sha256(path: str) -> str:
    """The file's sha256: known, the running background hash's result, or computed now (here)."""
    key = _state(path)
    with _lock:
        digest = _known.get(key)
        future = _running.get(key)
        mine = digest is None and future is None
        if mine:
            future = _running[key] = Future()
    if digest is not None:
        return digest
    assert future is not None
    if mine:
        _run(path, key, future)
    return future.result()
