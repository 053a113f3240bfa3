"""An asyncio micro-batcher: rows of many requests grouped into batches by size and wait.

A batch closes when it holds ``max_batch_size`` rows or when its oldest row has waited
``max_wait_s``; it then goes to a free executor (see :class:`Executors`). While every
executor is busy the batch keeps filling up to its size, since it could not start anyway.
Rows that arrived while a batch was computing have waited already: once an executor is
free they go at once, without waiting out ``max_wait_s`` again, so under steady load one
batch fills while another computes (``max_wait_s`` holds back only a request that finds
the server idle).
A request larger than a batch is split across batches and reassembled in order. Rows
waiting for a batch are bounded (``max_queue_rows``): past that, :class:`QueueFull`.
:meth:`MicroBatcher.close` stops accepting, runs every waiting row without waiting for
deadlines and returns when every accepted request has its answer.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

import numpy as np


class QueueFull(Exception):
    """The batcher already holds its maximum of waiting rows; retry later (HTTP 429)."""


class BatcherClosed(Exception):
    """The batcher is shutting down and accepts no more requests (HTTP 503)."""


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 32
    max_wait_s: float = 0.005
    max_queue_rows: int = 1024

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_wait_s < 0 or self.max_queue_rows < 1:
            raise ValueError(f"invalid batch policy {self}: sizes must be >= 1 and the wait >= 0")


class Executors(Protocol):
    """Where batches run: ``pick()`` returns a free executor (or None when all are busy);
    ``executor.run(rows)`` takes the executor's capacity at once and returns an awaitable
    of one output row per input row."""

    def pick(self) -> Any: ...


class _Request:
    __slots__ = ("rows", "taken", "left", "parts", "future", "arrived")

    def __init__(self, rows: np.ndarray, future: asyncio.Future, arrived: float):
        self.rows, self.future, self.arrived = rows, future, arrived
        self.taken = 0  # rows already put into batches
        self.left = len(rows)  # rows without an answer yet
        self.parts: list[tuple[int, np.ndarray]] = []


class MicroBatcher:
    def __init__(self, executors: Executors, policy: BatchPolicy,
                 on_batch: Callable[[int, int], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.executors, self.policy, self.on_batch, self.clock = executors, policy, on_batch, clock
        self._queue: deque[_Request] = deque()
        self.queued_rows = 0
        self._in_flight: set[asyncio.Task] = set()
        self._wake = asyncio.Event()
        self._draining = False
        self._closed = False
        self._loop_task: asyncio.Task | None = None
        self._last_done = float("-inf")  # when a batch last finished

    @property
    def in_flight_batches(self) -> int:
        return len(self._in_flight)

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")
            self._loop_task.add_done_callback(self._stopped)

    def _stopped(self, task: asyncio.Task) -> None:
        """If the batching loop ever dies, fail what waits rather than leave it hanging."""
        error = None if task.cancelled() else task.exception()
        if error is None and not task.cancelled():
            return
        self._closed = True
        while self._queue:
            req = self._queue.popleft()
            if not req.future.done():
                req.future.set_exception(RuntimeError(f"the batching loop stopped: {error!r}"))
        self.queued_rows = 0

    def submit(self, rows: np.ndarray) -> Awaitable[np.ndarray]:
        """Queue ``rows`` (an array of one or more rows); await the result for their outputs.
        Raises :class:`QueueFull` or :class:`BatcherClosed` at once, before queueing anything."""
        if self._closed:
            raise BatcherClosed("the server is shutting down")
        n = len(rows)
        if n == 0:
            raise ValueError("a request needs at least one row")
        if self.queued_rows + n > self.policy.max_queue_rows:
            raise QueueFull(f"the queue is full ({self.queued_rows} rows waiting, at most {self.policy.max_queue_rows})")
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Request(rows, future, self.clock()))
        self.queued_rows += n
        self._wake.set()
        return future

    def poke(self) -> None:
        """Executors changed (one freed or added): look for a free one again."""
        self._wake.set()

    def drain(self) -> None:
        """Run waiting rows as soon as an executor is free, without waiting for deadlines."""
        self._draining = True
        self._wake.set()

    async def close(self) -> None:
        """Stop accepting, run every waiting row and wait until all batches have answered."""
        self._closed = True
        self.drain()
        if self._loop_task is not None:
            await self._loop_task
        while self._in_flight:
            await asyncio.gather(*self._in_flight, return_exceptions=True)

    async def _sleep(self, timeout: float | None = None) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    async def _run(self) -> None:
        policy = self.policy
        while True:
            while not self._queue:
                if self._closed:
                    return
                await self._sleep()
            deadline = self._queue[0].arrived + policy.max_wait_s
            while self.queued_rows < policy.max_batch_size and not self._draining:
                if self._queue[0].arrived <= self._last_done and self.executors.pick() is not None:
                    break  # these rows waited out a batch's compute already
                remaining = deadline - self.clock()
                if remaining <= 0:
                    break
                await self._sleep(remaining)
            executor = self.executors.pick()
            while executor is None:  # all busy: the batch keeps filling meanwhile
                await self._sleep()
                executor = self.executors.pick()
            self._launch(executor, *self._take(policy.max_batch_size))

    def _take(self, limit: int) -> tuple[np.ndarray, list[tuple[_Request, int, int]]]:
        pieces: list[tuple[_Request, int, int]] = []
        count = 0
        while self._queue and count < limit:
            req = self._queue[0]
            stop = min(len(req.rows), req.taken + limit - count)
            pieces.append((req, req.taken, stop))
            count += stop - req.taken
            req.taken = stop
            if stop == len(req.rows):
                self._queue.popleft()
        self.queued_rows -= count
        if len(pieces) == 1:
            req, start, stop = pieces[0]
            return req.rows[start:stop], pieces
        return np.concatenate([req.rows[start:stop] for req, start, stop in pieces]), pieces

    def _launch(self, executor: Any, rows: np.ndarray, pieces: list[tuple[_Request, int, int]]) -> None:
        task = asyncio.ensure_future(executor.run(rows))
        self._in_flight.add(task)
        if self.on_batch is not None:
            self.on_batch(len(rows), len(pieces))
        task.add_done_callback(lambda t: self._finish(t, pieces))

    def _finish(self, task: asyncio.Task, pieces: list[tuple[_Request, int, int]]) -> None:
        self._in_flight.discard(task)
        self._last_done = self.clock()
        self._wake.set()  # an executor is free again
        error = task.exception() if not task.cancelled() else asyncio.CancelledError()
        offset = 0
        for req, start, stop in pieces:
            n = stop - start
            if req.future.done():  # the client went away, or another piece failed
                pass
            elif error is not None:
                req.future.set_exception(error)
            else:
                req.parts.append((start, task.result()[offset:offset + n]))
                req.left -= n
                if req.left == 0:
                    parts = [p for _, p in sorted(req.parts, key=lambda item: item[0])]
                    req.future.set_result(parts[0] if len(parts) == 1 else np.concatenate(parts))
            offset += n
