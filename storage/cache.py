"""``shardcache::`` — the node-local shard cache, as an fsspec layer.

    fs, root = url_to_fs("shardcache::s3://bucket/datasets/images", {"endpoint_url": ...})
    fs.cat_file(f"{root}/train/part-000000-….arrow")   # fetched once per node, then local

Like fsspec's own ``simplecache::``, reads (``open``, ``cat``) are served from whole-file
local copies, and listings, ``info`` and writes go to the target filesystem. Unlike it,
the cache is one per node with a byte budget shared by every process on it (LRU, never
evicting a file in use; see :mod:`storage.cache_index`), and it knows datasets: a file
named in the manifest (``index.json``) of its dataset is keyed by its content hash, so
a hit costs no request to the origin, and every fill is checked against the manifest's
hash. A fill that fails the check is fetched once more, then fails with a message
naming the shard. Every hit is checked against the xxh3 digest taken at fill time, so a
cached file damaged on disk is dropped and fetched again. Other files are keyed by
path, size and ETag/mtime (one ``info`` call per open) and only their size is checked;
``index.json`` itself is never cached: it is what switches a dataset to a new version.

Options (storage options; the environment gives the defaults):

``cache_dir``    ``$SWARM_CACHE_DIR`` or ``~/.cache/swarm/shards``
``cache_bytes``  ``$SWARM_CACHE_BYTES`` or 10GB (``512MiB``, ``2GB`` or a number)
``verify``       ``"always"`` (check every hit) or ``"fill"`` (check fills only)
``decoded``      also keep a decoded, uncompressed Arrow IPC copy of each shard, read
                 memory-mapped with zero copies by :meth:`open_table` (see BENCHMARKS.md);
                 unset, the reader decides (the loader: when the split fits half the budget)

Every other option goes to the target filesystem, so the storage options of a plain
``s3://`` URL (``endpoint_url``, ``anon``…) work unchanged with ``shardcache::s3://``.
"""

from __future__ import annotations

import hashlib
import io
import mmap
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc
from fsspec import filesystem
from fsspec.implementations.chained import ChainedFileSystem

from storage import formats, manifest as manifest_mod
from storage.atomic import DISK_FULL
from storage.cache_index import CacheDir, Pinned, fast_digest
from storage.dataset import check_bytes
from storage.errors import CacheError, ConfigError, IntegrityError
from storage.manifest import Manifest, ShardEntry
from storage.sizes import parse_bytes
from storage.urls import is_local

PROTOCOL = "shardcache"
ENV_DIR, ENV_BYTES = "SWARM_CACHE_DIR", "SWARM_CACHE_BYTES"
DEFAULT_DIR, DEFAULT_BYTES = "~/.cache/swarm/shards", "10GB"
VERIFY_MODES = ("always", "fill")
#: Files above this size are fetched as concurrent ranged reads of this size.
PART_BYTES = 16 << 20
_PARENTS_PROBED = 3


@dataclass
class CacheStats:
    """Counters of one process's use of the cache (hits and misses count files)."""

    hits: int = 0
    misses: int = 0
    bypassed: int = 0  # fetched but not stored: the budget was full of files in use
    corrupt_hits: int = 0  # cached copies that failed their digest and were fetched again
    refetches: int = 0  # fills that failed verification once
    bytes_fetched: int = 0
    bytes_local: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def as_dict(self) -> dict[str, float]:
        names = ("hits", "misses", "bypassed", "corrupt_hits", "refetches", "bytes_fetched", "bytes_local")
        return {**{n: getattr(self, n) for n in names}, "hit_rate": round(self.hit_rate, 4)}


@dataclass(frozen=True)
class _Expected:
    key: str
    name: str  # the shard name (or path) used in messages
    size: int | None
    entry: ShardEntry | None


class Held:
    """A whole, verified file content; while it is held, the cached copy stays on disk."""

    def __init__(self, buffer, pinned: Pinned | None = None, local: bool = False):
        self.buffer = buffer
        self.pinned = pinned
        self.local = local  # served from the cache without fetching
        self.table: pa.Table | None = None

    def release(self) -> None:
        self.buffer = None  # a mapping lives on while Arrow buffers still point into it
        if self.pinned is not None:
            self.pinned.close()
            self.pinned = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


