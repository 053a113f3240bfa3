"""The streaming loader: order, content, ranks, DataLoader workers, resume, zero copy."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from storage import order
from storage.errors import ConfigError, ManifestError
from storage.loader import StreamingDataset
from storage.prefetch import Prefetcher
from tests.storage.conftest import stage


def _ids(batches) -> list[np.ndarray]:
    return [b["idx"].numpy() for b in batches]


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("cache,decoded", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("shuffle", sorted(order.SHUFFLES))
def test_batches_follow_the_order_and_hold_the_right_rows(images, cache_opts, shuffle, cache, decoded):
    ds = StreamingDataset(images.url, batch_size=50, shuffle=shuffle, block_size=300, index_key="idx",
                          cache=cache, storage_options=cache_opts if cache else None, decoded=decoded)
    batches = list(ds)
    rows = images.rows("train")
    assert len(batches) == len(ds) == -(-rows.num_rows // 50)
    assert _same(_ids(batches), order.rank_batches(ds.shard_rows, ds.spec(1)))
    ids = np.concatenate(_ids(batches))
    assert np.array_equal(np.sort(ids), np.arange(rows.num_rows))
    image, label = batches[0]["image"], batches[0]["label"]
    assert image.shape == (50, 3, 4, 4) and image.dtype == torch.uint8 and label.dtype == torch.int64
    assert np.array_equal(torch.cat([b["image"] for b in batches]).numpy(), images.images("train")[ids])
    assert np.array_equal(torch.cat([b["label"] for b in batches]).numpy(), rows.column("label").to_numpy()[ids])


@pytest.mark.parametrize("drop_last", [False, True])
def test_every_rank_gets_as_many_batches_and_each_sample_once(images, drop_last):
    ranks = [StreamingDataset(images.url, batch_size=64, rank=r, world_size=3, seed=7, index_key="idx",
                              drop_last=drop_last) for r in range(3)]
    batches = [list(ds) for ds in ranks]
    assert len({len(b) for b in batches}) == 1 and len(batches[0]) == len(ranks[0])
    ids = np.concatenate([i for b in batches for i in _ids(b)])
    assert len(np.unique(ids)) == len(ids)
    if drop_last:
        assert all(len(i) == 64 for b in batches for i in _ids(b))
    else:
        assert len(ids) == images.rows("train").num_rows


def test_dataloader_workers_and_an_exact_resume(images, cache_opts):
    make = lambda: StreamingDataset(images.url, batch_size=64, index_key="idx", cache=True,  # noqa: E731
                                    storage_options=cache_opts)
    ds = make()
    full = _ids(DataLoader(ds, batch_size=None, num_workers=2))
    assert _same(full, order.rank_batches(ds.shard_rows, ds.spec(2)))

    loader = Prefetcher(make(), num_workers=2)
    batches = iter(loader)
    first = [next(batches)["idx"].numpy() for _ in range(5)]
    state = loader.state_dict()
    batches.close()  # interrupted
    assert state["batches"] == 5 and state["num_workers"] == 2

    resumed = Prefetcher(make(), num_workers=2)
    resumed.load_state_dict(state)
    rest = _ids(resumed)
    assert _same(first + rest, full)
    assert resumed.stats.hit_rate == 1.0, "the first pass filled the node cache"


def test_in_process_resume_and_epochs(images):
    make = lambda: StreamingDataset(images.url, batch_size=40, seed=3, index_key="idx")  # noqa: E731
    ds = make()
    ds.set_epoch(2)
    full = _ids(ds)
    ds.set_epoch(2)
    head = []
    for batch in ds:
        head.append(batch["idx"].numpy())
        if len(head) == 9:
            break
    state = ds.state_dict()
    again = make()
    again.load_state_dict(state)
    assert again.epoch == 2
    assert _same(head + _ids(again), full)
    again.set_epoch(3)
    other = _ids(again)
    assert not _same(other, full) and len(other) == len(full), "a new epoch, a new order"


def test_read_counters_add_up_after_an_epoch_and_after_a_break(images, cache_opts):
    ds = StreamingDataset(images.url, batch_size=40, cache=True, storage_options=cache_opts)
    counters = ds.counters()
    assert len(ds) > 2 * 16 + 1, "more batches than a few progress reports"
    list(ds)
    after_epoch = counters.total()
    assert after_epoch["batches"] == len(ds) and after_epoch["hits"] + after_epoch["misses"] >= len(ds.shards)
    assert after_epoch["bytes_in_flight"] == 0
    stream = iter(ds)
    for _ in range(21):
        next(stream)
    stream.close()
    assert counters.total()["batches"] == len(ds) + 21 and counters.total()["bytes_in_flight"] == 0


def test_zero_copy_tensors_where_the_layout_allows(tmp_path):
    url = str(tmp_path / "raw")
    stage("synthetic-image?rows=512&size=4", url, codec="none")
    ds = StreamingDataset(url, batch_size=16, shuffle="none")
    first, second = list(ds)[:2]
    image = first["image"]
    assert second["image"].data_ptr() == image.data_ptr() + image.numel(), "views of one Arrow buffer"
    shuffled = next(iter(StreamingDataset(url, batch_size=16)))
    assert shuffled["image"].is_contiguous() and shuffled["image"].shape == (16, 3, 4, 4)


def test_transforms_and_columns_without_a_tensor_layout(tmp_path, images):
    table = pa.table({"name": [f"item-{i}" for i in range(100)], "score": np.arange(100, dtype=np.float32)})
    pq.write_table(table, tmp_path / "t.parquet")
    url = str(tmp_path / "ds")
    stage(str(tmp_path / "t.parquet"), url, shard_size="1KB")
    ds = StreamingDataset(url, batch_size=10, shuffle="block",
                          transforms={"name": lambda arr: torch.tensor([len(s) for s in arr.to_pylist()])})
    batches = list(ds)
    assert all(b["name"].shape == (10,) for b in batches)
    assert sorted(torch.cat([b["score"] for b in batches]).tolist()) == list(range(100))
    with pytest.raises(ConfigError, match="column 'name' is string, which has no tensor layout; give a transform"):
        StreamingDataset(url, batch_size=10)

    normalized = StreamingDataset(images.url, batch_size=32, columns=["image"],
                                  transforms={"image": lambda x: torch.from_numpy(x).float().div_(255)})
    batch = next(iter(normalized))
    assert set(batch) == {"image"} and batch["image"].dtype == torch.float32 and batch["image"].max() <= 1


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        (dict(columns=["pixels"]), ConfigError, "column\\(s\\) 'pixels' not in the dataset; it has: image, label"),
        (dict(split="test"), ManifestError, "split 'test' is not in this dataset; it has: train, val"),
        (dict(columns=["label"], transforms={"image": abs}), ConfigError, "transforms name column\\(s\\) 'image'"),
        (dict(cache="yes"), ConfigError, "cache='yes' is not allowed"),
        (dict(rank=3, world_size=3), ConfigError, "rank 3 is out of range for world_size 3"),
        (dict(shuffle="random"), ConfigError, "unknown shuffle 'random'"),
        (dict(index_key="label"), ConfigError, "index_key 'label' is already a column name"),
    ],
)
def test_bad_loader_arguments(images, kwargs, error, message):
    with pytest.raises(error, match=message):
        StreamingDataset(images.url, **{"batch_size": 32, **kwargs})


def test_a_state_from_another_configuration_is_refused(images):
    ds = StreamingDataset(images.url, batch_size=32, seed=1)
    state = ds.state_dict(batches=3, num_workers=2)
    with pytest.raises(ConfigError, match="loader state has seed=1 but this loader has 2"):
        StreamingDataset(images.url, batch_size=32, seed=2).load_state_dict(state)
    with pytest.raises(ConfigError, match=f"batches=999; allowed: 0..{len(ds)}"):
        ds.load_state_dict({**state, "batches": 999})
    ds.load_state_dict(state)
    with pytest.raises(ConfigError, match="saved with 2 loader worker\\(s\\) and this run has 1"):
        next(iter(ds))
