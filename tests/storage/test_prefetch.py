"""The prefetcher: order and stats, depth tuning, errors, shutdown, devices."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from storage import order
from storage.errors import ConfigError, SourceError
from storage.loader import StreamingDataset
from storage.prefetch import Prefetcher
from tests.conftest import ROOT


@pytest.mark.parametrize("gather", ["host", "device"])
def test_prefetched_batches_keep_the_order_and_report_stalls(images, cache_opts, gather):
    ds = StreamingDataset(images.url, batch_size=64, index_key="idx", cache=True, storage_options=cache_opts)
    loader = Prefetcher(ds, depth=3, shard_depth=2, device="cpu", gather=gather)
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
    with pytest.raises(ConfigError, match="gather 'gpu' is not allowed; allowed: host, device, auto"):
        Prefetcher(ds, gather="gpu")
    with pytest.raises(ConfigError, match="gather='device' is not possible here: num_workers > 0"):
        Prefetcher(ds, gather="device", num_workers=2)
    assert Prefetcher(ds, gather="auto").gather == "host", "auto gathers on the host without CUDA"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("producer", ["thread", "process"])
def test_batches_arrive_on_the_device_intact(images, producer):
    ds = StreamingDataset(images.url, batch_size=64, index_key="idx")
    host = list(StreamingDataset(images.url, batch_size=64, index_key="idx"))
    device = list(Prefetcher(ds, device="cuda", depth=3, producer=producer))
    assert len(device) == len(host) and all(b["image"].is_cuda for b in device)
    assert all(torch.equal(h["image"], d["image"].cpu()) and torch.equal(h["idx"], d["idx"].cpu())
               for h, d in zip(host, device))


@pytest.mark.parametrize("gather", ["host", "device"])
def test_the_next_epochs_first_shards_are_read_ahead(images, gather):
    ds = StreamingDataset(images.url, batch_size=64, index_key="idx", block_size=200)
    loader = Prefetcher(ds, device="cpu", gather=gather)
    list(loader)
    assert ds._preloaded and {epoch for epoch, _ in ds._preloaded} == {1}
    for epoch in (3, 1):  # an unexpected epoch drops what was read ahead; the order holds either way
        loader.set_epoch(epoch)
        ids = [b["idx"].numpy() for b in loader]
        expected = order.rank_batches(ds.shard_rows, ds.spec(1))
        assert all(np.array_equal(a, b) for a, b in zip(ids, expected)) and len(ids) == len(expected)
    assert {epoch for epoch, _ in ds._preloaded} == {2}


# ---------------------------------------------------------------------- producer="process"


def _ids(loader) -> list[np.ndarray]:
    return [b["idx"].numpy().copy() for b in loader]


def test_a_producer_process_gives_the_same_batches_and_stats(images, cache_opts):
    ds = StreamingDataset(images.url, batch_size=64, index_key="idx", cache=True, storage_options=cache_opts)
    thread = [{k: v.clone() for k, v in b.items()} for b in Prefetcher(ds)]
    loader = Prefetcher(ds, producer="process", depth=2)
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        ds.set_epoch(epoch)
        batches = list(loader)
        expected = order.rank_batches(ds.shard_rows, ds.spec(1))
        assert [b["idx"].numpy().tolist() for b in batches] == [e.tolist() for e in expected]
        assert loader.stats.steps == len(ds) and loader.stats.samples == images.rows("train").num_rows
        assert loader.stats.hit_rate == 1.0 and 0 <= loader.stats.stall_share <= 1
        assert not os.path.exists(f"/proc/{loader._feed.pid}"), "the producer is reaped at the end of the epoch"
    loader.set_epoch(0)
    again = list(loader)
    for a, b in zip(thread, again):  # every column equal, and each batch the consumer's own (not a ring slot)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again[0]["image"].data_ptr() != again[1]["image"].data_ptr()


@pytest.mark.parametrize("how", [{"producer": "process"}, {"device": "cpu", "gather": "device"}, {}],
                         ids=["process", "device-gather", "thread"])
def test_a_producer_process_resumes_mid_epoch(images, how):
    ds = StreamingDataset(images.url, batch_size=64, index_key="idx", seed=3, block_size=170)
    whole = _ids(Prefetcher(ds, **how))
    loader = Prefetcher(ds, **how)
    first = []
    for batch in loader:
        first.append(batch["idx"].numpy().copy())
        if len(first) == 5:
            state = loader.state_dict()
            break
    resumed = Prefetcher(StreamingDataset(images.url, batch_size=64, index_key="idx", seed=3, block_size=170), **how)
    resumed.load_state_dict(state)
    rest = _ids(resumed)
    assert [a.tolist() for a in first + rest] == [a.tolist() for a in whole]


def test_leaving_a_producer_process_early_reaps_it(images):
    loader = Prefetcher(StreamingDataset(images.url, batch_size=16), producer="process", depth=1)
    for i, _ in enumerate(loader):
        if i == 2:
            break
    assert not os.path.exists(f"/proc/{loader._feed.pid}")


def test_a_producer_process_error_reaches_the_consumer(images, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(images.url, copy)
    ds = StreamingDataset(str(copy), batch_size=64)
    victim = ds.shards[int(ds.spec(1).seed) % len(ds.shards)].name
    (copy / victim).unlink() if (copy / victim).exists() else next(copy.rglob(victim)).unlink()
    with pytest.raises(Exception, match=victim.rsplit("/", 1)[-1]):
        list(Prefetcher(ds, producer="process"))


def test_a_killed_producer_process_is_a_clear_error(images):
    loader = Prefetcher(StreamingDataset(images.url, batch_size=16), producer="process", depth=1)
    with pytest.raises(SourceError, match=r"producer process \(pid \d+\) ended without finishing the epoch "
                                          r"\(killed by signal 9\)"):
        for i, _ in enumerate(loader):
            if i == 1:
                os.kill(loader._feed.pid, signal.SIGKILL)


def test_bad_producer_arguments(images):
    ds = StreamingDataset(images.url, batch_size=16)
    with pytest.raises(ConfigError, match="producer 'fork' is not allowed; allowed: thread, process"):
        Prefetcher(ds, producer="fork")
    with pytest.raises(ConfigError, match="needs a StreamingDataset source and num_workers=0"):
        Prefetcher(ds, producer="process", num_workers=2)
    with pytest.raises(ConfigError, match="needs a StreamingDataset source"):
        Prefetcher([{"x": torch.zeros(1)}], producer="process")


def test_a_producer_process_exits_when_its_training_process_is_killed(images, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from storage.loader import StreamingDataset\n"
        "from storage.prefetch import Prefetcher\n"
        f"loader = Prefetcher(StreamingDataset({images.url!r}, batch_size=16), producer='process', depth=1)\n"
        "for batch in loader:\n"
        "    print(loader._feed.pid, flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(proc.stdout.readline())
        assert _running(child)
        proc.kill()  # SIGKILL: no finally blocks run in the training process
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _running(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(child), "the producer exits once its training process is gone"
    finally:
        proc.kill()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