class ShardCacheFileSystem(ChainedFileSystem):
    """A byte-budgeted, verified, node-wide whole-file cache over any fsspec filesystem."""

    protocol = PROTOCOL
    cachable = True

    def __init__(self, target_protocol: str | None = None, target_options: dict | None = None, fs=None,
                 fo: str | None = None, cache_dir: str | None = None, cache_bytes: int | str | None = None,
                 verify: str = "always", decoded: bool | None = None, wait_s: float = 2.0, **options: Any):
        super().__init__()
        if fs is None:
            if not target_protocol:
                raise ConfigError(
                    "shardcache needs a filesystem to cache: chain it in a URL like "
                    "'shardcache::s3://bucket/dataset' or pass fs="
                )
            fs = filesystem(target_protocol, **{**options, **(target_options or {})})
        if verify not in VERIFY_MODES:
            raise ConfigError(f"shardcache verify={verify!r} is not allowed; allowed: {', '.join(VERIFY_MODES)}")
        self.fs = fs
        self.root_hint = fs._strip_protocol(fo).rstrip("/") if isinstance(fo, str) and fo else None
        if cache_bytes is None:
            cache_bytes = os.environ.get(ENV_BYTES) or DEFAULT_BYTES
        budget = parse_bytes(cache_bytes, "shardcache cache_bytes")
        self.cache = CacheDir(cache_dir or os.environ.get(ENV_DIR) or DEFAULT_DIR, budget)
        self.verify = verify
        self.decoded = None if decoded is None else bool(decoded)  # None: the reader decides
        self.wait_s = float(wait_s)
        self.stats = CacheStats()
        self._manifests: dict[str, dict[str, ShardEntry]] = {}
        self._probed: set[str] = set()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ paths and manifests

    def _target(self, path: str) -> str:
        return self.fs._strip_protocol(self._strip_protocol(path))

    def register_manifest(self, root: str, manifest: Manifest) -> None:
        """Tell the cache the shards of the dataset at ``root`` (saves it reading index.json)."""
        by_name = {s.name: s for s in manifest.shards}
        with self._lock:
            self._manifests[self._target(root).rstrip("/")] = by_name

    def _entry_for(self, path: str) -> ShardEntry | None:
        entry = self._lookup(path)
        if entry is not None:
            return entry
        parents = [path.rsplit("/", i)[0] for i in range(1, _PARENTS_PROBED + 1) if path.count("/") >= i]
        hint = [self.root_hint] if self.root_hint and path.startswith(self.root_hint + "/") else []
        for root in dict.fromkeys(hint + parents):
            with self._lock:
                if root in self._probed:
                    continue
                self._probed.add(root)
            found = manifest_mod.read_if_exists(self.fs, root)
            if found is not None:
                self.register_manifest(root, found)
                entry = self._lookup(path)
                if entry is not None:
                    return entry
        return None

    def _lookup(self, path: str) -> ShardEntry | None:
        with self._lock:
            for root, by_name in self._manifests.items():
                if path.startswith(root + "/") and path[len(root) + 1:] in by_name:
                    return by_name[path[len(root) + 1:]]
        return None

    def _expected(self, path: str, entry: ShardEntry | None) -> _Expected:
        entry = entry or self._entry_for(path)
        if entry is not None:
            return _Expected(_content_key(entry.hash), entry.name, entry.bytes, entry)
        info = self.fs.info(path)
        version = next((str(info[k]) for k in ("ETag", "etag", "mtime", "LastModified", "created") if info.get(k)), "")
        ident = f"{self.fs.unstrip_protocol(path)}|{info.get('size')}|{version}"
        return _Expected("file-" + hashlib.sha256(ident.encode()).hexdigest()[:40], path, info.get("size"), None)

    # ------------------------------------------------------------------ the cache protocol

    def hold(self, path: str, entry: ShardEntry | None = None, pin: bool = False) -> Held:
        """The whole verified content of ``path``, from the cache or fetched into it.

        With ``pin``, a freshly fetched file is served from its cached copy, held open,
        like a hit; otherwise from the fetched bytes.
        """
        path = self._target(path)
        expected = self._expected(path, entry)
        held = self._hit(expected)
        if held is not None:
            return held
        with self.cache.fill_lock(expected.key):
            held = self._hit(expected)  # another process may have filled it while we waited
            if held is not None:
                return held
            data = self._fetch_verified(path, expected)
            if self._store(expected.key, expected.name, data) and pin:
                pinned = self.cache.open_pinned(expected.key)
                if pinned is not None:
                    return Held(_map(pinned), pinned)
            return Held(data)

    def _hit(self, expected: _Expected) -> Held | None:
        pinned = self.cache.open_pinned(expected.key)
        if pinned is None:
            return None
        if expected.size is not None and pinned.size != expected.size:
            return self._drop_corrupt(pinned, expected.key)
        buffer = _map(pinned)
        if self.verify == "always" and fast_digest(buffer) != pinned.digest:
            return self._drop_corrupt(pinned, expected.key)
        self.stats.add(hits=1, bytes_local=pinned.size)
        return Held(buffer, pinned, local=True)

    def _drop_corrupt(self, pinned: Pinned, key: str) -> None:
        pinned.close()
        self.cache.remove(key)
        self.stats.add(corrupt_hits=1)
        return None

    def _fetch_verified(self, path: str, expected: _Expected) -> bytes:
        self.stats.add(misses=1)
        for attempt in (1, 2):
            data = self._download(path, expected.size)
            self.stats.add(bytes_fetched=len(data))
            try:
                _check(data, expected, where=self.fs.unstrip_protocol(path))
                return data
            except IntegrityError as exc:
                if attempt == 2:
                    raise IntegrityError(
                        f"shard {expected.name!r} failed verification twice when fetched from "
                        f"{self.fs.unstrip_protocol(path)!r}: {exc}. The stored copy is damaged; "
                        "stage the dataset again (swarm stage …) to rewrite it"
                    ) from None
                self.stats.add(refetches=1)
        raise AssertionError("unreachable")

    def _download(self, path: str, size: int | None) -> bytes:
        if size and size > PART_BYTES and not is_local(self.fs):
            starts = list(range(0, size, PART_BYTES))
            ends = [min(size, s + PART_BYTES) for s in starts]
            return b"".join(self.fs.cat_ranges([path] * len(starts), starts, ends, on_error="raise"))
        return self.fs.cat_file(path)

    def _store(self, key: str, name: str, data) -> bool:
        try:
            reservation = self.cache.reserve(key, len(data), self.wait_s)
            if reservation is None:
                self.stats.add(bypassed=1)
                return False
            try:
                reservation.commit(reservation.write(data))
            except BaseException:
                reservation.abort()
                raise
        except OSError as exc:
            if exc.errno not in DISK_FULL:
                raise
            raise CacheError(
                f"the shard cache folder {self.cache.root!r} has no room for {name!r} ({len(data):,} bytes): "
                f"{exc.strerror}; nothing half-written was left in it. Free space there, point the cache at a "
                "larger disk (SWARM_CACHE_DIR, or the cache_dir storage option), or give it a budget the free "
                "space holds (SWARM_CACHE_BYTES, or cache_bytes)"
            ) from None
        return True

    # ------------------------------------------------------------------ tables (the loader's way in)

    def open_table(self, path: str, entry: ShardEntry, shard_format: str, decoded: bool | None = None) -> Held:
        """A shard decoded into an Arrow table (``held.table``); release it when done.

        With the decoded tier (``decoded``, else the filesystem's option) the table is
        memory-mapped from an uncompressed local copy of one record batch (zero copies,
        no decompression, one array per column); that copy is made on the first read.
        """
        path = self._target(path)
        if not (self.decoded if decoded is None else decoded):
            held = self.hold(path, entry)
            held.table = formats.get(shard_format).decode(pa.py_buffer(held.buffer))
            return held
        decoded_key = _Expected(_content_key(entry.hash) + "-ipc", entry.name, None, None)
        held = self._decoded_hit(decoded_key)
        if held is not None:
            return held
        with self.cache.fill_lock(decoded_key.key):
            held = self._decoded_hit(decoded_key)  # another process may have made it meanwhile
            if held is not None:
                return held
            # The decoded copy replaces the compressed one: a fetched shard is not stored
            # compressed, and a compressed copy already here goes once it is decoded.
            expected = self._expected(path, entry)
            source = self._hit(expected) or Held(self._fetch_verified(path, expected))
            with source:
                table = formats.get(shard_format).decode(pa.py_buffer(source.buffer))
                was_local = source.local
            if self._store(decoded_key.key, entry.name, _decoded_ipc(table)) and was_local:
                self.cache.discard(expected.key)
        held = Held(None, local=was_local)
        held.table = table
        return held

    def _decoded_hit(self, expected: _Expected) -> Held | None:
        held = self._hit(expected)
        if held is not None:
            held.table = ipc.open_file(pa.py_buffer(held.buffer)).read_all()
        return held

    # ------------------------------------------------------------------ fsspec API

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs) -> bytes:
        path = self._target(path)
        if _never_cached(path):
            return self.fs.cat_file(path, start=start, end=end, **kwargs)
        with self.hold(path) as held:
            return bytes(memoryview(held.buffer)[start:end]) if (start or end) else bytes(held.buffer)

    def _open(self, path: str, mode: str = "rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        path = self._target(path)
        if "r" not in mode or _never_cached(path):
            return self.fs.open(path, mode=mode, block_size=block_size, autocommit=autocommit,
                                cache_options=cache_options, **kwargs)
        held = self.hold(path, pin=True)
        if held.pinned is None:
            return io.BytesIO(held.buffer)
        return _PinnedReader(held.pinned)  # verified; the pin lasts until it is closed

    def ls(self, path: str, detail: bool = True, **kwargs):
        return self.fs.ls(self._target(path), detail=detail, **kwargs)

    def info(self, path: str, **kwargs):
        return self.fs.info(self._target(path), **kwargs)

    def pipe_file(self, path: str, value: bytes, **kwargs) -> None:
        self.fs.pipe_file(self._target(path), value, **kwargs)

    def rm_file(self, path: str) -> None:
        self.fs.rm_file(self._target(path))

    def rm(self, path, recursive: bool = False, maxdepth=None) -> None:
        self.fs.rm(self._target(path) if isinstance(path, str) else [self._target(p) for p in path],
                   recursive=recursive, maxdepth=maxdepth)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs) -> None:
        self.fs.mkdir(self._target(path), create_parents=create_parents, **kwargs)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.fs.makedirs(self._target(path), exist_ok=exist_ok)


