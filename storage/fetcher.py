"""Shard reads ahead of the consumer: a known future order, N reads in flight.

The loader knows, from the epoch's plan, every shard it will read and in which order;
:class:`ShardFetcher` keeps ``depth`` of those reads (fetch through the cache, verify,
decode) running on a thread pool (the process's, kept from one epoch to the next: no
threads to start when an epoch begins) and hands the results back in order. Arrow, hashing
and socket reads release the GIL, so on a CPU the reads overlap decoding and compute.

:class:`LoaderCounters` carries read statistics from ``DataLoader`` worker processes
to the training process through a small shared-memory array (anonymous shared memory:
nothing is left behind when a process dies).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait as futures_wait
from typing import Callable, Generic, Iterable, TypeVar

import numpy as np

Item = TypeVar("Item")
Result = TypeVar("Result")

MAX_DEPTH = 32


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def read_pool() -> ThreadPoolExecutor:
    """The process's thread pool for shard reads, shared by every reader in it.

    ``MAX_DEPTH`` threads, started as reads need them and kept from one epoch (or loader)
    to the next, so an epoch does not begin by starting threads. A forked child (a
    ``DataLoader`` worker) makes its own: the fork hook below forgets the parent's.
    """
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=MAX_DEPTH, thread_name_prefix="swarm-read")
        return _pool


def _after_fork() -> None:
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


class ShardFetcher(Generic[Item, Result]):
    """``map(read, items)`` in order, with up to ``depth`` reads running ahead on the
    process's :func:`read_pool`."""

    def __init__(self, read: Callable[[Item], Result], items: Iterable[Item], depth: int = 4,
                 size: Callable[[Item], int] = lambda item: 0):
        self._read = read
        self._items = iter(items)
        self._size = size
        self._pending: deque[tuple[Future, int]] = deque()
        self._pool = read_pool()
        self._lock = threading.Lock()
        self.depth = depth
        self.wait_s = 0.0  # time the consumer waited for a read to finish
        self.bytes_in_flight = 0
        self._closed = False

    @property
    def depth(self) -> int:
        return self._depth

    @depth.setter
    def depth(self, value: int) -> None:
        self._depth = max(1, min(MAX_DEPTH, int(value)))

    def _refill(self) -> None:
        while len(self._pending) < self._depth:
            try:
                item = next(self._items)
            except StopIteration:
                return
            size = self._size(item)
            self._pending.append((self._pool.submit(self._read, item), size))
            with self._lock:
                self.bytes_in_flight += size

    def __iter__(self):
        return self

    def __next__(self) -> Result:
        if self._closed:
            raise StopIteration
        self._refill()
        if not self._pending:
            raise StopIteration
        future, size = self._pending.popleft()
        start = time.perf_counter()
        try:
            result = future.result()
        finally:
            self.wait_s += time.perf_counter() - start
            with self._lock:
                self.bytes_in_flight -= size
        self._refill()
        return result

    def close(self, wait: bool = False) -> None:
        """Stop reading ahead; results nobody will consume are released.

        With ``wait``, return only once the reads already running have ended: after an
        error, nothing of this reader is still writing (a cache fill, say) when it surfaces.
        """
        self._closed = True
        running = []
        while self._pending:
            future, _ = self._pending.popleft()
            if not future.cancel():
                future.add_done_callback(_release_result)
                running.append(future)
        self.bytes_in_flight = 0
        if wait:
            futures_wait(running)


def _release_result(future: Future) -> None:
    if future.exception() is None and hasattr(future.result(), "release"):
        future.result().release()


class LoaderCounters:
    """Per-worker read counters in shared memory: workers add, the training process sums."""

    FIELDS = ("hits", "misses", "bytes_fetched", "bytes_local", "fetch_wait_s", "bytes_in_flight", "batches")
    SLOTS = 64  # loader workers per process, at most

    def __init__(self):
        self._array = multiprocessing.RawArray("d", self.SLOTS * len(self.FIELDS))

    def _index(self, slot: int, field: str) -> int:
        return (slot % self.SLOTS) * len(self.FIELDS) + _FIELD_INDEX[field]

    def add(self, slot: int, **values: float) -> None:
        for field, value in values.items():
            self._array[self._index(slot, field)] += value

    def set(self, slot: int, **values: float) -> None:
        for field, value in values.items():
            self._array[self._index(slot, field)] = value

    def total(self) -> dict[str, float]:
        table = np.frombuffer(self._array, dtype=np.float64).reshape(self.SLOTS, len(self.FIELDS)).sum(axis=0)
        sums = {f: float(v) for f, v in zip(self.FIELDS, table)}
        reads = sums["hits"] + sums["misses"]
        sums["hit_rate"] = sums["hits"] / reads if reads else 0.0
        return sums

    def reset(self) -> None:
        np.frombuffer(self._array, dtype=np.float64)[:] = 0.0


_FIELD_INDEX = {field: i for i, field in enumerate(LoaderCounters.FIELDS)}
