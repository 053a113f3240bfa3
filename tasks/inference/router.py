"""The router in the HTTP front: whole batches to replicas on other processes, power of two choices.

:class:`ReplicaClient` is one connection to a replica's host (see
:mod:`tasks.inference.replica_host`), kept open, with many batches in flight on it (each
answer carries the request's id). Every answer also carries the replica's own count of
rows it holds, so a replica's load is what this router has sent it and not yet had back,
or what the replica last said it holds if that is more (other routers' batches).

:class:`Router` is the micro-batcher's executor set (:class:`~tasks.inference.batcher.Executors`):
``pick()`` samples two replicas with room and takes the less loaded, as Ray Serve's
``pow_2_router`` does, and never waits on a central scheduler. A batch whose replica is lost
(its connection breaks, or the supervisor takes it out) is sent again to another replica:
inference is idempotent. With none up it waits for one (a replacement) up to a bound, then
fails with :class:`NoReplica` (HTTP 503).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections import Counter
from typing import Any, Awaitable, Callable

import numpy as np

from tasks.inference import wire

log = logging.getLogger("swarm.serve.router")

UP, DRAINING, LOST, STOPPED = "up", "draining", "lost", "stopped"
#: Replicas one batch is sent to at most before it fails (each lost while holding it).
MAX_ATTEMPTS = 4


class ReplicaLost(ConnectionError):
    """The replica stopped answering or its connection broke; its batches go elsewhere."""


class ReplicaBusy(ConnectionError):
    """The replica's queue was full (another router filled it); the batch goes elsewhere."""


class NoReplica(RuntimeError):
    """No replica came up in time to take a batch (HTTP 503)."""


class ReplicaBatchFailed(RuntimeError):
    """The batch itself failed on the replica (not retried: it would fail again)."""


class ReplicaClient:
    def __init__(self, index: int, endpoint: dict[str, Any], max_batches: int,
                 on_lost: Callable[["ReplicaClient", str], None] | None = None,
                 on_answer: Callable[["ReplicaClient", int, float, float], None] | None = None):
        self.index, self.endpoint, self.max_batches = index, endpoint, max_batches
        self.on_lost, self.on_answer = on_lost, on_answer
        self.state = UP
        self.outstanding_rows = 0  # sent by this router, not answered yet
        self.outstanding_batches = 0
        self.reported_rows = 0  # what the replica said it held at its last answer
        self.batches = self.rows = 0
        self.busy_s = 0.0
        self.report: dict | None = None  # the adaptive batch size report it sent last
        self.last_answer = time.monotonic()
        self.started_at = time.time()
        self.lost_reason: str | None = None
        self._ids = itertools.count()
        self._pending: dict[int, asyncio.Future] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._read_task: asyncio.Task | None = None

    @property
    def worker(self) -> str:
        return self.endpoint.get("worker", "")

    async def connect(self, timeout: float = 30.0) -> None:
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection(self.endpoint["host"], self.endpoint["port"]), timeout)
        self._read_task = asyncio.get_running_loop().create_task(self._read_loop(), name=f"replica-{self.index}-reader")

    def load(self) -> int:
        return max(self.outstanding_rows, self.reported_rows)

    def has_room(self) -> bool:
        return self.state == UP and self.outstanding_batches < self.max_batches

    def reserve(self, rows: int) -> None:
        self.outstanding_batches += 1
        self.outstanding_rows += rows

    async def send(self, rows: np.ndarray) -> np.ndarray:
        """Run ``rows`` (reserved already with :meth:`reserve`) on the replica."""
        n = len(rows)
        began = time.perf_counter()
        try:
            header, outputs = await self._request({"op": "predict"}, rows)
        finally:
            self.outstanding_batches -= 1
            self.outstanding_rows -= n
        if not header.get("ok"):
            if header.get("busy"):
                raise ReplicaBusy(header.get("error", "busy"))
            raise ReplicaBatchFailed(f"replica {self.index} on {self.worker}: {header.get('error')}")
        seconds = float(header.get("seconds") or 0.0)
        self.batches += 1
        self.rows += n
        self.busy_s += seconds
        if self.on_answer is not None:
            self.on_answer(self, n, seconds, time.perf_counter() - began)
        return outputs

    async def ping(self) -> dict:
        header, _ = await self._request({"op": "ping"})
        return header

    async def _request(self, header: dict, array: np.ndarray | None = None) -> tuple[dict, np.ndarray | None]:
        if self.state in (LOST, STOPPED) or self._writer is None:
            raise ReplicaLost(f"replica {self.index} on {self.worker} is {self.state}")
        ident = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[ident] = future
        try:
            self._writer.write(wire.encode({**header, "id": ident}, array))
            return await future
        finally:
            self._pending.pop(ident, None)

    async def _read_loop(self) -> None:
        reason = "its connection closed"
        try:
            while True:
                header, array = await wire.read(self._reader)
                self.last_answer = time.monotonic()
                load = header.get("load")
                if load:
                    self.reported_rows = int(load.get("rows", 0))
                if header.get("report") is not None:
                    self.report = header["report"]
                future = self._pending.get(header.get("id"))
                if future is not None and not future.done():
                    future.set_result((header, array))
        except asyncio.CancelledError:
            raise
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
            reason = f"its connection broke ({type(exc).__name__})"
        except Exception as exc:  # noqa: BLE001 - a garbled stream: treat as lost
            reason = f"it sent a bad frame ({exc})"
        self.lose(reason)

    def lose(self, reason: str) -> None:
        """Take the replica out of rotation at once; its waiting batches fail with :class:`ReplicaLost`."""
        if self.state in (LOST, STOPPED):
            return
        self.state, self.lost_reason = LOST, reason
        self._fail_pending(reason)
        if self._writer is not None:
            self._writer.close()
        if self.on_lost is not None:
            self.on_lost(self, reason)

    def _fail_pending(self, reason: str) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ReplicaLost(f"replica {self.index} on {self.worker}: {reason}"))

    async def close(self) -> None:
        """Stop using the replica (scale-down or shutdown): no loss is reported."""
        self.state = STOPPED
        self._fail_pending("stopped")
        if self._read_task is not None:
            self._read_task.cancel()
        if self._writer is not None:
            self._writer.close()