def _decoded_ipc(table: pa.Table) -> pa.Buffer:
    """An uncompressed IPC file of one record batch: each column maps as one array."""
    sink = pa.BufferOutputStream()
    if any(col.num_chunks > 1 for col in table.columns):
        table = table.combine_chunks()
    with ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=max(1, table.num_rows))
    return sink.getvalue()


def _content_key(digest: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "-", digest)[:100]


def _never_cached(path: str) -> bool:
    return path.rsplit("/", 1)[-1] == manifest_mod.MANIFEST_NAME


def _check(data: bytes, expected: _Expected, where: str) -> None:
    if expected.entry is not None:
        check_bytes(data, expected.entry, where)
    elif expected.size is not None and len(data) != expected.size:
        raise IntegrityError(f"{where!r} has {len(data)} bytes, its listing says {expected.size}")


def _map(pinned: Pinned):
    if pinned.size == 0:
        return b""
    with pinned.open() as reader:  # the mapping keeps a descriptor of its own, without the lock
        return mmap.mmap(reader.fileno(), 0, access=mmap.ACCESS_READ)


class _PinnedReader(io.BufferedReader):
    """A cached file opened for reading; closing it releases the pin."""

    def __init__(self, pinned: Pinned):
        super().__init__(pinned.open())
        self._pinned = pinned

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._pinned.close()
