"""One loader stream's batches, gathered from the shards its plan names.

:class:`StreamReader` walks a :class:`~storage.order.StreamPlan`: shard spans are read
ahead in plan order (a :class:`~storage.fetcher.ShardFetcher`), kept while a batch or
shuffle window still needs them, and dropped after. Without a row shuffle a batch is a
run of consecutive rows: a zero-copy view when it lies inside one record batch, else one
concatenation. With the block shuffle, every span of the current shuffle window stays
resident and a batch's rows (in stream order, see :mod:`storage.order`) are copied with
one ``take`` per record batch they come from, straight into the caller's buffers when it
supplies them (pinned memory on CUDA): one copy per row, no staging of the window. When
a window becomes current, the rows of all its batches are found in their record batches
at once (vectorised), so a batch costs little more than its takes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from storage.columns import ColumnSpec, concat_rows, empty_like_rows, take_rows
from storage.fetcher import ShardFetcher
from storage.order import Span, StreamPlan

BufferProvider = Callable[[int], "dict[str, np.ndarray] | None"]


@dataclass
class Piece:
    """The rows of one span, as record-batch chunks of column arrays."""

    chunks: list[tuple[dict, int]]  # (arrays, rows)
    held: Any = None  # what keeps the cached shard from eviction meanwhile

    def release(self) -> None:
        if self.held is not None:
            self.held.release()
            self.held = None


@dataclass
class _Window:
    """The spans of a stream made resident in order, and dropped once passed."""

    plan: StreamPlan
    next_span: int
    fetcher: ShardFetcher
    depth: Callable[[], int] | None = None  # reads in flight, asked each time a span is taken
    resident: dict[int, Piece] = field(default_factory=dict)

    def ensure(self, hi: int) -> None:
        ends = self.plan.span_ends
        while self.next_span < len(ends) and (self.next_span == 0 or ends[self.next_span - 1] < hi):
            if self.depth is not None:
                self.fetcher.depth = self.depth()
            self.resident[self.next_span] = next(self.fetcher)
            self.next_span += 1

    def rows(self, lo: int, hi: int) -> list[tuple[dict, int, int]]:
        ends = self.plan.span_ends
        parts = []
        for index in sorted(self.resident):
            start = int(ends[index]) - self.plan.spans[index].rows
            if start >= hi or ends[index] <= lo:
                continue
            for arrays, rows in self.resident[index].chunks:
                a, b = max(lo, start), min(hi, start + rows)
                if b > a:
                    parts.append((arrays, a - start, b - start))
                start += rows
        return parts

    def chunks(self, lo: int, hi: int) -> tuple[np.ndarray, list[tuple[dict, int, int]]]:
        """The record-batch pieces covering ``[lo, hi)`` and the stream position each starts at."""
        parts = self.rows(lo, hi)
        starts = np.cumsum([lo] + [b - a for _, a, b in parts[:-1]]).astype(np.int64)
        return starts, parts

    def drop_before(self, position: int) -> None:
        ends = self.plan.span_ends
        for index in [i for i in self.resident if ends[i] <= position]:
            self.resident.pop(index).release()

    def close(self, wait: bool = False) -> None:
        self.fetcher.close(wait=wait)
        for piece in self.resident.values():
            piece.release()
        self.resident.clear()


@dataclass
class _Run:
    """Batches ``first..stop-1`` of one shuffle window, with each row found in its record batch."""

    first: int
    stop: int
    bounds: list[int]  # where each batch's rows start in ``rows`` (and, last, where they end)
    rows: np.ndarray  # the batches' source rows, each a row number within its record batch
    takes: list[list[tuple[dict, int, int]]]  # per batch: (arrays, a, b), its rows a..b-1 come from arrays


class StreamReader:
    """The batches of one stream plan, read through ``read_span``."""

    #: Batches between two calls of ``on_progress`` (and one more call when the stream ends).
    REPORT_EVERY = 16

    def __init__(self, plan: StreamPlan, read_span: Callable[[Span], Piece], span_bytes: Callable[[Span], int],
                 specs: list[ColumnSpec], depth: int = 4, fetch_depth: Callable[[], int] | None = None,
                 on_progress: Callable[[ShardFetcher, int], None] | None = None):
        self.plan, self.read_span, self.span_bytes, self.specs = plan, read_span, span_bytes, specs
        self.fetch_depth, self.on_progress = fetch_depth, on_progress
        # A shuffle window's spans are all needed at once: read the next window's meanwhile.
        self.depth = max(depth, self.spans_per_block() + 1) if plan.shuffled else depth

    def spans_per_block(self) -> int:
        rows = [s.rows for s in self.plan.spans]
        return -(-self.plan.spec.block_size // max(1, int(np.mean(rows)))) + 1 if rows else 1

    def batches(self, first: int, out: BufferProvider | None = None) -> Iterator[tuple[int, int, dict]]:
        """``(lo, hi, arrays)`` for the stream's batches from index ``first`` on."""
        plan = self.plan
        if first >= len(plan.sizes):
            return
        offsets, size = plan.offsets, plan.spec.block_size
        start = int(offsets[first]) // size * size if plan.shuffled else int(offsets[first])
        first_span = int(np.searchsorted(plan.span_ends, start, side="right"))
        fetcher = ShardFetcher(self.read_span, plan.spans[first_span:], depth=self.depth, size=self.span_bytes)
        depth = (lambda: max(self.fetch_depth(), self.depth)) if self.fetch_depth is not None else None
        window = _Window(plan, first_span, fetcher, depth)
        run: _Run | None = None
        made = 0  # batches since on_progress was last called
        try:
            for i in range(first, len(plan.sizes)):
                lo, hi = int(offsets[i]), int(offsets[i + 1])
                buffers = out(hi - lo) if out is not None else None
                if plan.shuffled:
                    if run is None or i >= run.stop:
                        run = self._run(window, i)
                    arrays = self._gather(run, i, buffers)
                else:
                    window.ensure(hi)
                    arrays = concat_rows(window.rows(lo, hi), self.specs, buffers)
                    window.drop_before(hi)
                made += 1
                if made == self.REPORT_EVERY and self.on_progress is not None:
                    self.on_progress(fetcher, made)
                    made = 0
                yield lo, hi, arrays
        except Exception:
            window.close(wait=True)  # a failed read: the others in flight end before the error surfaces
            raise
        finally:
            window.close()
            if made and self.on_progress is not None:
                self.on_progress(fetcher, made)

    def blocks(self, first: int, out: BufferProvider | None = None) -> Iterator[tuple[int, int, dict]]:
        """``(lo, hi, arrays)`` for each window of ``plan.spec.block_size`` stream positions, from the
        one holding batch ``first`` on: its rows in *unshuffled* stream order (a block shuffle
        permutes rows only within their window), for a consumer that gathers the batches
        itself (:mod:`storage.device_gather`)."""
        plan = self.plan
        if first >= len(plan.sizes):
            return
        size, rows = plan.spec.block_size, plan.rows
        start = int(plan.offsets[first]) // size * size
        first_span = int(np.searchsorted(plan.span_ends, start, side="right"))
        fetcher = ShardFetcher(self.read_span, plan.spans[first_span:], depth=self.depth, size=self.span_bytes)
        depth = (lambda: max(self.fetch_depth(), self.depth)) if self.fetch_depth is not None else None
        window = _Window(plan, first_span, fetcher, depth)
        try:
            for lo in range(start, rows, size):
                hi = min(rows, lo + size)
                window.ensure(hi)
                arrays = concat_rows(window.rows(lo, hi), self.specs, out(hi - lo) if out is not None else None)
                window.drop_before(hi)
                if self.on_progress is not None:
                    self.on_progress(fetcher, 0)
                yield lo, hi, arrays
        except Exception:
            window.close(wait=True)
            raise
        finally:
            window.close()

    def _run(self, window: _Window, first: int) -> _Run:
        """Batch ``first`` and those after it that end in the same shuffle window, located.

        The window's spans are made resident (those before it dropped) and every row of
        those batches is found in its record batch at once, vectorised, so that each
        batch is left with slicing and its takes.
        """
        plan = self.plan
        offsets, size = plan.offsets, plan.spec.block_size
        w_lo = plan.block_bounds(int(offsets[first]) // size)[0]
        w_hi = plan.block_bounds((int(offsets[first + 1]) - 1) // size)[1]
        stop = int(np.searchsorted(offsets, w_hi, side="right")) - 1  # batches ending by w_hi
        window.drop_before(w_lo)
        window.ensure(w_hi)
        starts, parts = window.chunks(w_lo, w_hi)
        bounds = offsets[first: stop + 1] - offsets[first]
        sources = plan.run_sources(offsets[first: stop + 1])
        which = np.searchsorted(starts, sources, side="right") - 1
        # Stream position of row 0 of each part's record batch: a source's row there is the difference.
        origin = starts - np.array([a for _, a, _ in parts], dtype=np.int64)
        rows = sources - origin[which]
        cuts = np.union1d(np.flatnonzero(which[1:] != which[:-1]) + 1, bounds).tolist()
        edges = bounds.tolist()
        takes: list[list[tuple[dict, int, int]]] = [[] for _ in range(stop - first)]
        batch = 0
        for a, b, part in zip(cuts[:-1], cuts[1:], which[cuts[:-1]].tolist()):
            while a >= edges[batch + 1]:
                batch += 1
            takes[batch].append((parts[part][0], a - edges[batch], b - edges[batch]))
        return _Run(first, stop, edges, rows, takes)

    def _gather(self, run: _Run, i: int, buffers) -> dict:
        """Batch ``i`` of ``run``: a take per record batch its rows are in."""
        specs = self.specs
        j = i - run.first
        rows, takes = run.rows[run.bounds[j]: run.bounds[j + 1]], run.takes[j]
        out = buffers if buffers is not None else {}
        if len(out) < len(specs):
            out = {**empty_like_rows([s for s in specs if s.name not in out], len(rows)), **out}
        if len(takes) == 1:
            return take_rows(takes[0][0], rows, specs, out)
        others: dict[str, list] = {s.name: [] for s in specs if not s.numeric}
        for arrays, a, b in takes:
            taken = take_rows(arrays, rows[a:b], specs, out, at=a)
            for name in others:
                others[name].append(taken[name])
        out.update({name: pa.concat_arrays(pieces) for name, pieces in others.items()})
        return out