class Router:
    """Power of two choices over replicas with room; batches retried elsewhere on loss."""

    def __init__(self, wait_for_replica_s: float = 180.0, seed: int | None = None):
        self.replicas: list[ReplicaClient] = []
        self.wait_for_replica_s = wait_for_replica_s
        self.choices: Counter = Counter()  # replica index -> batches routed to it
        self.retries = 0
        self._rng = random.Random(seed)
        self._changed = asyncio.Event()
        self.on_change: list[Callable[[], None]] = []

    def add(self, replica: ReplicaClient) -> None:
        self.replicas.append(replica)
        self.changed()

    def remove(self, replica: ReplicaClient) -> None:
        if replica in self.replicas:
            self.replicas.remove(replica)
        self.changed()

    def changed(self) -> None:
        """A replica came, went or freed room: wake whoever waits for one."""
        self._changed.set()
        for callback in self.on_change:
            callback()

    def up(self) -> list[ReplicaClient]:
        return [r for r in self.replicas if r.state == UP]

    def choose(self) -> ReplicaClient | None:
        free = [r for r in self.replicas if r.has_room()]
        if not free:
            return None
        if len(free) > 2:
            free = self._rng.sample(free, 2)
        return min(free, key=lambda r: (r.load(), r.outstanding_batches))

    def pick(self) -> "_Dispatch | None":
        replica = self.choose()
        return None if replica is None else _Dispatch(self, replica)

    async def acquire(self) -> ReplicaClient:
        """A replica with room, waiting for one (a replacement, or room freed) up to the bound."""
        deadline = time.monotonic() + self.wait_for_replica_s
        while (replica := self.choose()) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoReplica(f"no model replica was available for {self.wait_for_replica_s:.0f} s")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))
            except asyncio.TimeoutError:
                pass
        return replica

    async def run_on(self, replica: ReplicaClient, rows: np.ndarray) -> np.ndarray:
        """``rows`` on ``replica`` (reserved already), again on others while replicas are lost
        (up to ``MAX_ATTEMPTS`` replicas: a batch that takes each one down is not tried on all)."""
        for attempt in range(1, MAX_ATTEMPTS + 1):
            self.choices[replica.index] += 1
            try:
                return await replica.send(rows)
            except (ReplicaLost, ReplicaBusy) as exc:
                if attempt == MAX_ATTEMPTS:
                    raise NoReplica(f"the batch was lost with {attempt} replicas in turn; last: {exc}") from None
                self.retries += 1
                log.warning("batch of %d rows sent again: %s", len(rows), exc)
            finally:
                self.changed()
            replica = await self.acquire()
            replica.reserve(len(rows))
        raise AssertionError("unreachable")


class _Dispatch:
    """What the batcher launches: the batch takes the chosen replica's room at once."""

    __slots__ = ("router", "replica")

    def __init__(self, router: Router, replica: ReplicaClient):
        self.router, self.replica = router, replica

    def run(self, rows: np.ndarray) -> Awaitable[np.ndarray]:
        self.replica.reserve(len(rows))
        return self.router.run_on(self.replica, rows)
