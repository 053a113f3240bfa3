"""Sample order properties, over every shuffle algorithm (pure functions, no I/O)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from storage import order
from storage.errors import ConfigError
from storage.order import OrderSpec, rank_batches, rank_counts


def _all_ranks(rows, **kw):
    world = kw["world_size"]
    return [rank_batches(rows, OrderSpec(rank=r, **kw)) for r in range(world)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(st.integers(0, 40), min_size=1, max_size=7),
    world_size=st.integers(1, 4),
    num_workers=st.integers(1, 3),
    batch_size=st.integers(1, 9),
    block_size=st.integers(1, 25),
    shuffle=st.sampled_from(sorted(order.SHUFFLES)),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 5),
    cut=st.floats(0, 1),
)
def test_order_properties(rows, world_size, num_workers, batch_size, block_size, shuffle, drop_last, seed, epoch, cut):
    rows = np.array(rows)
    kw = dict(world_size=world_size, num_workers=num_workers, batch_size=batch_size, block_size=block_size,
              shuffle=shuffle, drop_last=drop_last, seed=seed, epoch=epoch)
    try:
        rank_counts(int(rows.sum()), world_size, batch_size, drop_last)
    except ConfigError:
        total = int(rows.sum())
        # Refused only where equal, non-empty batch counts with each sample once are impossible.
        assert total < world_size * (batch_size if drop_last else 1) or (batch_size == 1 and total % world_size)
        assume(False)
    ranks = _all_ranks(rows, **kw)

    # Every rank has the same number of batches, each non-empty and at most batch_size.
    counts = {len(b) for b in ranks}
    assert len(counts) == 1
    assert all(1 <= len(batch) <= batch_size for b in ranks for batch in b)

    # Each sample exactly once across ranks x workers (drop_last: at most once, full batches only).
    ids = np.concatenate([batch for b in ranks for batch in b])
    assert len(np.unique(ids)) == len(ids)
    assert ids.min() >= 0 and ids.max() < rows.sum()
    if drop_last:
        assert len(ids) == counts.pop() * batch_size * world_size
    else:
        assert len(ids) == rows.sum()

    # The same arguments give the same order.
    again = _all_ranks(rows, **kw)
    assert all(np.array_equal(x, y) for a, b in zip(ranks, again) for x, y in zip(a, b))

    # Resuming after k batches yields exactly the rest of the uninterrupted sequence.
    rank = seed % world_size
    full = ranks[rank]
    k = int(cut * len(full))
    resumed = rank_batches(rows, OrderSpec(rank=rank, **kw), consumed=k)
    assert len(resumed) == len(full) - k
    assert all(np.array_equal(x, y) for x, y in zip(resumed, full[k:]))


def test_no_shuffle_reads_in_order_and_shuffles_differ_by_epoch():
    rows = np.array([30, 20, 50])
    seq = np.concatenate(rank_batches(rows, OrderSpec(batch_size=8, shuffle="none")))
    assert np.array_equal(seq, np.arange(100))
    a = np.concatenate(rank_batches(rows, OrderSpec(batch_size=8, epoch=0)))
    b = np.concatenate(rank_batches(rows, OrderSpec(batch_size=8, epoch=1)))
    assert not np.array_equal(a, b) and np.array_equal(np.sort(a), np.sort(b))


def test_block_shuffle_stays_within_its_window():
    rows = np.array([1000])
    seq = np.concatenate(rank_batches(rows, OrderSpec(batch_size=10, block_size=100, shuffle="block")))
    for start in range(0, 1000, 100):
        assert set(seq[start:start + 100]) == set(range(start, start + 100))
    assert not np.array_equal(seq, np.arange(1000))


@pytest.mark.parametrize("shuffle", sorted(order.SHUFFLES))
@pytest.mark.parametrize("block_size", [1, 7, 100, 1000])
def test_sources_of_a_run_of_batches_are_each_batch_sources_in_turn(shuffle, block_size):
    rows = np.array([37, 120, 5, 300])
    plan = order.plan_stream(rows, OrderSpec(batch_size=9, block_size=block_size, shuffle=shuffle), 0)
    bounds = plan.offsets
    for first, stop in ((0, len(plan.sizes)), (3, 4), (5, 17)):
        # Each batch's rows in stream order: the shuffled positions of the batch, sorted.
        each = [plan.source_positions(bounds[i], bounds[i + 1]) for i in range(first, stop)]
        expected = np.concatenate([np.sort(p) if shuffle == "block" else p for p in each])
        assert np.array_equal(plan.run_sources(bounds[first: stop + 1]), expected)
        assert np.array_equal(plan.batch_sources(bounds[first], bounds[first + 1]), expected[: plan.sizes[first]])


def test_workers_read_contiguous_shard_ranges():
    rows = np.full(12, 10)
    spec = OrderSpec(batch_size=5, num_workers=3, shuffle="shard")
    plans = [order.plan_stream(rows, spec, w) for w in range(3)]
    shards = [{s.shard for s in p.spans} for p in plans]
    assert sum(len(s) for s in shards) <= 12 + 2, "a shard is split between at most two streams"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(rank=2, world_size=2), "rank 2 is out of range for world_size 2; allowed: 0..1"),
        (dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
        (dict(shuffle="random"), "unknown shuffle 'random'; allowed: none, shard, block"),
        (dict(seed=-1), "seed must be"),
    ],
)
def test_bad_order_spec(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        OrderSpec(**kwargs)


def test_too_few_samples_for_equal_batches():
    with pytest.raises(ConfigError, match="use drop_last=True"):
        rank_counts(3, 4, 2, drop_last=False)
    with pytest.raises(ConfigError, match="do not fill one batch"):
        rank_counts(7, 2, 4, drop_last=True)
