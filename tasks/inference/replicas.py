"""Model replicas, each running its batches on its own thread; least-loaded routing.

A replica is a predict function (rows in, one output row per input row out) on a
dedicated worker thread. torch releases the GIL inside its kernels, so replicas on
threads compute in parallel; each thread gets its own intra-op thread count (OpenMP's is
per thread) so that N replicas do not oversubscribe the cores. :meth:`ReplicaPool.pick`
routes a batch to the replica with the fewest rows in flight among those with room.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Awaitable, Callable

import numpy as np

Predict = Callable[[np.ndarray], np.ndarray]


def _init_thread(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


class Replica:
    def __init__(self, index: int, predict: Predict, threads: int | None = None, max_in_flight: int = 1,
                 observe: Callable[[int, float], None] | None = None):
        self.index, self.predict, self.max_in_flight, self.observe = index, predict, max_in_flight, observe
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"swarm-replica-{index}",
                                          initializer=_init_thread, initargs=(threads,))
        self.in_flight_batches = 0
        self.in_flight_rows = 0
        self.batches = 0
        self.rows = 0
        self.busy_s = 0.0
        self.last_batch_s = 0.0

    def has_room(self) -> bool:
        return self.in_flight_batches < self.max_in_flight

    def run(self, rows: np.ndarray) -> Awaitable[np.ndarray]:
        """Start ``rows`` on this replica's thread. Its load counts from this call on, so a
        router picking again right away sees it busy."""
        self.in_flight_batches += 1
        self.in_flight_rows += len(rows)
        return self._wait(asyncio.get_running_loop().run_in_executor(self._thread, self._timed, rows), len(rows))

    async def _wait(self, future: asyncio.Future, rows: int) -> np.ndarray:
        try:
            out, seconds = await future
        finally:
            self.in_flight_batches -= 1
            self.in_flight_rows -= rows
        self.batches += 1
        self.rows += rows
        self.busy_s += seconds
        self.last_batch_s = seconds
        if self.observe is not None:
            self.observe(rows, seconds)
        return out

    def _timed(self, rows: np.ndarray) -> tuple[np.ndarray, float]:
        began = time.perf_counter()
        out = self.predict(rows)
        return out, time.perf_counter() - began

    def close(self) -> None:
        self._thread.shutdown(wait=True)


class ReplicaPool:
    def __init__(self, replicas: list[Replica]):
        if not replicas:
            raise ValueError("a replica pool needs at least one replica")
        self.replicas = replicas

    def pick(self) -> Replica | None:
        """The least-loaded replica with room (fewest rows in flight, then fewest served)."""
        free = [r for r in self.replicas if r.has_room()]
        if not free:
            return None
        return min(free, key=lambda r: (r.in_flight_rows, r.rows, r.index))

    def close(self) -> None:
        for replica in self.replicas:
            replica.close()
