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
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future

CHUNK = 4 << 20  # bytes per read: big enough that hashlib releases the GIL, small enough for the cache
BACKGROUND_NICE = 10
RING = 8  # read buffers the hash may lag behind by (RING × CHUNK = 32 MB) before it reads for itself

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
    try:
        return future.result()
    except Stop:  # a read that found a bad value ended its hash: hash the file on its own
        return sha256(path)


class Stop(Exception):
    """Raised by a :func:`sha256_visiting` visitor to end the pass early (no hash is recorded)."""


def _pieces(size: int, spans: Sequence[tuple[int, int]]) -> Iterator[tuple[int, int, int | None]]:
    """(begin, end, span index or None) covering ``[0, size)`` in order, each at most CHUNK bytes; the
    pieces of a span start at multiples of CHUNK from the span's own start (element-aligned)."""
    at = 0
    for i, (begin, end) in enumerate(spans):
        while at < begin:
            step = min(begin, at + CHUNK)
            yield at, step, None
            at = step
        while at < end:
            step = min(end, at + CHUNK)
            yield at, step, i
            at = step
    while at < size:
        step = min(size, at + CHUNK)
        yield at, step, None
        at = step


def sha256_visiting(path: str, spans: Sequence[tuple[int, int]], visit: Callable[[int, memoryview], None]) -> None:
    """One sequential read of ``path`` that also gives its sha256.

    The bytes of each ``(begin, end)`` span (sorted, disjoint) go to ``visit(span index, piece)`` on this
    thread as they are read; every byte also goes into the file's sha256 on a second thread, from the
    same buffer while one of ``RING`` buffers is free. The reader never waits for the hash: a piece read
    while the hash lags behind is hashed later from the file (the page cache, where it still holds it),
    after this call has returned if need be — ``sha256()``/``known()`` then wait for or see the result.
    A visitor raising :class:`Stop` ends the read and the hash (nothing is recorded).
    """
    key = _state(path)
    future: Future[str] = Future()
    with _lock:
        if key in _known or key in _running:
            future = None  # type: ignore[assignment]
        else:
            _running[key] = future
    pool: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
    for _ in range(RING):
        pool.put(bytearray(CHUNK))
    work: queue.SimpleQueue[tuple[int, int, bytearray | None] | None] = queue.SimpleQueue()
    stopped = threading.Event()
    if future is not None:
        threading.Thread(target=_hash_behind, args=(path, key, future, pool, work, stopped), daemon=True).start()
    scratch = bytearray(CHUNK)
    try:
        with open(path, "rb", buffering=0) as f:
            for begin, end, span in _pieces(key[3], spans):
                try:
                    buf = pool.get_nowait() if future is not None else scratch
                except queue.Empty:
                    buf = None
                view = memoryview(buf if buf is not None else scratch)[: end - begin]
                if f.readinto(view) != end - begin:
                    raise OSError(f"{os.path.basename(path)} shrank while it was being read")
                if span is not None:
                    visit(span, view)
                if future is not None:
                    work.put((begin, end, buf))
    except BaseException:
        stopped.set()
        raise
    finally:
        work.put(None)


def _hash_behind(
    path: str,
    key: tuple,
    future: Future[str],
    pool: queue.SimpleQueue[bytearray],
    work: queue.SimpleQueue[tuple[int, int, bytearray | None] | None],
    stopped: threading.Event,
) -> None:
    """The hash half of :func:`sha256_visiting`: pieces in file order, from the ring or from the file."""
    h = hashlib.sha256()
    own = bytearray(CHUNK)
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    try:
        with open(path, "rb", buffering=0) as f:
            while (item := work.get()) is not None:
                begin, end, buf = item
                if buf is None:
                    f.seek(begin)
                    view = memoryview(own)[: end - begin]
                    if f.readinto(view) != end - begin:
                        raise OSError(f"{os.path.basename(path)} shrank while it was being hashed")
                    h.update(view)
                else:
                    h.update(memoryview(buf)[: end - begin])  # releases the GIL: runs beside the reader
                    pool.put(buf)
        if stopped.is_set():
            raise Stop
    except BaseException as e:
        with _lock:
            _running.pop(key, None)
        future.set_exception(e)
        return
    digest = h.hexdigest()
    with _lock:
        _known[key] = digest
        _running.pop(key, None)
    future.set_result(digest)
