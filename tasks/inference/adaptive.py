"""Adaptive batch size: start small, grow while throughput improves and latency stays under
a target, back off on out-of-memory and retry the batch.

Pure logic without torch, shared by the online server's replicas and offline inference:
the caller runs batches of :attr:`AdaptiveBatchSize.size` rows, reports each batch's
``(rows, seconds)`` with :meth:`~AdaptiveBatchSize.observe` and each out-of-memory with
:meth:`~AdaptiveBatchSize.on_oom`; :func:`run_adaptive` is that loop.

Each size is judged on the median of a few full batches (one slow batch on a shared
machine must not decide anything); a partial batch (the tail of a shard, a quiet moment
online) says nothing about its size and is not counted. A settled size is probed again
after ``reprobe_after`` full batches, so a choice made during a noisy moment or under
another load does not stand for good; sizes that ran out of memory stay excluded.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from typing import Any, Callable, TypeVar

T = TypeVar("T")

OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM (``torch.OutOfMemoryError``), CPU allocator failures and :class:`MemoryError`."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in OOM_MESSAGES)


class AdaptiveBatchSize:
    """Chooses the batch size: doubles it while the median throughput of ``samples`` full
    batches improves by at least ``min_gain`` and their median latency stays under
    ``latency_target_s``; settles on the best size seen; halves it on out-of-memory, which
    also lowers the ceiling for good. Thread-safe; one controller per device/replica."""

    def __init__(self, maximum: int, initial: int = 8, minimum: int = 1, latency_target_s: float | None = None,
                 samples: int = 3, min_gain: float = 0.05, growth: float = 2.0, reprobe_after: int | None = 500):
        if not 1 <= minimum <= maximum:
            raise ValueError(f"batch size bounds need 1 <= minimum <= maximum (got {minimum}, {maximum})")
        if samples < 1 or growth <= 1 or min_gain < 0:
            raise ValueError(f"need samples >= 1, growth > 1, min_gain >= 0 (got {samples}, {growth}, {min_gain})")
        if latency_target_s is not None and latency_target_s <= 0:
            raise ValueError(f"latency target must be positive (got {latency_target_s})")
        self.minimum, self.maximum = minimum, maximum
        self.latency_target_s, self.samples, self.min_gain, self.growth = latency_target_s, samples, min_gain, growth
        self.reprobe_after = reprobe_after
        self.size = min(maximum, max(minimum, initial))
        self.ceiling = maximum  # lowered by the latency target (until a re-probe) and by out-of-memory
        self.memory_ceiling = maximum  # lowered by out-of-memory only, for good
        self._settled_batches = 0
        self.settled = False
        self.tried: dict[int, tuple[float, float]] = {}  # size -> (median rows/s, median seconds)
        self.oom_sizes: list[int] = []
        self.changes: list[dict[str, Any]] = []
        self._window: list[tuple[int, float]] = []
        self._lock = threading.Lock()

    def observe(self, rows: int, seconds: float) -> None:
        """A batch of ``rows`` rows took ``seconds``."""
        with self._lock:
            if rows != self.size or seconds <= 0:
                return
            if self.settled:
                self._settled_batches += 1
                if self.reprobe_after is None or self._settled_batches < self.reprobe_after:
                    return
                self.settled, self.ceiling = False, self.memory_ceiling
                self.tried.clear()
            self._window.append((rows, seconds))
            if len(self._window) < self.samples:
                return
            throughput = statistics.median(r / s for r, s in self._window)
            latency = statistics.median(s for _, s in self._window)
            self._window.clear()
            self.tried[self.size] = (throughput, latency)
            smaller = [s for s in self.tried if s < self.size]
            previous = max(smaller) if smaller else None
            if self.latency_target_s is not None and latency > self.latency_target_s:
                reason = f"median latency {latency * 1e3:.1f} ms over the target"
                if previous is not None or self.size == self.minimum:
                    self.ceiling = previous or self.minimum
                    self._settle(self.ceiling, reason)
                else:  # even the first size is too slow: keep halving until one meets the target
                    self.ceiling = max(self.minimum, self.size // 2)
                    self._change(self.ceiling, reason)
            elif previous is not None and throughput < self.tried[previous][0] * (1 + self.min_gain):
                best = self.size if throughput > self.tried[previous][0] else previous
                self._settle(best, f"throughput {throughput:,.0f} rows/s did not improve on {previous} rows")
            elif self.size >= self.ceiling:
                self._settle(self.size, "at the ceiling")
            else:
                self._change(min(self.ceiling, math.ceil(self.size * self.growth)), "throughput improved")

    def on_oom(self, rows: int) -> bool:
        """A batch of ``rows`` rows ran out of memory: halve the size (the ceiling too).
        False when it is already at the minimum: then the error is the caller's to raise."""
        with self._lock:
            self.oom_sizes.append(rows)
            if rows <= self.minimum:
                return False
            self.memory_ceiling = max(self.minimum, min(self.memory_ceiling, rows // 2))
            self.ceiling = min(self.ceiling, self.memory_ceiling)
            self._window.clear()
            self._change(min(self.size, self.ceiling), f"out of memory at {rows} rows")
            return True

    def _change(self, size: int, reason: str) -> None:
        if size != self.size:
            self.changes.append({"from": self.size, "to": size, "reason": reason})
        self.size = size

    def _settle(self, size: int, reason: str) -> None:
        self._change(size, reason)
        self.settled = True
        self._settled_batches = 0

    def report(self) -> dict[str, Any]:
        """The chosen size and how it was reached (sizes tried, out-of-memory sizes, changes)."""
        with self._lock:
            return {
                "size": self.size,
                "ceiling": self.ceiling,
                "memory_ceiling": self.memory_ceiling,
                "settled": self.settled,
                "tried": {size: {"rows_per_s": round(tp, 1), "median_ms": round(lat * 1e3, 3)}
                          for size, (tp, lat) in sorted(self.tried.items())},
                "out_of_memory_at": list(self.oom_sizes),
                "changes": list(self.changes),
            }


def run_adaptive(run: Callable[[int, int], T], total: int, controller: AdaptiveBatchSize | None,
                 after_oom: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter) -> list[T]:
    """``run(start, stop)`` over rows ``[0, total)`` in chunks of the controller's size, in
    order; a chunk that runs out of memory is retried smaller. Without a controller: one call."""
    if controller is None:
        return [run(0, total)] if total else []
    results: list[T] = []
    start = 0
    while start < total:
        stop = min(total, start + controller.size)
        began = clock()
        try:
            result = run(start, stop)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
            if is_out_of_memory(exc) and controller.on_oom(stop - start):
                if after_oom is not None:
                    after_oom()
                continue
            raise
        controller.observe(stop - start, clock() - began)
        results.append(result)
        start = stop
    return results
