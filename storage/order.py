"""Sample order: which samples each (rank, loader worker) reads, and in which order.

Everything here is a pure function of integers and numpy arrays: the order of an epoch
depends only on (shard row counts, seed, epoch, world size, rank, loader workers, batch
size, shuffle algorithm, block size), never on timing, so every process can compute its
own share without talking to the others, and a resumed epoch replays exactly.

An epoch, step by step:

1. **Shard order.** The shuffle algorithm permutes the shards (or keeps them in order).
2. **Global sequence.** The shards' rows, concatenated in that order: positions 0..N-1
   (never materialised: spans of shards describe it).
3. **Ranks.** Rank ``r`` takes a contiguous run of the sequence. Every rank gets the same
   number of batches ``K`` (a DDP job hangs otherwise): with ``drop_last`` each rank gets
   ``K`` full batches and the tail of the sequence is left out this epoch; without it the
   rows are split as evenly as possible and each rank's last batch or two are smaller, so
   every sample is read exactly once.
4. **Streams.** A rank's batch ``j`` belongs to stream ``j % W`` (``W`` loader workers,
   1 without a ``DataLoader``); each stream reads its own contiguous part of the rank's
   run, so a worker reads few shards.
5. **Block shuffle.** Within a stream, rows are permuted inside consecutive windows of
   ``block_size`` rows: a bounded in-memory shuffle that a reader can replay from any
   batch on.
6. **Batches.** A stream's batches are consecutive runs of its shuffled rows. Inside a
   batch, rows come in stream order: the shuffle decides which rows share a batch, and
   their order within it carries nothing for training, while stream order lets a reader
   copy each shard's rows of the batch with a single ``take`` and no staging copy.
   (Data stored sorted by label gives label-sorted rows within a batch: do not split a
   batch into micro-batches by position then.)

A ``DataLoader`` takes items round-robin from its workers, so worker ``w`` serves stream
``(w + k) % W`` when the epoch resumes after ``k`` batches: the rank's batches then come
out as ``k, k+1, …`` exactly as in an uninterrupted run.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Callable

import numpy as np

from storage.errors import ConfigError

# Tags that keep the random streams of different purposes apart.
_SHARDS, _BLOCK = 1, 2


def shard_identity(n_shards: int, seed: int, epoch: int) -> np.ndarray:
    return np.arange(n_shards, dtype=np.int64)


def shard_permutation(n_shards: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, _SHARDS]).permutation(n_shards).astype(np.int64)


def block_permutation(length: int, key: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng([*key, _BLOCK]).permutation(length).astype(np.int64)


@dataclass(frozen=True)
class Shuffle:
    """A shuffle algorithm: an order of shards, and optionally a permutation per block."""

    name: str
    shard_order: Callable[[int, int, int], np.ndarray]
    block_order: Callable[[int, tuple[int, ...]], np.ndarray] | None


SHUFFLES: dict[str, Shuffle] = {
    "none": Shuffle("none", shard_identity, None),
    "shard": Shuffle("shard", shard_permutation, None),
    "block": Shuffle("block", shard_permutation, block_permutation),
}
DEFAULT_SHUFFLE = "block"


def register(shuffle: Shuffle, clobber: bool = False) -> None:
    if shuffle.name in SHUFFLES and not clobber:
        raise ValueError(f"shuffle {shuffle.name!r} is already registered")
    SHUFFLES[shuffle.name] = shuffle
    _block_order.cache_clear()


def get_shuffle(name: str) -> Shuffle:
    try:
        return SHUFFLES[name]
    except KeyError:
        raise ConfigError(f"unknown shuffle {name!r}; allowed: {', '.join(SHUFFLES)}") from None


@dataclass(frozen=True)
class OrderSpec:
    """Everything the order of one rank's epoch depends on (besides the shard sizes)."""

    seed: int = 0
    epoch: int = 0
    world_size: int = 1
    rank: int = 0
    num_workers: int = 1
    batch_size: int = 1
    shuffle: str = DEFAULT_SHUFFLE
    block_size: int = 1 << 14
    drop_last: bool = False

    def __post_init__(self):
        for name, low in (("seed", 0), ("epoch", 0), ("world_size", 1), ("rank", 0), ("num_workers", 1),
                          ("batch_size", 1), ("block_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.rank >= self.world_size:
            raise ConfigError(f"rank {self.rank} is out of range for world_size {self.world_size}; allowed: "
                              f"0..{self.world_size - 1}")
        get_shuffle(self.shuffle)


# --------------------------------------------------------------------------- ranks and batches


def rank_counts(total: int, world_size: int, batch_size: int, drop_last: bool) -> tuple[np.ndarray, int]:
    """Rows per rank and the batch count ``K`` every rank shares."""
    if drop_last:
        k = total // (world_size * batch_size)
        if k == 0:
            raise ConfigError(
                f"{total} samples do not fill one batch of {batch_size} on each of {world_size} ranks; "
                "lower batch_size or use drop_last=False"
            )
        return np.full(world_size, k * batch_size, dtype=np.int64), k
    base, extra = divmod(total, world_size)
    counts = np.full(world_size, base, dtype=np.int64)
    counts[:extra] += 1
    k = -(-int(counts[0]) // batch_size)
    if base < k or base == 0:
        raise ConfigError(
            f"{total} samples cannot give each of {world_size} ranks the same number of non-empty batches "
            f"of at most {batch_size}; use drop_last=True (or a batch size above 1)"
        )
    return counts, k


def batch_sizes(rows: int, batches: int, batch_size: int) -> np.ndarray:
    """Split ``rows`` into ``batches`` non-empty batches of at most ``batch_size``, full ones first."""
    assert batches <= rows <= batches * batch_size, (rows, batches, batch_size)
    sizes = np.ones(batches, dtype=np.int64)
    if batch_size > 1:
        full, rest = divmod(rows - batches, batch_size - 1)
        sizes[:full] = batch_size
        if full < batches:
            sizes[full] += rest
    return sizes


# --------------------------------------------------------------------------- spans


@dataclass(frozen=True)
class Span:
    """Rows ``[start, stop)`` of shard ``shard`` (its index in the manifest's split)."""

    shard: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def spans_between(shard_rows: np.ndarray, shard_order: np.ndarray, lo: int, hi: int) -> list[Span]:
    """The pieces of shards that cover positions ``[lo, hi)`` of the global sequence."""
    ends = np.cumsum(shard_rows[shard_order])
    starts = ends - shard_rows[shard_order]
    first = int(np.searchsorted(ends, lo, side="right"))
    spans = []
    for i in range(first, len(shard_order)):
        if starts[i] >= hi:
            break
        a, b = max(lo, int(starts[i])), min(hi, int(ends[i]))
        if b > a:
            spans.append(Span(int(shard_order[i]), a - int(starts[i]), b - int(starts[i])))
    return spans


# --------------------------------------------------------------------------- one stream's plan


@dataclass(frozen=True)
class StreamPlan:
    """What one loader worker reads in an epoch: its spans and its batches, in order."""

    spec: OrderSpec
    stream: int
    spans: tuple[Span, ...]
    batch_ids: np.ndarray  # the rank-level index of each of this stream's batches
    sizes: np.ndarray  # rows in each of those batches

    @cached_property
    def rows(self) -> int:
        return int(self.sizes.sum())

    @cached_property
    def offsets(self) -> np.ndarray:
        """Stream position where each batch starts (and, last, the end)."""
        return np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    @cached_property
    def span_ends(self) -> np.ndarray:
        return np.cumsum([s.rows for s in self.spans]).astype(np.int64)

    @cached_property
    def shuffled(self) -> bool:
        return get_shuffle(self.spec.shuffle).block_order is not None

    def first_batch(self, consumed: int) -> int:
        """Index into this stream's batches of the first rank batch at or after ``consumed``."""
        return int(np.searchsorted(self.batch_ids, consumed, side="left"))

    def block_bounds(self, block: int) -> tuple[int, int]:
        size = self.spec.block_size
        return block * size, min(self.rows, (block + 1) * size)

    def source_positions(self, lo: int, hi: int) -> np.ndarray:
        """Unshuffled stream positions of the rows at shuffled positions ``[lo, hi)``."""
        algo = get_shuffle(self.spec.shuffle)
        if algo.block_order is None or hi <= lo:
            return np.arange(lo, hi, dtype=np.int64)
        size, spec = self.spec.block_size, self.spec
        parts = []
        for block in range(lo // size, (hi - 1) // size + 1):
            b_lo, b_hi = self.block_bounds(block)
            perm = _block_order(algo.name, b_hi - b_lo, (spec.seed, spec.epoch, spec.rank, self.stream, block))
            parts.append(b_lo + perm[max(lo, b_lo) - b_lo: min(hi, b_hi) - b_lo])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def batch_sources(self, lo: int, hi: int) -> np.ndarray:
        """Unshuffled stream positions of the batch at ``[lo, hi)``, in stream order."""
        return self.run_sources(np.array([lo, hi], dtype=np.int64))

    def run_sources(self, bounds: np.ndarray) -> np.ndarray:
        """:meth:`batch_sources` of consecutive batches at once, one after another.

        ``bounds`` are the stream positions where the batches start, then where the
        last one ends (a slice of :attr:`offsets`, say).
        """
        positions = self.source_positions(int(bounds[0]), int(bounds[-1]))
        if not self.shuffled:
            return positions
        cuts = (bounds - bounds[0]).tolist()
        if len(cuts) == 2:
            return np.sort(positions)
        return np.concatenate([np.sort(positions[a:b]) for a, b in zip(cuts[:-1], cuts[1:])])

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(span index, row within the span)`` of unshuffled stream positions."""
        ends = self.span_ends
        span = np.searchsorted(ends, positions, side="right")
        starts = ends - np.array([s.rows for s in self.spans], dtype=np.int64)
        return span, positions - starts[span]

    def sample_ids(self, lo: int, hi: int, shard_offsets: np.ndarray) -> np.ndarray:
        """Split-wide sample ids (row number in manifest order) of the batch at ``[lo, hi)``."""
        return self.position_ids(self.batch_sources(lo, hi), shard_offsets)

    def position_ids(self, positions: np.ndarray, shard_offsets: np.ndarray) -> np.ndarray:
        """Split-wide sample ids of unshuffled stream positions."""
        span, row = self.locate(positions)
        shard = np.array([s.shard for s in self.spans], dtype=np.int64)[span]
        first = np.array([s.start for s in self.spans], dtype=np.int64)[span]
        return shard_offsets[shard] + first + row


@lru_cache(maxsize=8)
def _block_order(shuffle: str, length: int, key: tuple[int, ...]) -> np.ndarray:
    # A reader asks for the same block once per batch: memoise the last few.
    perm = SHUFFLES[shuffle].block_order(length, key)
    perm.setflags(write=False)
    return perm


def stream_for_worker(worker: int, num_workers: int, consumed: int) -> int:
    """The stream a ``DataLoader`` worker serves when ``consumed`` batches are already done."""
    return (worker + consumed) % num_workers


def rank_batch_count(total: int, spec: OrderSpec) -> int:
    return rank_counts(total, spec.world_size, spec.batch_size, spec.drop_last)[1]


def plan_stream(shard_rows: np.ndarray, spec: OrderSpec, stream: int) -> StreamPlan:
    """The plan of stream ``stream`` of rank ``spec.rank`` for epoch ``spec.epoch``."""
    shard_rows = np.asarray(shard_rows, dtype=np.int64)
    if not 0 <= stream < spec.num_workers:
        raise ConfigError(f"stream {stream} is out of range for {spec.num_workers} workers")
    counts, k = rank_counts(int(shard_rows.sum()), spec.world_size, spec.batch_size, spec.drop_last)
    rank_start = int(counts[: spec.rank].sum())
    sizes = batch_sizes(int(counts[spec.rank]), k, spec.batch_size)
    per_stream = [int(sizes[c:: spec.num_workers].sum()) for c in range(spec.num_workers)]
    lo = rank_start + sum(per_stream[:stream])
    hi = lo + per_stream[stream]
    order = get_shuffle(spec.shuffle).shard_order(len(shard_rows), spec.seed, spec.epoch)
    return StreamPlan(
        spec=spec,
        stream=stream,
        spans=tuple(spans_between(shard_rows, order, lo, hi)),
        batch_ids=np.arange(stream, k, spec.num_workers, dtype=np.int64),
        sizes=sizes[stream:: spec.num_workers],
    )


def rank_batches(shard_rows: np.ndarray, spec: OrderSpec, consumed: int = 0) -> list[np.ndarray]:
    """The sample ids of a rank's batches ``consumed..K-1``, in the order a ``DataLoader`` yields them.

    A reference for tests and debugging: readers compute the same from their own stream.
    """
    shard_rows = np.asarray(shard_rows, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(shard_rows)[:-1]]).astype(np.int64)
    per_worker = []
    for worker in range(spec.num_workers):
        plan = plan_stream(shard_rows, spec, stream_for_worker(worker, spec.num_workers, consumed))
        bounds = plan.offsets
        first = plan.first_batch(consumed)
        per_worker.append([plan.sample_ids(bounds[i], bounds[i + 1], offsets) for i in range(first, len(plan.sizes))])
    out = []
    for i in range(max((len(b) for b in per_worker), default=0)):  # round-robin, as a DataLoader does
        out.extend(batches[i] for batches in per_worker if i < len(batches))
    return out
