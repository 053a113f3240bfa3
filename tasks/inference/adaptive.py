"""Adaptive batch size: start small, grow while throughput improves and latency stays under
a target, back off on out-of-memory and retry the batch.

Pure logic without torch, shared by the online server's replicas and offline inference:
the caller runs batches of :attr:`AdaptiveBatchSize.size` rows, reports each batch's
``(rows, seconds)`` with :meth:`~AdaptiveBatchSize.observe` and each out-of-memory with
:meth:`~AdaptiveBatchSize.on_oom`; :func:`run_adaptive` is that loop.

A larger size is judged against the current one by A/B runs: batches alternate between
the two sizes and the throughput ratios of adjacent pairs are compared by their median,
so a machine that gets slower or faster meanwhile (other jobs on shared cores, clocks)
affects both sides of all pairs but one.
A partial batch (the tail of a shard, a quiet moment online) says nothing about its size
and is not counted. A settled size is probed again after ``reprobe_after`` full batches;
sizes that ran out of memory stay excluded for good. With ``patience`` the growth goes on
past sizes that did not win: throughput over batch size is not always smooth (a GEMM
kernel that suits 256 rows better than 64), so offline inference, where only throughput
counts, also tries the next sizes before it settles.
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
    """Chooses the batch size: doubles it while the doubled size beats the current one's
    throughput by ``min_gain`` (median over ``samples`` A/B pairs of full batches) and its
    median latency stays under ``latency_target_s``; halves it on out-of-memory, which
    also lowers the ceiling for good. ``patience``: larger sizes in a row that may fail to
    beat the current one before it settles (each next one is tried against the current
    size). Thread-safe; one controller per device/replica."""

    def __init__(self, maximum: int, initial: int = 8, minimum: int = 1, latency_target_s: float | None = None,
                 samples: int = 3, min_gain: float = 0.05, growth: float = 2.0, reprobe_after: int | None = 500,
                 patience: int = 0):
        if not 1 <= minimum <= maximum:
            raise ValueError(f"batch size bounds need 1 <= minimum <= maximum (got {minimum}, {maximum})")
        if samples < 1 or growth <= 1 or min_gain < 0 or patience < 0:
            raise ValueError(f"need samples >= 1, growth > 1, min_gain >= 0, patience >= 0 "
                             f"(got {samples}, {growth}, {min_gain}, {patience})")
        if latency_target_s is not None and latency_target_s <= 0:
            raise ValueError(f"latency target must be positive (got {latency_target_s})")
        self.minimum, self.maximum = minimum, maximum
        self.latency_target_s, self.samples, self.min_gain, self.growth = latency_target_s, samples, min_gain, growth
        self.reprobe_after = reprobe_after
        self.patience = patience
        self._misses = 0  # larger sizes in a row that did not beat the current one
        self.current = min(maximum, max(minimum, initial))  # the chosen size
        self.candidate: int | None = None  # the larger size on trial against it
        self.ceiling = maximum  # lowered by the latency target (until a re-probe) and by out-of-memory
        self.memory_ceiling = maximum  # lowered by out-of-memory only, for good
        self.settled = False
        self.tried: dict[int, tuple[float, float]] = {}  # size -> (median rows/s, median seconds), last trial
        self.oom_sizes: list[int] = []
        self.changes: list[dict[str, Any]] = []
        self._windows: dict[int, list[float]] = {}  # size -> seconds of its full batches in this trial
        self._settled_batches = 0
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        """Rows for the next batch: the current size, alternating with the candidate on trial."""
        with self._lock:
            if self.candidate is None:
                return self.current
            ran = self._windows.get(self.current, []), self._windows.get(self.candidate, [])
            return self.candidate if len(ran[1]) < len(ran[0]) else self.current

    def observe(self, rows: int, seconds: float) -> None:
        """A batch of ``rows`` rows took ``seconds``."""
        with self._lock:
            if seconds <= 0 or rows not in (self.current, self.candidate):
                return
            if self.settled:
                self._settled_batches += 1
                if self.reprobe_after is None or self._settled_batches < self.reprobe_after:
                    return
                self.settled, self.ceiling = False, self.memory_ceiling
                self._windows.clear()
                self._propose()
                return
            self._windows.setdefault(rows, []).append(seconds)
            self._decide()

    def _propose(self, above: int | None = None) -> None:
        """Put the next size larger than ``above`` (default: the current size) on trial, or
        settle at the ceiling."""
        base = self.current if above is None else above
        if base >= self.ceiling:
            self._settle(self.current, "at the ceiling")
            return
        self.candidate = min(self.ceiling, math.ceil(base * self.growth))
        self._windows.clear()

    def _decide(self) -> None:
        current = self._windows.get(self.current, [])
        if self.candidate is None:  # the first size alone: is it within the latency target?
            if len(current) < self.samples:
                return
            latency = statistics.median(current)
            self.tried[self.current] = (self.current / latency, latency)
            if self.latency_target_s is not None and latency > self.latency_target_s:
                reason = f"median latency {latency * 1e3:.1f} ms over the target"
                if self.current == self.minimum:
                    self._settle(self.current, reason)
                else:
                    self.ceiling = max(self.minimum, self.current // 2)
                    self._change(self.ceiling, reason)
                    self._windows.clear()
                return
            self._propose()
            return
        trial = self._windows.get(self.candidate, [])
        if len(current) < self.samples or len(trial) < self.samples:
            return
        base_latency, trial_latency = statistics.median(current), statistics.median(trial)
        self.tried[self.current] = (self.current / base_latency, base_latency)
        self.tried[self.candidate] = (self.candidate / trial_latency, trial_latency)
        # Throughput ratio candidate/current per adjacent pair (same per-row work compared).
        gain = statistics.median((self.candidate / b) / (self.current / a) for a, b in zip(current, trial))
        candidate, self.candidate = self.candidate, None
        if self.latency_target_s is not None and trial_latency > self.latency_target_s:
            self.ceiling = self.current
            self._settle(self.current, f"{candidate} rows: median latency {trial_latency * 1e3:.1f} ms over the target")
        elif gain < 1 + self.min_gain:
            self._misses += 1
            if self._misses <= self.patience and candidate < self.ceiling:
                self._propose(above=candidate)
            else:
                self._settle(self.current, f"{candidate} rows: throughput x{gain:.2f} of {self.current} rows, "
                                           f"not {100 * self.min_gain:.0f}% more")
        else:
            self._misses = 0
            self._change(candidate, f"throughput x{gain:.2f} of {self.current} rows")
            self._propose()

    def on_oom(self, rows: int) -> bool:
        """A batch of ``rows`` rows ran out of memory: halve the size (the ceiling too).
        False when it is already at the minimum: then the error is the caller's to raise."""
        with self._lock:
            self.oom_sizes.append(rows)
            if rows <= self.minimum:
                return False
            self.memory_ceiling = max(self.minimum, min(self.memory_ceiling, rows // 2))
            self.ceiling = min(self.ceiling, self.memory_ceiling)
            if self.candidate is not None and self.candidate > self.ceiling:
                self.candidate = None
            self._windows.clear()
            self._change(min(self.current, self.ceiling), f"out of memory at {rows} rows")
            if self.candidate is None and not self.settled:
                self._propose()
            return True

    def _change(self, size: int, reason: str) -> None:
        if size != self.current:
            self.changes.append({"from": self.current, "to": size, "reason": reason})
        self.current = size

    def _settle(self, size: int, reason: str) -> None:
        self._change(size, reason)
        self.candidate = None
        self.settled = True
        self._settled_batches = 0
        self._misses = 0

    def report(self) -> dict[str, Any]:
        """The chosen size and how it was reached (sizes tried, out-of-memory sizes, changes)."""
        with self._lock:
            return {
                "size": self.current,
                "trying": self.candidate,
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
