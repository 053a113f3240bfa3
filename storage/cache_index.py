"""The node-local shard cache on disk: byte budget, LRU eviction, pins and atomic fills.

Layout under the cache root (one per node, shared by every process on it)::

    data/<key>            a complete file, verified when it was filled
    data/<key>.xxh        its xxh3-128 digest, checked on every hit (~20 GB/s)
    tmp/<key>.<pid>.<n>   a fill in progress, flock'ed by its writer
    locks/<nn>            256 striped fill locks: one process fills a given key at a time
    .budget.lock          taken to scan, evict, reserve and commit

Coordination is by ``flock(2)`` alone. A flock belongs to an open file description, so
the kernel drops it when its process dies (SIGKILL included): nothing is ever left
locked, and a temporary whose writer died is found unlocked and removed by the next scan.
A forked child (a ``DataLoader`` worker) would share the descriptions its parent holds
locked at that moment and keep those locks alive; it closes its copies right after the
fork. Locked descriptors are never handed out: readers and mappings get their own.

* **Pins.** A reader holds a shared flock on the data file while it uses it. Eviction
  takes an exclusive non-blocking flock and skips the file when that fails, so a file
  some process has open is never evicted. A reader that opened a file just as it was
  evicted sees ``st_nlink == 0`` once it holds the lock, and treats it as a miss.
* **LRU.** A hit sets the file's mtime to now; eviction removes the oldest unpinned files.
* **Budget.** Every file under ``data/`` and ``tmp/`` counts at its size. A fill reserves
  its bytes (the temporary is extended to its final size) under the budget lock, after
  evicting enough, so the cache never holds more than its budget, except for one file
  larger than the whole budget, which is admitted into an otherwise empty cache. When
  pinned files leave no room, the fill waits a little and then reports that it could not
  reserve; the caller reads the file without caching it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import xxhash

from storage.errors import CacheError, ConfigError

DIGEST_LEN = 32  # hex chars of an xxh3-128 digest
SIDECAR = ".xxh"
STRIPES = 256
_counter = itertools.count()


class _XXH128(ctypes.Structure):
    _fields_ = [("low64", ctypes.c_uint64), ("high64", ctypes.c_uint64)]


def _gil_free_xxh3():
    """``XXH3_128bits`` of the xxhash library the ``xxhash`` module is built with, or None.

    Called through ctypes, which releases the GIL for the call: the module's own functions
    hold it, so hashing a 16 MB shard on a hit (~1 ms) would stop every other thread of the
    process from running Python meanwhile (the loader's batches, the training loop).
    """
    try:
        fn = ctypes.CDLL(xxhash._xxhash.__file__).XXH3_128bits
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = _XXH128, [ctypes.c_void_p, ctypes.c_size_t]
    return fn


_XXH3_128 = _gil_free_xxh3()
GIL_FREE_BYTES = 1 << 16  # below this, a call through ctypes costs more than the hash


def fast_digest(data) -> str:
    """The xxh3-128 hex digest of a buffer; a large one hashed without holding the GIL."""
    view = np.frombuffer(data, dtype=np.uint8)
    if _XXH3_128 is None or len(view) < GIL_FREE_BYTES:
        return xxhash.xxh3_128_hexdigest(data)
    digest = _XXH3_128(view.ctypes.data, len(view))
    return f"{digest.high64:016x}{digest.low64:016x}"


@dataclass
class Pinned:
    """A cached file held with a shared lock: it is not evicted until :meth:`close`."""

    fd: int  # holds the lock; never read from, never handed out
    path: str
    size: int
    digest: str | None  # the stored fast digest; None when the sidecar is missing
    pid: int = field(default_factory=os.getpid)

    def open(self):
        """A new descriptor of the pinned file (not the path's current file, if replaced)."""
        reader = open(self.path, "rb", buffering=0)
        here, there = os.fstat(reader.fileno()), os.fstat(self.fd)
        if (here.st_ino, here.st_dev) != (there.st_ino, there.st_dev):
            reader.close()
            raise FileNotFoundError(self.path)
        return reader

    def close(self) -> None:
        if self.fd >= 0 and self.pid == os.getpid():  # a forked child closed its copy already
            _release(self.fd)
        self.fd = -1


class Reservation:
    """Bytes reserved for one fill: a locked temporary, committed by atomic rename."""

    def __init__(self, cache: "CacheDir", key: str, path: str, fd: int):
        self.cache, self.key, self.path, self.fd = cache, key, path, fd

    def write(self, data) -> str:
        """Write the whole content and return its fast digest."""
        view = memoryview(data).cast("B")
        os.ftruncate(self.fd, len(view))
        written = 0
        while written < len(view):
            written += os.pwrite(self.fd, view[written:], written)
        return fast_digest(view)

    def commit(self, digest: str) -> None:
        side_tmp = f"{self.path}{SIDECAR}"
        with open(side_tmp, "w") as f:
            f.write(digest)
        with self.cache.budget_lock():
            os.replace(side_tmp, self.cache.data_path(self.key) + SIDECAR)
            os.replace(self.path, self.cache.data_path(self.key))
        _release(self.fd)
        self.fd = -1

    def abort(self) -> None:
        for path in (self.path, f"{self.path}{SIDECAR}"):
            _unlink(path)
        if self.fd >= 0:
            _release(self.fd)
            self.fd = -1


class CacheDir:
    """The files of one cache root and the locks that keep them consistent."""

    def __init__(self, root: str, budget: int):
        self.root = os.path.abspath(os.path.expanduser(root))
        self.budget = budget
        try:
            for sub in ("data", "tmp", "locks"):
                os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        except OSError as exc:
            raise CacheError(
                f"cannot use {self.root!r} as the shard cache folder ({exc.strerror or exc}); point SWARM_CACHE_DIR "
                "(or the cache_dir storage option) at a writable folder"
            ) from None

    def data_path(self, key: str) -> str:
        return os.path.join(self.root, "data", key)

    # ------------------------------------------------------------------ locks

    @contextmanager
    def budget_lock(self):
        with _flocked(os.path.join(self.root, ".budget.lock"), fcntl.LOCK_EX):
            yield

    @contextmanager
    def fill_lock(self, key: str):
        """Serialise fills of ``key`` across threads and processes (striped by key).

        Never hold two: two keys may share a stripe, and a second flock on it would wait
        for the first forever. The budget lock may be taken inside one.
        """
        stripe = int(xxhash.xxh3_64_intdigest(key.encode()) % STRIPES)
        with _flocked(os.path.join(self.root, "locks", f"{stripe:03d}"), fcntl.LOCK_EX):
            yield

    # ------------------------------------------------------------------ hits

    def open_pinned(self, key: str) -> Pinned | None:
        """Lock ``key`` shared and mark it used now; None on a miss."""
        path = self.data_path(key)
        try:
            fd = _open_held(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            st = os.fstat(fd)
            if st.st_nlink == 0:  # evicted between open and lock
                _release(fd)
                return None
            os.utime(fd)
            try:
                with open(path + SIDECAR) as side:
                    digest = side.read(DIGEST_LEN + 1).strip() or None
            except FileNotFoundError:
                digest = None
            return Pinned(fd, path, st.st_size, digest)
        except BaseException:
            _release(fd)
            raise

    def remove(self, key: str) -> None:
        """Drop ``key`` (found corrupt): readers that have it open keep their view."""
        with self.budget_lock():
            _unlink(self.data_path(key))
            _unlink(self.data_path(key) + SIDECAR)

    def discard(self, key: str) -> bool:
        """Evict ``key`` now unless some process has it open."""
        with self.budget_lock():
            return self._evict(self.data_path(key))

    # ------------------------------------------------------------------ fills

    def reserve(self, key: str, size: int, wait_s: float = 2.0) -> Reservation | None:
        """Make room for ``size`` bytes and return a locked temporary; None if no room in time."""
        need = size + DIGEST_LEN
        deadline = time.monotonic() + wait_s
        delay = 0.005
        while True:
            with self.budget_lock():
                used, candidates = self._scan()
                for path, _mtime, file_size in candidates:
                    if used + need <= self.budget:
                        break
                    if self._evict(path):
                        used -= file_size + DIGEST_LEN
                if used + need <= self.budget or used == 0:
                    return self._create_tmp(key, size)
            if time.monotonic() >= deadline:
                return None
            time.sleep(delay)
            delay = min(0.1, delay * 2)

    def _create_tmp(self, key: str, size: int) -> Reservation:
        path = os.path.join(self.root, "tmp", f"{key}.{os.getpid()}.{next(_counter)}")
        fd = _open_held(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, size + DIGEST_LEN)  # the digest sidecar's bytes are reserved here too
        except BaseException:
            _unlink(path)
            _release(fd)
            raise
        return Reservation(self, key, path, fd)

    def _scan(self) -> tuple[int, list[tuple[str, float, int]]]:
        """Bytes in use, and the data files oldest first; removes dead temporaries."""
        used = 0
        files = []
        for entry in _scandir(os.path.join(self.root, "tmp")):
            if _lock_free(entry.path) and not entry.name.endswith(SIDECAR):
                _unlink(entry.path)
                _unlink(entry.path + SIDECAR)
                continue
            used += _size(entry)
        for entry in _scandir(os.path.join(self.root, "data")):
            size = _size(entry)
            used += size
            if not entry.name.endswith(SIDECAR):
                try:
                    files.append((entry.path, entry.stat().st_mtime, size))
                except FileNotFoundError:
                    pass
        files.sort(key=lambda f: f[1])
        return used, files

    def _evict(self, path: str) -> bool:
        fd = _lock_exclusive(path)
        if fd is None:
            return False
        try:
            _unlink(path)
            _unlink(path + SIDECAR)
        finally:
            _release(fd)
        return True

    # ------------------------------------------------------------------ inspection

    def usage(self) -> int:
        """Bytes on disk under data/ and tmp/ right now."""
        return sum(_size(e) for sub in ("data", "tmp") for e in _scandir(os.path.join(self.root, sub)))

    def keys(self) -> list[str]:
        return sorted(e.name for e in _scandir(os.path.join(self.root, "data")) if not e.name.endswith(SIDECAR))

    def clear(self) -> int:
        """Evict everything not pinned; return how many files went."""
        with self.budget_lock():
            return sum(self._evict(path) for path, _m, _s in self._scan()[1])


def _scandir(path: str):
    try:
        return list(os.scandir(path))
    except FileNotFoundError:
        return []


def _size(entry) -> int:
    try:
        return entry.stat().st_size
    except FileNotFoundError:
        return 0


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _lock_exclusive(path: str) -> int | None:
    """An fd holding an exclusive lock on ``path``; None if it is gone or someone holds a lock."""
    try:
        fd = _open_held(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except OSError as exc:
        _release(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise


def _lock_free(path: str) -> bool:
    """True when no process holds a lock on ``path`` (its writer is gone)."""
    fd = _lock_exclusive(path)
    if fd is None:
        return False
    _release(fd)
    return True


# Descriptors that may hold a lock, closed in a forked child (see the module docstring).
_HELD: set[int] = set()
_HELD_LOCK = threading.Lock()


def _open_held(path: str, flags: int, mode: int = 0o644) -> int:
    # Opened and recorded under the lock a fork takes first: a child never gets an
    # unrecorded descriptor that its parent locks a moment later.
    with _HELD_LOCK:
        fd = os.open(path, flags, mode)
        _HELD.add(fd)
    return fd


def _release(fd: int) -> None:
    with _HELD_LOCK:
        _HELD.discard(fd)
        os.close(fd)


def _close_inherited() -> None:
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()
    _HELD_LOCK.release()


os.register_at_fork(before=_HELD_LOCK.acquire, after_in_parent=_HELD_LOCK.release,
                    after_in_child=_close_inherited)


@contextmanager
def _flocked(path: str, mode: int):
    fd = _open_held(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, mode)
        yield
    finally:
        _release(fd)
