"""The node-local shard cache: fsspec behaviour, verification, budget, processes, S3."""

from __future__ import annotations

import hashlib
import mmap
import multiprocessing
import os
import shutil
import signal
import threading
import time

import numpy as np
import pytest
import xxhash

from storage import cache_index
from storage.cache import ShardCacheFileSystem
from storage.cache_index import CacheDir, fast_digest
from storage.sizes import parse_bytes
from storage.dataset import Dataset
from storage.errors import ConfigError, IntegrityError
from storage.urls import url_to_fs
from tests.storage.conftest import stage


def _cache(url: str, opts: dict, **more) -> tuple[ShardCacheFileSystem, str]:
    fs, root = url_to_fs(f"shardcache::{url}", {**opts, **more, "skip_instance_cache": True})
    assert isinstance(fs, ShardCacheFileSystem)
    return fs, root


def _key(entry) -> str:
    return entry.hash.replace(":", "-")


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _copy(staged, tmp_path) -> str:
    dest = str(tmp_path / "origin")
    shutil.copytree(staged.url, dest)
    return dest


def test_chained_url_reads_like_fsspec_caches(images, cache_opts):
    fs, root = _cache(images.url, cache_opts)
    shards = images.dataset.shards("train")
    assert root == images.url
    assert sorted(fs.ls(root, detail=False)) == sorted(f"{root}/{p}" for p in ("index.json", "train", "val"))
    assert fs.info(f"{root}/{shards[0].name}")["size"] == shards[0].bytes
    for entry in shards[:3]:
        path = f"{root}/{entry.name}"
        data = fs.cat_file(path)
        assert _sha(data) == entry.hash
        with fs.open(path, "rb") as f:
            assert f.read() == data
        assert fs.cat_file(path, start=10, end=20) == data[10:20]
    assert fs.stats.misses == 3 and fs.stats.hits == 6, "one fetch per shard, then local reads"
    assert len(fs.cache.keys()) == 3
    fs.cat_file(f"{root}/index.json")
    assert len(fs.cache.keys()) == 3, "the manifest is never cached: it switches dataset versions"


