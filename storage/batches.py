"""One loader stream's batches, gathered from the shards its plan names.

:class:`StreamReader` walks a :class:`~storage.order.StreamPlan`: shard spans are read
ahead in plan order (a :class:`~storage.fetcher.ShardFetcher`), kept while a batch or
shuffle window still needs them, and dropped after. Without a row shuffle a batch is a
run of consecutive rows: a zero-copy view when it lies inside one record batch, else one
concatenation. With the block shuffle, each window of ``block_size`` rows is assembled
once (a view when it lies inside one record batch) and each batch is one ``take`` from
it, written into the caller's buffers when it supplies them (pinned memory on CUDA).
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
    resident: dict[int, Piece] = field(default_factory=dict)

    def ensure(self, hi: int) -> None:
        ends = self.plan.span_ends
        while self.next_span < len(ends) and (self.next_span == 0 or ends[self.next_span - 1] < hi):
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

    def drop_before(self, position: int) -> None:
        ends = self.plan.span_ends
        for index in [i for i in self.resident if ends[i] <= position]:
            self.resident.pop(index).release()

    def close(self) -> None:
        self.fetcher.close()
        for piece in self.resident.values():
            piece.release()
        self.resident.clear()


class StreamReader:
    """The batches of one stream plan, read through ``read_span``."""

    def __init__(self, plan: StreamPlan, read_span: Callable[[Span], Piece], span_bytes: Callable[[Span], int],
                 specs: list[ColumnSpec], depth: int = 4, fetch_depth: Callable[[], int] | None = None,
                 on_batch: Callable[[ShardFetcher], None] | None = None):
        self.plan, self.read_span, self.span_bytes, self.specs = plan, read_span, span_bytes, specs
        self.depth, self.fetch_depth, self.on_batch = depth, fetch_depth, on_batch

    def batches(self, first: int, out: BufferProvider | None = None) -> Iterator[tuple[int, int, dict]]:
        """``(lo, hi, arrays)`` for the stream's batches from index ``first`` on."""
        plan = self.plan
        if first >= len(plan.sizes):
            return
        offsets, size = plan.offsets, plan.spec.block_size
        start = int(offsets[first]) // size * size if plan.shuffled else int(offsets[first])
        first_span = int(np.searchsorted(plan.span_ends, start, side="right"))
        fetcher = ShardFetcher(self.read_span, plan.spans[first_span:], depth=self.depth, size=self.span_bytes)
        window = _Window(plan, first_span, fetcher)
        self._block: tuple[int, dict] | None = None
        self._block_buffer = empty_like_rows(self.specs, min(size, plan.rows)) if plan.shuffled else None
        try:
            for i in range(first, len(plan.sizes)):
                if self.fetch_depth is not None:
                    fetcher.depth = self.fetch_depth()
                lo, hi = int(offsets[i]), int(offsets[i + 1])
                buffers = out(hi - lo) if out is not None else None
                if plan.shuffled:
                    arrays = self._gather(window, lo, hi, buffers)
                else:
                    window.ensure(hi)
                    arrays = concat_rows(window.rows(lo, hi), self.specs, buffers)
                    window.drop_before(hi)
                if self.on_batch is not None:
                    self.on_batch(fetcher)
                yield lo, hi, arrays
        finally:
            window.close()
            self._block = self._block_buffer = None

    def _gather(self, window: _Window, lo: int, hi: int, buffers) -> dict:
        """Rows at shuffled positions ``[lo, hi)``: a take from the shuffle window(s) they fall in."""
        plan, specs = self.plan, self.specs
        size = plan.spec.block_size
        sources = plan.source_positions(lo, hi)
        given = buffers or {}
        numeric = {**empty_like_rows([s for s in specs if s.name not in given], hi - lo), **given}
        others: dict[str, list] = {s.name: [] for s in specs if not s.numeric}
        for b in range(lo // size, (hi - 1) // size + 1):
            b_lo, b_hi = plan.block_bounds(b)
            if self._block is None or self._block[0] != b:
                window.ensure(b_hi)
                parts = window.rows(b_lo, b_hi)
                target = {k: v[: b_hi - b_lo] for k, v in self._block_buffer.items()} if len(parts) > 1 else None
                self._block = (b, concat_rows(parts, specs, target))
                window.drop_before(b_hi)
            s_lo, s_hi = max(lo, b_lo) - lo, min(hi, b_hi) - lo
            taken = take_rows(self._block[1], sources[s_lo:s_hi] - b_lo, specs,
                              out={k: v[s_lo:s_hi] for k, v in numeric.items()})
            for name in others:
                others[name].append(taken[name])
        arrays = dict(numeric)
        arrays.update({name: pa.concat_arrays(parts) for name, parts in others.items()})
        return arrays
