"""Batches gathered on the device (storage.device_gather): the same order, rows, ranks and
resume as the host path. Run on device='cpu' here; the CUDA run is marked gpu."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from storage import order
from storage.loader import StreamingDataset
from storage.prefetch import Prefetcher


def _ids(batches) -> list[list[int]]:
    return [b["idx"].cpu().numpy().tolist() for b in batches]


def _copy(batches) -> list[dict]:
    return [{k: v.cpu().clone() for k, v in b.items()} for b in batches]


@pytest.mark.parametrize("shuffle", sorted(order.SHUFFLES))
@pytest.mark.parametrize("batch_size,block_size", [(50, 300), (64, 200), (64, 256), (40, 7)])
def test_device_batches_follow_the_order_and_hold_the_right_rows(images, cache_opts, shuffle, batch_size,
                                                                 block_size):
    ds = StreamingDataset(images.url, batch_size=batch_size, shuffle=shuffle, block_size=block_size, index_key="idx",
                          cache=True, storage_options=cache_opts)
    loader = Prefetcher(ds, device="cpu", gather="device", depth=3)
    assert loader.gather == "device"
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        batches = _copy(loader)
        expected = order.rank_batches(ds.shard_rows, ds.spec(1))
        assert _ids(batches) == [e.tolist() for e in expected]
        ids = np.concatenate([b["idx"].numpy() for b in batches])
        assert np.array_equal(torch.cat([b["image"] for b in batches]).numpy(), images.images("train")[ids])
        labels = images.rows("train").column("label").to_numpy()
        assert np.array_equal(torch.cat([b["label"] for b in batches]).numpy(), labels[ids])
        assert loader.stats.steps == len(ds) and loader.stats.hit_rate == (0.0 if epoch == 0 else 1.0)
    host = Prefetcher(StreamingDataset(images.url, batch_size=batch_size, shuffle=shuffle, block_size=block_size,
                                       index_key="idx"))
    host.set_epoch(1)
    for a, b in zip(_copy(host), batches):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


@pytest.mark.parametrize("drop_last", [False, True])
def test_device_batches_partition_ranks_like_the_host_path(images, drop_last):
    for rank in range(3):
        make = lambda: StreamingDataset(images.url, batch_size=64, rank=rank, world_size=3, seed=7,  # noqa: E731
                                        index_key="idx", drop_last=drop_last, block_size=150)
        assert _ids(Prefetcher(make(), device="cpu", gather="device")) == _ids(make())


def test_windows_are_copied_once_and_the_host_ring_is_reused(images):
    ds = StreamingDataset(images.url, batch_size=50, block_size=500, index_key="idx")
    loader = Prefetcher(ds, device="cpu", gather="device")
    list(loader)
    rows = int(ds.shard_rows.sum())
    assert loader._gatherer.copies == -(-rows // 500), "each window once"
    ring = loader.stats.ring_bytes
    assert ring > 0 and loader.stats.as_dict()["ring_bytes"] == ring
    loader.set_epoch(1)
    list(loader)
    assert loader.stats.ring_bytes == ring, "the same buffers serve the next epoch"


def test_device_transforms_run_on_each_batch(images):
    ds = StreamingDataset(images.url, batch_size=64, columns=["image", "label"])
    loader = Prefetcher(ds, device="cpu", gather="device", device_transforms={"image": lambda t: t.float() / 255})
    host = list(StreamingDataset(images.url, batch_size=64, columns=["image", "label"]))
    for a, b in zip(host, loader):
        assert b["image"].dtype == torch.float32 and torch.equal(a["image"].float() / 255, b["image"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_batches_on_cuda_equal_the_host_path(images):
    make = lambda: StreamingDataset(images.url, batch_size=64, index_key="idx", block_size=300)  # noqa: E731
    host = _copy(Prefetcher(make(), device="cuda", gather="host"))
    loader = Prefetcher(make(), device="cuda", gather="device")
    device = list(loader)
    assert all(b["image"].is_cuda for b in device) and loader.stats.ring_bytes > 0
    for a, b in zip(host, _copy(device)):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert Prefetcher(make(), device="cuda", gather="auto").gather == "device", "a small window fits"


def test_what_fits_on_the_device(images):
    from storage.device_gather import RESIDENT_WINDOWS, fits_on_device, window_bytes

    ds = StreamingDataset(images.url, batch_size=64, block_size=1000, index_key="idx")
    row = 3 * 4 * 4 + 8 + 8 + 8  # image, label, permutation, sample id
    assert window_bytes(ds) == row * 1000
    assert fits_on_device(RESIDENT_WINDOWS * window_bytes(ds), free=4 * RESIDENT_WINDOWS * window_bytes(ds))
    assert not fits_on_device(RESIDENT_WINDOWS * window_bytes(ds), free=RESIDENT_WINDOWS * window_bytes(ds))
    assert Prefetcher(ds)._device_room(), "off CUDA the depth is not bounded by device memory"
