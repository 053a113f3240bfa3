"""A staged dataset as a torch ``IterableDataset`` of batches, in a resumable order.

    ds = StreamingDataset("s3://bucket/images", split="train", batch_size=256, seed=0,
                          rank=rank, world_size=world_size)   # remote: node cache in front
    for epoch in range(start_epoch, epochs):
        ds.set_epoch(epoch)
        for batch in Prefetcher(ds, device="cuda"):      # or DataLoader(ds, batch_size=None, …)
            batch["image"]   # uint8 (B, 3, 32, 32)     batch["label"]  int64 (B,)

It yields whole batches, dicts of tensors: one gather per batch instead of collating
samples one by one, and one shared-memory transfer per batch from ``DataLoader``
workers (give the ``DataLoader`` ``batch_size=None``). Numeric columns, and fixed-size
lists of numbers shaped by their ``swarm.shape`` metadata, become tensors that point
into the Arrow buffers where no gather is needed (``shuffle="none"``/``"shard"`` within
a record batch); those zero-copy tensors are read-only views. A transform per column
(``transforms={"image": fn}``) runs on each batch's column (a numpy array, or an Arrow
array for strings and binary) and returns a numpy array or a tensor.

The order (see :mod:`storage.order`) depends only on (seed, epoch, world size, rank,
loader workers): every rank gets ``len(ds)`` batches, each sample is read once per epoch
across ranks and workers, and :meth:`state_dict` / :meth:`load_state_dict` resume an
interrupted epoch exactly (with the same number of loader workers).
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import Future
from contextlib import contextmanager
from functools import partial
from multiprocessing.context import get_spawning_popen
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import IterableDataset, get_worker_info

from storage import formats, order
from storage.batches import BufferProvider, Piece, StreamReader
from storage.cache import PROTOCOL, ShardCacheFileSystem
from storage.columns import ColumnSpec, chunk_arrays, column_specs
from storage.dataset import Dataset, check_bytes, check_rows, path_inside
from storage.errors import ConfigError
from storage.fetcher import LoaderCounters, read_pool
from storage.manifest import ShardEntry
from storage.order import OrderSpec, Span
from storage.urls import is_local, url_to_fs

# Zero-copy tensors view read-only Arrow / mmap memory; torch warns about that on every batch.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", module=r"storage\.")

STATE_VERSION = 1
#: Default shuffle window: about this many decoded bytes of rows (and at least 4 batches).
BLOCK_BYTES = 16 << 20
Transform = Callable[[Any], Any]


class StreamingDataset(IterableDataset):
    """Batches of a staged dataset's split for one rank (see the module docstring).

    Args:
        url: the dataset root, any fsspec URL (``s3://…``, a path, ``shardcache::s3://…``).
        split: which split to read (``train``, ``val``).
        batch_size: rows per batch; every rank gets the same number of batches.
        seed: the order's seed, constant over a training run.
        shuffle: ``"block"`` (shards, then rows within a window; default), ``"shard"``
            (shard order only), ``"none"``; ``True``/``False`` mean ``"block"``/``"none"``.
        block_size: rows in a shuffle window (default: ~16 MB of rows, at least 4 batches).
        drop_last: leave out the tail that does not fill a batch on every rank, so all
            batches are full; otherwise every sample is read and a rank's last batch or
            two are smaller.
        columns: the columns to read (default: all).
        transforms: ``{column: fn}`` applied to each batch's column (decode, normalize).
        batch_transform: ``fn(batch) -> batch`` applied after them to the whole batch (columns as
            numpy or Arrow arrays), e.g. to assemble several columns into one model input.
        arrow_columns: columns kept as Arrow arrays (numbers with nulls, for a transform to fill).
        rank, world_size: default to ``torch.distributed`` when it is initialised, else 0, 1.
        storage_options: fsspec options (``endpoint_url``…, and the cache's ``cache_dir``,
            ``cache_bytes``, ``decoded``, ``verify``).
        cache: read through the node's shard cache: ``"auto"`` (remote URLs only), True, False.
        shard_depth: shard reads kept in flight per reader.
        index_key: if set, each batch also holds the split-wide sample ids under this key.
        verify: check shard hashes on direct (uncached) reads, a local file once per process
            (then it is memory-mapped); cache fills and hits always are.
        decoded: keep and read the cache's decoded tier (memory-mapped, uncompressed Arrow):
            ``"auto"`` (default) when the split's decoded bytes fit half the cache budget,
            unless the storage options set ``decoded``; True; False.
    """

    def __init__(self, url: str, split: str = "train", batch_size: int = 256, *, seed: int = 0,
                 shuffle: str | bool = order.DEFAULT_SHUFFLE, block_size: int | None = None, drop_last: bool = False,
                 columns: list[str] | None = None, transforms: dict[str, Transform] | None = None,
                 rank: int | None = None, world_size: int | None = None,
                 storage_options: dict[str, Any] | None = None, cache: bool | str = "auto", shard_depth: int = 4,
                 index_key: str | None = None, verify: bool = True, decoded: bool | str = "auto",
                 batch_transform: Transform | None = None, arrow_columns: set[str] | None = None):
        super().__init__()
        if cache not in (True, False, "auto"):
            raise ConfigError(f"cache={cache!r} is not allowed; allowed: True, False, 'auto'")
        self.url = url
        self.storage_options = dict(storage_options or {})
        self._read_url = _with_cache(url, cache)
        dataset = Dataset.open(self._read_url, self.storage_options)
        self.manifest = dataset.manifest
        self.split = split
        self.shards: list[ShardEntry] = dataset.shards(split)
        self.shard_rows = np.array([s.rows for s in self.shards], dtype=np.int64)
        self.shard_offsets = np.concatenate([[0], np.cumsum(self.shard_rows)[:-1]]).astype(np.int64)
        self.specs: list[ColumnSpec] = column_specs(self.manifest.schema, columns, set(arrow_columns or ()))
        self.transforms = dict(transforms or {})
        self.batch_transform = batch_transform
        self._check_transforms(index_key)
        self.index_key = index_key
        rank, world_size = _distributed(rank, world_size)
        shuffle = {True: order.DEFAULT_SHUFFLE, False: "none"}.get(shuffle, shuffle)
        self.base_spec = OrderSpec(seed=seed, epoch=0, world_size=world_size, rank=rank, batch_size=batch_size,
                                   shuffle=shuffle, drop_last=drop_last,
                                   block_size=block_size or self._default_block(batch_size))
        self.batches_per_epoch = order.rank_batch_count(int(self.shard_rows.sum()), self.base_spec)
        self.shard_depth = shard_depth
        self.verify = verify
        self._checked: set[str] = set()  # shards this process found inside the root and (verify) intact
        if decoded not in (True, False, "auto"):
            raise ConfigError(f"decoded={decoded!r} is not allowed; allowed: True, False, 'auto'")
        self.decoded = decoded
        self.epoch = 0
        self.consumed = 0  # batches yielded by in-process iteration of this epoch
        self._resume: dict | None = None
        self._counters: LoaderCounters | None = LoaderCounters()  # before any worker forks
        self._fs_pid: int | None = None
        self._preloaded: dict[tuple[int, Span], Future] = {}

    # ------------------------------------------------------------------ configuration

    def _check_transforms(self, index_key: str | None) -> None:
        names = [s.name for s in self.specs]
        stray = [c for c in self.transforms if c not in names]
        if stray:
            raise ConfigError(f"transforms name column(s) {', '.join(map(repr, stray))} that are not read; "
                              f"columns: {', '.join(names)}")
        for spec in self.specs:
            if not spec.numeric and spec.name not in self.transforms and self.batch_transform is None:
                typ = self.manifest.schema.field(spec.name).type
                raise ConfigError(
                    f"column {spec.name!r} is {typ}, which has no tensor layout; give a transform for it "
                    f"(transforms={{{spec.name!r}: fn}}) or leave it out of columns"
                )
        if index_key is not None and index_key in names:
            raise ConfigError(f"index_key {index_key!r} is already a column name; pick another")

    def _default_block(self, batch_size: int) -> int:
        row_bytes = sum(s.row_bytes for s in self.specs)
        if any(not s.numeric for s in self.specs):  # binary (encoded images), strings: their stored bytes a row
            row_bytes += sum(s.raw_bytes for s in self.shards) // max(1, int(self.shard_rows.sum()))
        return max(4 * batch_size, BLOCK_BYTES // max(1, row_bytes))

    def spec(self, num_workers: int = 1) -> OrderSpec:
        return OrderSpec(**{**self.base_spec.__dict__, "epoch": self.epoch, "num_workers": num_workers})

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the same on every rank)."""
        return self.batches_per_epoch

    @property
    def batch_size(self) -> int:
        return self.base_spec.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration follows (call before each epoch)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ConfigError(f"epoch must be an integer >= 0, got {epoch!r}")
        if self._resume is not None and self._resume["epoch"] != epoch:
            self._resume = None
        self.epoch = epoch
        self.consumed = 0

    # ------------------------------------------------------------------ resume

    def state_dict(self, batches: int | None = None, num_workers: int = 1) -> dict:
        """Where this rank is in its epoch, to save with a checkpoint.

        ``batches`` is how many batches of this epoch the training loop has consumed;
        by default, what in-process iteration has yielded. With ``DataLoader`` workers
        the loader cannot see that: use :class:`storage.prefetch.Prefetcher`, or count
        and pass it with the ``DataLoader``'s ``num_workers``.
        """
        spec = self.base_spec
        return {
            "version": STATE_VERSION, "epoch": self.epoch,
            "batches": self.consumed if batches is None else int(batches), "num_workers": int(num_workers),
            "seed": spec.seed, "world_size": spec.world_size, "rank": spec.rank, "batch_size": spec.batch_size,
            "shuffle": spec.shuffle, "block_size": spec.block_size, "drop_last": spec.drop_last,
            "split": self.split, "dataset": self.manifest.content_hash(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue the saved epoch from its next batch on the next iteration."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ConfigError(f"not a loader state of version {STATE_VERSION}: {state!r:.200}")
        mine = self.state_dict()
        for key in ("seed", "world_size", "rank", "batch_size", "shuffle", "block_size", "drop_last", "split",
                    "dataset"):
            if state.get(key) != mine[key]:
                raise ConfigError(f"loader state has {key}={state.get(key)!r} but this loader has {mine[key]!r}; "
                                  "an exact resume needs the same data, order settings and rank")
        if not 0 <= int(state["batches"]) <= len(self):
            raise ConfigError(f"loader state has batches={state['batches']!r}; allowed: 0..{len(self)}")
        self.epoch = int(state["epoch"])
        self._resume = {"epoch": self.epoch, "batches": int(state["batches"]),
                        "num_workers": int(state.get("num_workers", 1))}
        self.consumed = int(state["batches"])

    def resume_offset(self, num_workers: int = 1) -> int:
        """Batches of the current epoch a loaded state says are done (0 without one)."""
        return self._start(num_workers)

    def forget_resume(self) -> None:
        """Drop a loaded state once the workers that resume from it have started."""
        self._resume = None

    def _start(self, num_workers: int) -> int:
        resume = self._resume
        if resume is None or resume["epoch"] != self.epoch:
            return 0
        if resume["num_workers"] != num_workers:
            raise ConfigError(
                f"the loader state was saved with {resume['num_workers']} loader worker(s) and this run has "
                f"{num_workers}; the order depends on the worker count, so resume with the same number"
            )
        return resume["batches"]

    # ------------------------------------------------------------------ reading

    def counters(self) -> LoaderCounters:
        """Read statistics, summed over this process and its ``DataLoader`` workers."""
        if self._counters is None:
            self._counters = LoaderCounters()
        return self._counters

    def _filesystem(self):
        # The dataset may cross a fork into DataLoader workers: open storage once per process.
        if self._fs_pid != os.getpid():
            self._fs, root = url_to_fs(self._read_url, self.storage_options)
            self._root = root.rstrip("/")
            if isinstance(self._fs, ShardCacheFileSystem):
                self._fs.register_manifest(self._root, self.manifest)
            self._cache_delta = _CacheDelta(self._fs)  # per process: preloads count in the next epoch
            self._fs_pid = os.getpid()
        return self._fs

    def preload(self, epoch: int) -> None:
        """Start reading the first shuffle window of ``epoch`` (in-process iteration only).

        The prefetcher calls this when the current epoch's last batch is made, so the next
        epoch starts without waiting for its first shards.
        """
        plan = order.plan_stream(self.shard_rows, OrderSpec(**{**self.base_spec.__dict__, "epoch": epoch}), 0)
        if not plan.spans:
            return
        window_end = plan.block_bounds(0)[1] if plan.shuffled else int(plan.offsets[1])
        count = int(np.searchsorted(plan.span_ends, window_end, side="left")) + 1
        self._filesystem()
        for span in plan.spans[:count]:
            self._preloaded[(epoch, span)] = read_pool().submit(self._read_span_now, span)

    def _drop_preloaded(self, keep_epoch: int | None) -> None:
        for key in [k for k in self._preloaded if k[0] != keep_epoch]:
            future = self._preloaded.pop(key, None)
            if future is not None and not future.cancel():
                future.add_done_callback(lambda f: f.exception() is None and f.result().release())

    def _read_span(self, span: Span, epoch: int | None = None) -> Piece:
        future = self._preloaded.pop((epoch, span), None) if self._preloaded else None
        return future.result() if future is not None else self._read_span_now(span)

    def _read_span_now(self, span: Span) -> Piece:
        fs = self._filesystem()
        entry = self.shards[span.shard]
        checked = entry.name in self._checked
        path = f"{self._root}/{entry.name}" if checked else path_inside(fs, self._root, entry.name)
        fmt = self.manifest.shard_format
        held = None
        if isinstance(fs, ShardCacheFileSystem):
            held = fs.open_table(path, entry, fmt, decoded=self._decoded_tier(fs))
            table = held.table
        elif is_local(fs) and (checked or not self.verify):
            table = formats.get(fmt).decode(pa.memory_map(path))
        else:
            data = fs.cat_file(path)
            if self.verify:
                check_bytes(data, entry, where=path)
            table = formats.get(fmt).decode(data)
        check_rows(table, entry, where=path)
        self._checked.add(entry.name)
        table = table.slice(span.start, span.rows)
        chunks = [(chunk_arrays(b, self.specs), b.num_rows) for b in table.to_batches() if b.num_rows]
        return Piece(chunks, held)

    def _decoded_tier(self, fs: ShardCacheFileSystem) -> bool:
        if self.decoded != "auto":
            return bool(self.decoded)
        if fs.decoded is not None:
            return fs.decoded
        # Decoded copies are larger than compressed ones: only where the split fits easily.
        raw = sum(s.raw_bytes for s in self.shards)
        return 0 < raw <= fs.cache.budget // 2

    @contextmanager
    def stream(self, consumed: int = 0, worker: int = 0, num_workers: int = 1,
               fetch_depth: Callable[[], int] | None = None) -> Iterator[tuple[order.StreamPlan, StreamReader]]:
        """The plan and reader of this worker's stream of the current epoch, its read counters
        hooked up (by :meth:`numpy_batches`, and by :mod:`storage.device_gather`)."""
        plan = order.plan_stream(self.shard_rows, self.spec(num_workers),
                                 order.stream_for_worker(worker, num_workers, consumed))
        self._filesystem()
        counters, cache_stats = self.counters(), self._cache_delta

        def report(fetcher, batches: int) -> None:  # every few batches: see StreamReader.REPORT_EVERY
            counters.add(worker, batches=batches, fetch_wait_s=fetcher.wait_s, **cache_stats.delta())
            counters.set(worker, bytes_in_flight=fetcher.bytes_in_flight)
            fetcher.wait_s = 0.0

        epoch = self.epoch
        self._drop_preloaded(keep_epoch=epoch)
        reader = StreamReader(plan, partial(self._read_span, epoch=epoch), lambda span: self.shards[span.shard].bytes,
                              self.specs, depth=self.shard_depth, fetch_depth=fetch_depth,
                              on_progress=report)
        try:
            yield plan, reader
        finally:
            counters.set(worker, bytes_in_flight=0)
            self._drop_preloaded(keep_epoch=epoch + 1)  # a resumed epoch may not have used them

    def numpy_batches(self, consumed: int = 0, worker: int = 0, num_workers: int = 1,
                      out: BufferProvider | None = None, fetch_depth: Callable[[], int] | None = None
                      ) -> Iterator[dict[str, Any]]:
        """This worker's batches of the current epoch from rank batch ``consumed`` on, as numpy.

        ``out(rows)`` may supply the arrays numeric columns are gathered into (reusable,
        e.g. pinned); ``fetch_depth()`` may change the shard reads in flight as it goes.
        """
        with self.stream(consumed, worker, num_workers, fetch_depth) as (plan, reader):
            for lo, hi, arrays in reader.batches(plan.first_batch(consumed), out):
                if self.index_key:
                    arrays[self.index_key] = plan.sample_ids(lo, hi, self.shard_offsets)
                yield arrays

    def finish(self, arrays: dict[str, Any]) -> dict[str, Any]:
        """Apply the column transforms and make tensors (no copy for numpy arrays)."""
        for name, fn in self.transforms.items():
            arrays[name] = fn(arrays[name])
        if self.batch_transform is not None:
            arrays = self.batch_transform(arrays)
        return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in arrays.items()}

    def batches(self, out: BufferProvider | None = None, fetch_depth: Callable[[], int] | None = None
                ) -> Iterator[dict[str, Any]]:
        """This process's batches (all of the rank's, or a ``DataLoader`` worker's share)."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        consumed = self._start(workers)
        in_process = info is None
        if in_process:
            self._resume = None
            self.consumed = consumed
        for arrays in self.numpy_batches(consumed, worker, workers, out=out, fetch_depth=fetch_depth):
            if in_process:
                self.consumed += 1
            yield self.finish(arrays)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.batches()

    def __getstate__(self):
        state = dict(self.__dict__)
        for key in ("_fs", "_root", "_cache_delta"):
            state.pop(key, None)
        state["_fs_pid"] = None
        state["_preloaded"] = {}
        state["_checked"] = set()
        if get_spawning_popen() is None:  # shared counters only travel to worker processes
            state["_counters"] = None
        return state


class _CacheDelta:
    """Cache counters of this process since the last call."""

    FIELDS = ("hits", "misses", "bytes_fetched", "bytes_local")

    def __init__(self, fs):
        self.stats = getattr(fs, "stats", None)
        self.last = self._now()

    def _now(self) -> dict[str, float]:
        return {f: getattr(self.stats, f) for f in self.FIELDS} if self.stats is not None else {}

    def delta(self) -> dict[str, float]:
        now = self._now()
        out = {f: now[f] - self.last[f] for f in now}
        self.last = now
        return out


def _with_cache(url: str, cache: bool | str) -> str:
    if url.startswith(f"{PROTOCOL}::") or cache is False:
        return url
    if cache == "auto":
        inner = url.split("::")[-1]
        remote = "://" in inner and not inner.startswith(("file://", "local://", "memory://"))
        return f"{PROTOCOL}::{url}" if remote else url
    return f"{PROTOCOL}::{url}"


def _distributed(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
    return (0 if rank is None else rank), (1 if world_size is None else world_size)