def test_a_damaged_cached_copy_is_detected_and_fetched_again(images, cache_opts):
    fs, root = _cache(images.url, cache_opts)
    entry = images.dataset.shards("train")[0]
    path = f"{root}/{entry.name}"
    good = fs.cat_file(path)
    (key,) = fs.cache.keys()
    cached = fs.cache.data_path(key)
    with open(cached, "r+b") as f:  # flip one byte in the middle
        f.seek(len(good) // 2)
        byte = f.read(1)
        f.seek(len(good) // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert fs.cat_file(path) == good
    assert fs.stats.corrupt_hits == 1 and fs.stats.misses == 2
    with open(cached, "rb") as f:
        assert f.read() == good, "the damaged copy was replaced"


def test_a_corrupt_origin_shard_fails_naming_the_shard(images, cache_opts, tmp_path):
    origin = _copy(images, tmp_path)
    entry = Dataset.open(origin).shards("train")[1]
    with open(f"{origin}/{entry.name}", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    fs, root = _cache(origin, cache_opts)
    with pytest.raises(IntegrityError, match=f"shard '{entry.name}' failed verification twice .* is corrupt"):
        fs.cat_file(f"{root}/{entry.name}")
    assert fs.stats.refetches == 1, "fetched once more before failing"
    assert fs.cache.keys() == [] and fs.cache.usage() == 0, "nothing corrupt is cached"


def test_lru_eviction_keeps_recent_and_open_files(images, cache_opts):
    shards = images.dataset.shards("train")[:4]
    budget = 2 * max(s.bytes for s in shards) + 200  # room for two shards
    fs, root = _cache(images.url, cache_opts, cache_bytes=budget, wait_s=0.05)

    def read(i):
        time.sleep(0.01)  # distinct mtimes: the LRU clock
        return fs.cat_file(f"{root}/{shards[i].name}")

    read(0), read(1), read(0)  # 0 is now the most recently used
    read(2)  # evicts 1, the least recently used
    assert fs.cache.keys() == sorted([_key(shards[0]), _key(shards[2])])
    with fs.open(f"{root}/{shards[3].name}") as held:  # fills 3 (evicting 0), held open from here on
        read(1)  # evicts 2
        assert fs.cache.keys() == sorted([_key(shards[1]), _key(shards[3])])
        read(0)  # evicts 1: 3 is older but open
        assert fs.cache.keys() == sorted([_key(shards[0]), _key(shards[3])])
        assert _sha(held.read()) == shards[3].hash
    assert fs.cache.usage() <= budget


def test_a_full_cache_of_files_in_use_reads_without_storing(images, cache_opts):
    shards = images.dataset.shards("train")[:2]
    fs, root = _cache(images.url, cache_opts, cache_bytes=shards[0].bytes + 100, wait_s=0.05)
    with fs.open(f"{root}/{shards[0].name}"):
        data = fs.cat_file(f"{root}/{shards[1].name}")
    assert _sha(data) == shards[1].hash
    assert fs.stats.bypassed == 1 and len(fs.cache.keys()) == 1


def _churn(url: str, opts: dict, seed: int, rounds: int, errors) -> None:
    import random

    fs, root = _cache(url, opts)
    shards = Dataset.open(url).shards("train")
    rng = random.Random(seed)
    for _ in range(rounds):
        for entry in rng.sample(shards, len(shards)):
            if seed % 2:
                with fs.open(f"{root}/{entry.name}") as f:
                    data = f.read()
            else:
                data = fs.cat_file(f"{root}/{entry.name}")
            if _sha(data) != entry.hash:
                errors.put(f"{entry.name}: torn or wrong bytes in process {seed}")
    errors.put(("stats", fs.stats.as_dict()))


def test_four_processes_share_one_budget(images, cache_opts):
    shards = images.dataset.shards("train")
    largest = max(s.bytes for s in shards)
    budget = int(3.5 * largest)
    opts = {**cache_opts, "cache_bytes": budget, "wait_s": 0.5}
    cache = CacheDir(opts["cache_dir"], budget)
    peak = [0]
    done = threading.Event()

    def watch():
        while not done.is_set():
            total = 0
            with cache.budget_lock():  # a consistent snapshot: files grow and move only under this lock
                for dirpath, _dirs, files in os.walk(cache.root):
                    total += sum(os.stat(os.path.join(dirpath, name)).st_size for name in files)
            peak[0] = max(peak[0], total)
            time.sleep(0.001)

    ctx = multiprocessing.get_context("fork")
    errors = ctx.Queue()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    procs = [ctx.Process(target=_churn, args=(images.url, opts, seed, 3, errors)) for seed in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    done.set()
    watcher.join()
    results = [errors.get(timeout=10) for _ in range(4)]
    assert all(p.exitcode == 0 for p in procs)
    problems = [r for r in results if not (isinstance(r, tuple) and r[0] == "stats")]
    assert problems == []
    stats = [r[1] for r in results]
    assert sum(s["misses"] for s in stats) >= len(shards), "the budget forced evictions and refills"
    assert peak[0] <= budget + largest, f"peak {peak[0]} bytes on disk over budget {budget} + one shard {largest}"


def _die_holding_locks(root: str, key: str, pinned_key: str, ready) -> None:
    cache = CacheDir(root, 10**9)
    pin = cache.open_pinned(pinned_key)
    assert pin is not None
    with cache.fill_lock(key):
        reservation = cache.reserve(key, 5000)
        assert reservation is not None
        ready.set()
        time.sleep(120)


def test_sigkill_leaves_nothing_locked_or_stale(images, cache_opts):
    fs, root = _cache(images.url, cache_opts)
    first, second = images.dataset.shards("train")[:2]
    fs.cat_file(f"{root}/{first.name}")
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_die_holding_locks, args=(fs.cache.root, _key(second), _key(first), ready))
    proc.start()
    assert ready.wait(30)
    assert len(os.listdir(os.path.join(fs.cache.root, "tmp"))) == 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    # The fill lock, the reservation and the pin died with the process.
    assert _sha(fs.cat_file(f"{root}/{second.name}")) == second.hash
    assert os.listdir(os.path.join(fs.cache.root, "tmp")) == [], "the dead fill's temporary was swept"
    assert fs.cache.clear() == 2, "the file the dead process had open can be evicted"


def test_decoded_tier_serves_memory_mapped_tables(images, cache_opts):
    fs, root = _cache(images.url, cache_opts, decoded=True)
    entry = images.dataset.shards("train")[0]
    expected = images.dataset.read_shard(entry)
    with fs.open_table(f"{root}/{entry.name}", entry, "arrow") as first:
        assert first.table.equals(expected) and not first.local
    assert fs.cache.keys() == [_key(entry) + "-ipc"], "only the decoded copy is kept"
    with fs.open_table(f"{root}/{entry.name}", entry, "arrow") as again:
        assert again.table.equals(expected) and again.local and again.pinned is not None


def test_decoded_fills_never_nest_fill_locks(images, cache_opts, monkeypatch):
    """With one stripe every key shares a fill lock: a nested lock would wait forever."""
    from storage import cache_index

    monkeypatch.setattr(cache_index, "STRIPES", 1)
    fs, root = _cache(images.url, cache_opts, decoded=True)
    entry = images.dataset.shards("train")[2]
    done = []
    worker = threading.Thread(target=lambda: done.append(fs.open_table(f"{root}/{entry.name}", entry, "arrow")),
                              daemon=True)
    worker.start()
    worker.join(20)
    assert done and done[0].table.num_rows == entry.rows


def test_s3_through_the_loopback_server(s3, bucket, cache_opts):
    url = f"s3://{bucket}/ds"
    stage("synthetic-image?rows=600&size=4", url, shard_size="8KB", storage_options=s3.storage_options)
    opts = {**cache_opts, **s3.storage_options}
    fs, root = _cache(url, opts)
    shards = Dataset.open(url, s3.storage_options).shards()
    assert root == f"{bucket}/ds" and len(shards) > 3
    for entry in shards:
        assert _sha(fs.cat_file(f"{root}/{entry.name}")) == entry.hash
    again, _ = _cache(url, opts)
    for entry in shards:
        assert _sha(again.cat_file(f"{root}/{entry.name}")) == entry.hash
    assert fs.stats.misses == len(shards) and again.stats.hits == len(shards) and again.stats.misses == 0


@pytest.mark.parametrize(
    "options,message",
    [
        ({"cache_bytes": "lots"}, "cache_bytes must be a number of bytes like 10GB or 512MiB, got 'lots'"),
        ({"cache_bytes": 0}, "greater than 0"),
        ({"verify": "never"}, "verify='never' is not allowed; allowed: always, fill"),
    ],
)
def test_bad_cache_options(images, cache_opts, options, message):
    with pytest.raises(ConfigError, match=message):
        _cache(images.url, {**cache_opts, **options})


def test_fast_digest_is_xxh3_128_hashed_through_ctypes_when_large(tmp_path, monkeypatch):
    if cache_index._XXH3_128 is None:
        pytest.skip("this xxhash build does not export XXH3_128bits")
    sizes = []  # ctypes (CDLL) releases the GIL for the calls it makes; xxhash's own functions hold it
    monkeypatch.setattr(cache_index, "_XXH3_128", lambda address, size: sizes.append(size) or real(address, size))
    real = cache_index._gil_free_xxh3()
    for size in (0, 1, 4096, cache_index.GIL_FREE_BYTES - 1, cache_index.GIL_FREE_BYTES, (1 << 20) + 7):
        data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
        assert fast_digest(data) == fast_digest(memoryview(data)) == xxhash.xxh3_128_hexdigest(data), size
    assert sizes == [cache_index.GIL_FREE_BYTES] * 2 + [(1 << 20) + 7] * 2
    path = tmp_path / "mapped"
    path.write_bytes(data)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert fast_digest(mapped) == xxhash.xxh3_128_hexdigest(data)


def test_parse_bytes():
    assert parse_bytes("10GB") == 10 * 10**9
    assert parse_bytes("512MiB") == 512 << 20
    assert parse_bytes(1234) == 1234 and parse_bytes("1e6") == 10**6


def _wait(started, stop) -> None:
    started.set()
    stop.wait(60)


def test_forked_children_do_not_keep_the_parents_locks(images, cache_opts):
    """A DataLoader worker forked while the parent holds a pin must not keep it pinned."""
    fs, root = _cache(images.url, cache_opts)
    entry = images.dataset.shards("train")[0]
    fs.cat_file(f"{root}/{entry.name}")
    pin = fs.cache.open_pinned(_key(entry))
    ctx = multiprocessing.get_context("fork")
    started, stop = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_wait, args=(started, stop))
    child.start()
    try:
        assert started.wait(30)
        assert not fs.cache.discard(_key(entry)), "pinned by this process"
        pin.close()
        assert fs.cache.discard(_key(entry)), "the child's copy of the pin was closed at the fork"
    finally:
        stop.set()
        child.join(30)
