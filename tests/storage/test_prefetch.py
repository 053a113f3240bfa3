"""The prefetcher: order and stats, depth tuning, errors, shutdown, devices."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from storage import order
from storage.errors import ConfigError
from storage.loader import StreamingDataset
from storage.prefetch import Prefetcher


def test_prefetched_batches_keep_the_order_and_report_stalls(images, cache_opts):
    ds = StreamingDataset(images.url, batch_size=64, index_key="idx", cache=True, storage_options=cache_opts)
    loader = Prefetcher(ds, depth=3, shard_depth=2)
    assert len(loader) == len(ds)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        ids = [b["idx"].numpy() for b in loader]
        expected = order.rank_batches(ds.shard_rows, ds.spec(1))
        assert len(ids) == len(expected) and all(np.array_equal(a, b) for a, b in zip(ids, expected))
        stats = loader.stats
        assert stats.steps == len(ds) == len(stats.step_stall_s) and stats.samples == images.rows("train").num_rows
        assert stats.stall_s == pytest.approx(sum(stats.step_stall_s)) and 0 <= stats.stall_share <= 1
        assert stats.hit_rate == (0.0 if epoch == 0 else 1.0), "cold first epoch, warm second"
    assert set(stats.as_dict()) >= {"stall_s", "stall_share", "hit_rate", "bytes_in_flight", "depth"}


class _Slow:
    """A source slower than its consumer: every step stalls."""

    def __init__(self, n: int, fail_at: int | None = None):
        self.n, self.fail_at = n, fail_at

    def __len__(self):
        return self.n

    def __iter__(self):
        for i in range(self.n):
            if i == self.fail_at:
                raise RuntimeError(f"source broke at {i}")
            time.sleep(0.002)
            yield {"x": torch.full((4,), i)}


def test_depth_grows_while_the_stall_share_is_above_target():
    loader = Prefetcher(_Slow(40), depth=1, stall_target=0.05, window=4)
    assert [int(b["x"][0]) for b in loader] == list(range(40))
    assert loader.stats.depth > 1 and loader.stats.tuning, "depth raised after stalled windows"
    assert loader.stats.hit_rate is None, "a plain iterable has no cache"


def test_source_errors_reach_the_consumer():
    with pytest.raises(RuntimeError, match="source broke at 3"):
        list(Prefetcher(_Slow(10, fail_at=3)))


def test_leaving_early_stops_the_producer(images):
    loader = Prefetcher(StreamingDataset(images.url, batch_size=16), depth=2)
    for i, _ in enumerate(loader):
        if i == 2:
            break
    time.sleep(0.05)
    assert not any(t.name == "swarm-prefetch" and t.is_alive() for t in threading.enumerate())


def test_bad_prefetcher_arguments(images):
    ds = StreamingDataset(images.url, batch_size=16)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available here"):
            Prefetcher(ds, device="cuda")
    with pytest.raises(ConfigError, match="stall_target is a share of wall time"):
        Prefetcher(ds, stall_target=5)
    with pytest.raises(ConfigError, match="needs a StreamingDataset"):
        Prefetcher([{"x": torch.zeros(1)}], num_workers=2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batches_arrive_on_the_device_intact(images):
    ds = StreamingDataset(images.url, batch_size=64, index_key="idx")
    host = list(StreamingDataset(images.url, batch_size=64, index_key="idx"))
    device = list(Prefetcher(ds, device="cuda", depth=3))
    assert all(b["image"].is_cuda for b in device)
    assert all(torch.equal(h["image"], d["image"].cpu()) for h, d in zip(host, device))


def test_the_next_epochs_first_shards_are_read_ahead(images):
    ds = StreamingDataset(images.url, batch_size=64, index_key="idx", block_size=200)
    loader = Prefetcher(ds)
    list(loader)
    assert ds._preloaded and {epoch for epoch, _ in ds._preloaded} == {1}
    for epoch in (3, 1):  # an unexpected epoch drops what was read ahead; the order holds either way
        loader.set_epoch(epoch)
        ids = [b["idx"].numpy() for b in loader]
        expected = order.rank_batches(ds.shard_rows, ds.spec(1))
        assert all(np.array_equal(a, b) for a, b in zip(ids, expected)) and len(ids) == len(expected)
    assert {epoch for epoch, _ in ds._preloaded} == {2}
