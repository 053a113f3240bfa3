"""Loader benchmark: the shard cache, the streaming loader and the prefetcher, in one run.

    python benchmarks/loader_bench.py                 # ~4 minutes on 2 cores
    python benchmarks/loader_bench.py --rows 50000    # a quicker, noisier look

Data staged with the project's own plan/write/commit into a loopback S3 server (moto):
``synthetic-image`` (3x32x32 uint8 images, labels; incompressible, so its zstd shards
hold raw buffers) and ``synthetic-tokens`` (256 int32 tokens a row; zstd to ~1/3).

* **cold**: bytes/s of a first epoch through ``shardcache::s3://`` (empty cache: fetch,
  verify, store, decode, tensors) against a plain concurrent fsspec read (``fs.cat`` of
  every shard object, nothing else); and of the cache layer alone (fetch, verify, store).
* **warm**: samples/s into tensors once the node cache holds the shards. Against MosaicML
  ``StreamingDataset`` on the same samples (MDS, uncompressed), both through a
  ``DataLoader`` with the same workers and batch size; and against the ceiling, a plain
  pyarrow read of the same shard files into tensors (best of 1 and ``--workers``
  threads: the *sequential* ceiling); against the *shuffled* ceiling, the same files
  read with pyarrow (memory-mapped, the decoded tier) and gathered with NumPy into the
  same batches in the same order (``storage.order``), nothing else: the least work that
  produces our output; and against Ray Data (``read_parquet`` of the same samples as
  local Parquet, ``iter_torch_batches`` with a ``--ray-shuffle-buffer``-row local
  shuffle buffer, ``--workers`` CPUs), with our loader in this process: the ``StreamingDataset`` iterated directly
  (batches made in the loop's thread, shard reads ahead on threads), and through
  ``Prefetcher`` (``num_workers=0``: batches made on a second thread and handed over,
  which pays when the loop computes; see overlap). The loader runs with its defaults
  (block shuffle; the decoded cache tier, which these datasets fit); variants: the
  compressed tier, and shard-level shuffle only.
* **overlap**: a training loop whose compute per batch equals the measured load time per
  batch (3 epochs): total time against ``max(load, compute)``, and the data-stall share.
  Timings are the best of ``--repeats`` runs; the load average is recorded, since on a
  shared machine other work changes them.
  Compute is a sleep (device work: the host is free meanwhile), calibrated to last the
  load time per batch (timer slack 1 ns, the remaining overshoot taken off); variants with
  batches of 2048 and with the compute on a CPU core.

The last printed line is one JSON object with every figure. Ray Data and MosaicML are
benchmark-only peers: ``make loader-bench`` installs them in a venv of their own
(``BENCH_VENV``, torch pinned first so that neither replaces it) and runs this script.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.ipc as ipc  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from storage import order  # noqa: E402
from storage.cache import _content_key  # noqa: E402 - the decoded tier's file names
from storage.dataset import Dataset  # noqa: E402
from storage.loader import StreamingDataset  # noqa: E402
from storage.prefetch import Prefetcher  # noqa: E402
from storage.urls import url_to_fs  # noqa: E402
from tasks.staging import StageConfig, stage_here  # noqa: E402


def log(*parts) -> None:
    print(*parts, flush=True)


def best(runs: int, fn):
    """The fastest of ``runs`` timed calls: ``(seconds, result)``."""
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        out.append((time.perf_counter() - start, result))
    return min(out, key=lambda r: r[0])


# --------------------------------------------------------------------------- setup


def start_s3():
    for key, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(key, value)
    from deployments.local_s3 import MotoS3

    return MotoS3()


def stage(source: str, dest: str, options: dict, shard_size: str, groups: int = 2):
    return stage_here(StageConfig(source=source, dest=dest, shard_size=shard_size, storage_options=options), groups)


def import_mosaic():
    # Mosaic's package __init__ imports torchvision, which this project does not install.
    if "streaming" not in sys.modules:
        spec = importlib.util.find_spec("streaming")
        if spec is None:
            raise SystemExit("mosaicml-streaming is not installed: pip install '.[bench]'")
        pkg = types.ModuleType("streaming")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["streaming"] = pkg
    from streaming.base import MDSWriter, StreamingDataset as MosaicDataset

    return MDSWriter, MosaicDataset


def write_mds(table: pa.Table, out: str, shape: list[int]) -> None:
    MDSWriter, _ = import_mosaic()
    images = table.column("image").combine_chunks()
    pixels = images.values.to_numpy().reshape(len(images), *shape)
    labels = table.column("label").to_numpy()
    dtype = f"ndarray:uint8:{','.join(map(str, shape))}"
    with MDSWriter(out=out, columns={"image": dtype, "label": "int64"}, compression=None,
                   size_limit=16 << 20) as writer:
        for i in range(len(labels)):
            writer.write({"image": pixels[i], "label": labels[i]})


# --------------------------------------------------------------------------- readers


def epoch_samples(batches) -> int:
    n = 0
    for batch in batches:
        n += int(batch["label"].shape[0])
    return n


def ours_dataloader(url: str, opts: dict, args, **kw) -> float:
    ds = StreamingDataset(url, batch_size=args.batch_size, storage_options=opts, cache=True, **kw)
    seconds, n = best(args.repeats, lambda: epoch_samples(
        DataLoader(ds, batch_size=None, num_workers=args.workers, prefetch_factor=4)))
    return n / seconds


def ours_in_process(url: str, opts: dict, args, **kw) -> float:
    """The dataset iterated in this process: batches made in the loop's thread, shards read ahead on threads."""
    ds = StreamingDataset(url, batch_size=args.batch_size, storage_options=opts, cache=True, **kw)
    seconds, n = best(args.repeats, lambda: epoch_samples(ds))
    return n / seconds


def ours_prefetcher(url: str, opts: dict, args, **kw) -> tuple[float, Prefetcher]:
    """Through ``Prefetcher`` (num_workers=0): batches made on its thread and handed to the loop's."""
    ds = StreamingDataset(url, batch_size=args.batch_size, storage_options=opts, cache=True, **kw)
    loader = Prefetcher(ds, depth=4)
    seconds, n = best(args.repeats, lambda: epoch_samples(loader))
    return n / seconds, loader


def mosaic(mds: str, args) -> float:
    _, MosaicDataset = import_mosaic()
    ds = MosaicDataset(local=mds, shuffle=True, shuffle_seed=0, batch_size=args.batch_size)
    loader = DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers, prefetch_factor=4,
                        persistent_workers=False)
    epoch_samples(loader)  # Mosaic reads its local shards in place: one epoch to warm the page cache
    seconds, n = best(args.repeats, lambda: epoch_samples(loader))
    return n / seconds


def ceiling(files: list[str], feature: str, shape: list[int], threads: int, args) -> float:
    """A plain pyarrow read of the shard files into tensors (zero-copy views), nothing else."""
    def read(path: str) -> int:
        table = ipc.open_file(path).read_all()
        n = 0
        for batch in table.to_batches():
            col = batch.column(feature)
            torch.from_numpy(col.values.to_numpy().reshape(len(col), *shape))
            torch.from_numpy(batch.column("label").to_numpy())
            n += len(col)
        return n

    def run() -> int:
        with ThreadPoolExecutor(threads) as pool:
            return sum(pool.map(read, files))

    seconds, n = best(args.repeats, run)
    return n / seconds


def shuffled_ceiling(files: list[str], ds: StreamingDataset, feature: str, shape: list[int]):
    """One epoch of the shard files read with pyarrow (memory-mapped) and gathered with NumPy
    into our batches, in our order (``storage.order``): the least work that produces our output."""
    def run() -> int:
        features, labels, starts = [], [], [0]
        for path in files:
            for batch in ipc.open_file(pa.memory_map(path)).read_all().to_batches():
                col = batch.column(feature)
                features.append(col.values.to_numpy().reshape(len(col), *shape))
                labels.append(batch.column("label").to_numpy())
                starts.append(starts[-1] + len(col))
        first = np.array(starts[:-1], dtype=np.int64)
        n = 0
        for ids in order.rank_batches(ds.shard_rows, ds.spec(1)):
            which = np.searchsorted(first, ids, side="right") - 1
            x = np.empty((len(ids), *shape), dtype=features[0].dtype)
            y = np.empty(len(ids), dtype=np.int64)
            for w in np.unique(which):
                rows = np.flatnonzero(which == w)
                x[rows] = features[w][ids[rows] - first[w]]
                y[rows] = labels[w][ids[rows] - first[w]]
            torch.from_numpy(x), torch.from_numpy(y)
            n += len(ids)
        return n

    return run


def interleaved(repeats: int, **epochs) -> dict[str, list[float]]:
    """Samples/s of each epoch function, run in turn ``repeats`` times: on a shared machine the
    load changes by the minute, so a ratio is taken between runs made side by side."""
    rates: dict[str, list[float]] = {name: [] for name in epochs}
    for _ in range(repeats):
        for name, epoch in epochs.items():
            start = time.perf_counter()
            n = epoch()
            rates[name].append(n / (time.perf_counter() - start))
    return rates


def ray_data(table: pa.Table, out: Path, args) -> float:
    """Ray Data: ``read_parquet`` -> ``iter_torch_batches`` with a local shuffle buffer, warm."""
    import pyarrow.parquet as pq

    try:
        import ray
    except ImportError:
        raise SystemExit("ray[data] is not installed: make loader-bench (see the Makefile)") from None
    out.mkdir(parents=True, exist_ok=True)
    per_file = max(1, (16 << 20) // max(1, table.nbytes // max(1, table.num_rows)))
    for i, lo in enumerate(range(0, table.num_rows, per_file)):
        pq.write_table(table.slice(lo, per_file), out / f"part-{i:05d}.parquet", compression="none")
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False,
             object_store_memory=max(256 << 20, 2 * table.nbytes), configure_logging=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        ds = ray.data.read_parquet(str(out))

        def epoch() -> int:
            return epoch_samples(ds.iter_torch_batches(batch_size=args.batch_size, drop_last=False,
                                                       local_shuffle_buffer_size=args.ray_shuffle_buffer))

        epoch()  # warm: the page cache holds the files
        seconds, n = best(args.repeats, epoch)
    finally:
        ray.shutdown()
    return n / seconds


def plain_concurrent_read(url: str, options: dict, names: list[str]) -> float:
    fs, root = url_to_fs(url, {**options, "skip_instance_cache": True})
    paths = [f"{root}/{n}" for n in names]
    start = time.perf_counter()
    data = fs.cat(paths)
    seconds = time.perf_counter() - start
    return sum(len(v) for v in data.values()) / seconds


def settle(folder: Path) -> None:
    """Remove a cold cache and flush the disk, so the next run starts from a quiet disk."""
    shutil.rmtree(folder, ignore_errors=True)
    os.sync()


def cache_fill(url: str, options: dict, entries, threads: int = 8) -> float:
    """Bytes/s of the cache layer alone: every shard fetched, verified and stored, 8 at a time."""
    fs, root = url_to_fs(f"shardcache::{url}", {**options, "skip_instance_cache": True})
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda e: fs.hold(f"{root}/{e.name}", e).release(), entries))
    return sum(e.bytes for e in entries) / (time.perf_counter() - start)


# --------------------------------------------------------------------------- overlap


def sleep_for(seconds: float) -> float:
    """What to pass to ``time.sleep`` for it to last about ``seconds`` (sub-millisecond steps).

    A sleep overshoots by the kernel's timer slack (50 us by default) plus the wake-up;
    for a 0.2 ms step that is a third more. The slack is set to 1 ns for this process
    (Linux), then the mean overshoot left is measured and taken off.
    """
    try:
        ctypes.CDLL(None).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK
    except (OSError, AttributeError):
        pass
    nap = seconds
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(200):
            time.sleep(nap)
        over = (time.perf_counter() - start) / 200 - seconds
        nap = max(0.0, nap - over)
    return nap


def overlap(url: str, opts: dict, args, batch_size: int, busy: bool, epochs: int = 3) -> dict:
    """A training loop whose compute per batch equals the measured load time per batch.

    ``load``: the loader alone over ``epochs`` epochs; ``compute``: the compute alone, as
    many steps; ``epoch``: both together. Ideal: ``max(load, compute)``.
    """
    ds = StreamingDataset(url, batch_size=batch_size, storage_options=opts, cache=True)

    def run(loader, step) -> float:
        start = time.perf_counter()
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            for _ in loader:
                step()
        return time.perf_counter() - start

    load_s = min(run(Prefetcher(ds, depth=4), lambda: None) for _ in range(args.repeats))
    per_batch = load_s / (len(ds) * epochs)
    if busy:
        torch.set_num_threads(1)
        a = torch.randn(64, 64)
        start = time.perf_counter()
        for _ in range(500):
            a @ a
        reps = max(1, round(per_batch / ((time.perf_counter() - start) / 500)))

        def compute():
            for _ in range(reps):
                a @ a
    else:
        nap = sleep_for(per_batch)

        def compute():
            time.sleep(nap)  # the step's device time: the host is free meanwhile

    start = time.perf_counter()
    for _ in range(len(ds) * epochs):
        compute()
    compute_s = time.perf_counter() - start
    def together() -> tuple[float, float, float, int]:
        loader = Prefetcher(ds, depth=4, stall_target=0.05)
        stall = elapsed = 0.0
        start = time.perf_counter()
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            for _ in loader:
                compute()
            stall += loader.stats.stall_s
            elapsed += loader.stats.elapsed_s
        return time.perf_counter() - start, stall, elapsed, loader.stats.depth

    total, stall, elapsed, depth = min((together() for _ in range(args.repeats)), key=lambda r: r[0])
    torch.set_num_threads(os.cpu_count() or 1)
    return {
        "batch_size": batch_size, "steps": len(ds) * epochs, "step_ms": round(per_batch * 1e3, 3),
        "load_s": round(load_s, 3), "compute_s": round(compute_s, 3), "epoch_s": round(total, 3),
        "overlap_vs_ideal": round(total / max(load_s, compute_s), 3),
        "stall_share": round(stall / elapsed, 4), "stall_s": round(stall, 3), "depth": depth,
    }


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shard-size", default="16MB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="working folder (default: a temporary one, removed)")
    parser.add_argument("--ray-shuffle-buffer", type=int, default=4096, help="Ray Data's local shuffle buffer (rows)")
    parser.add_argument("--no-ray", action="store_true", help="leave Ray Data out")
    args = parser.parse_args()

    work = Path(args.dir or tempfile.mkdtemp(prefix="loader-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    s3 = start_s3()
    results: dict = {"rows": args.rows, "batch_size": args.batch_size, "workers": args.workers,
                     "machine": f"{os.cpu_count()} cores, cuda={torch.cuda.is_available()}",
                     "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    try:
        bucket = "bench"
        s3.s3fs().mkdir(bucket)
        url = f"s3://{bucket}/images"
        source = f"synthetic-image?rows={args.rows}&size={args.size}"
        start = time.perf_counter()
        staged = stage(source, url, s3.storage_options, args.shard_size)
        log(f"staged {staged.rows} rows into {staged.shards} shards, {staged.bytes_out / 1e6:.0f} MB "
            f"(zstd, {staged.compression_ratio}x) in {time.perf_counter() - start:.1f}s")
        dataset = Dataset.open(url, s3.storage_options)
        shape = dataset.manifest.metadata["shape"]
        names = [s.name for s in dataset.shards()]
        total_bytes = dataset.manifest.bytes

        start = time.perf_counter()
        mds = str(work / "mds")
        write_mds(dataset.read_table(), mds, shape)
        log(f"wrote the same samples as MDS for Mosaic in {time.perf_counter() - start:.1f}s")

        # ---- cold: origin to tensors with an empty cache, against a plain concurrent read
        # Interleaved, so that load from elsewhere on the machine hits both sides alike; each
        # cold cache is removed and the disk synced before the next run, so that no run
        # starts behind another's write-back (the local disk writes ~420 MB/s here).
        cold: dict[str, list[float]] = {"plain": [], "fill": [], "auto": [], "compressed": []}
        for i in range(args.repeats):
            cold["plain"].append(plain_concurrent_read(url, s3.storage_options, names))
            settle(work / "cold")
            cold["fill"].append(cache_fill(url, {**s3.storage_options, "cache_dir": str(work / "cold")},
                                           dataset.shards()))
            for tier in ("auto", "compressed"):
                settle(work / "cold")
                # A filesystem of its own: fsspec would hand back the last run's, whose folder is gone.
                opts = {**s3.storage_options, "cache_dir": str(work / "cold"), "skip_instance_cache": True}
                ds = StreamingDataset(url, batch_size=args.batch_size, storage_options=opts, cache=True,
                                      decoded="auto" if tier == "auto" else False)
                loader = Prefetcher(ds, depth=4, shard_depth=8)
                start = time.perf_counter()
                epoch_samples(loader)
                cold[tier].append(total_bytes / (time.perf_counter() - start))
                assert loader.stats.hit_rate == 0.0
        settle(work / "cold")
        plain = max(cold["plain"])
        results["cold"] = {"plain_MBps": round(plain / 1e6, 1), "ours_MBps": round(max(cold["auto"]) / 1e6, 1),
                           "ours_compressed_tier_MBps": round(max(cold["compressed"]) / 1e6, 1),
                           "cold_vs_plain": round(max(cold["auto"]) / plain, 3),
                           "compressed_tier_vs_plain": round(max(cold["compressed"]) / plain, 3),
                           "paired_ratios": [round(o / p, 3) for o, p in zip(cold["auto"], cold["plain"])],
                           "cache_fill_MBps": round(max(cold["fill"]) / 1e6, 1),
                           "cache_fill_vs_plain": round(max(cold["fill"]) / plain, 3)}
        log("cold", results["cold"])

        # ---- warm: the cache holds every shard (default: the decoded tier, as it fits the budget)
        opts = {**s3.storage_options, "cache_dir": str(work / "cache")}
        for decoded in (True, False):
            epoch_samples(StreamingDataset(url, batch_size=args.batch_size, storage_options=opts, cache=True,
                                           decoded=decoded))
        fs, _ = url_to_fs(f"shardcache::{url}", opts)
        files = [fs.cache.data_path(s.hash.replace(":", "-")) for s in dataset.shards()]
        warm = {
            "ours_dataloader": ours_dataloader(url, opts, args),
            "mosaic_dataloader": mosaic(mds, args),
        }
        decoded = [fs.cache.data_path(_content_key(s.hash) + "-ipc") for s in dataset.shards()]
        ours_ds = StreamingDataset(url, batch_size=args.batch_size, storage_options=opts, cache=True)
        paired = interleaved(args.repeats, ours=lambda: epoch_samples(ours_ds), shuffled_ceiling=shuffled_ceiling(
            decoded if all(os.path.exists(f) for f in decoded) else files, ours_ds, "image", shape))
        warm["ours"], warm["shuffled_ceiling"] = max(paired["ours"]), max(paired["shuffled_ceiling"])
        rate, loader = ours_prefetcher(url, opts, args)
        warm["ours_prefetcher"] = rate
        warm["hit_rate"] = loader.stats.hit_rate
        warm["ours_compressed_tier"] = ours_in_process(url, opts, args, decoded=False)
        warm["ours_shard_shuffle"] = ours_in_process(url, opts, args, shuffle="shard")
        warm["ours_shard_shuffle_compressed_tier"] = ours_in_process(url, opts, args, shuffle="shard", decoded=False)
        warm["ceiling"] = max(ceiling(files, "image", shape, t, args) for t in sorted({1, args.workers}))
        if not args.no_ray:
            warm["ray_data"] = ray_data(dataset.read_table(), work / "parquet", args)
        results["warm"] = {k: (round(v) if k != "hit_rate" else v) for k, v in warm.items()}
        results["warm"]["shuffled_ceiling_paired_ratios"] = [
            round(o / c, 3) for o, c in zip(paired["ours"], paired["shuffled_ceiling"])]
        ratios = {
            "warm_vs_mosaic": warm["ours_dataloader"] / warm["mosaic_dataloader"],
            "warm_vs_ceiling": warm["ours"] / warm["ceiling"],
            "warm_vs_shuffled_ceiling": warm["ours"] / warm["shuffled_ceiling"],
            **({"warm_vs_ray_data": warm["ours"] / warm["ray_data"]} if "ray_data" in warm else {}),
            "prefetcher_vs_ceiling": warm["ours_prefetcher"] / warm["ceiling"],
            "compressed_tier_vs_ceiling": warm["ours_compressed_tier"] / warm["ceiling"],
            "shard_shuffle_vs_ceiling": warm["ours_shard_shuffle"] / warm["ceiling"],
            "shard_shuffle_compressed_tier_vs_ceiling": warm["ours_shard_shuffle_compressed_tier"] / warm["ceiling"],
            "dataloader_vs_ceiling": warm["ours_dataloader"] / warm["ceiling"],
        }
        results["warm"].update({k: round(v, 3) for k, v in ratios.items()})
        log("warm, images, samples/s", results["warm"])

        # ---- warm, compressible tokens: decoding is the ceiling's cost, not copying
        tokens_url = f"s3://{bucket}/tokens"
        stage(f"synthetic-tokens?rows={args.rows}&seq_len=256&vocab=32000", tokens_url, s3.storage_options,
              args.shard_size)
        tokens = Dataset.open(tokens_url, s3.storage_options)
        t_opts = {**s3.storage_options, "cache_dir": str(work / "cache-tokens")}
        for decoded in (True, False):
            epoch_samples(StreamingDataset(tokens_url, batch_size=args.batch_size, storage_options=t_opts,
                                           cache=True, decoded=decoded))
        t_fs, _ = url_to_fs(f"shardcache::{tokens_url}", t_opts)
        t_files = [t_fs.cache.data_path(s.hash.replace(":", "-")) for s in tokens.shards()]
        tok = {
            "ours": ours_in_process(tokens_url, t_opts, args),
            "ours_compressed_tier": ours_in_process(tokens_url, t_opts, args, decoded=False),
            "ceiling": max(ceiling(t_files, "tokens", [256], t, args) for t in sorted({1, args.workers})),
        }
        results["warm_tokens"] = {k: round(v) for k, v in tok.items()}
        results["warm_tokens"].update({
            "compression": round(tokens.manifest.bytes / sum(s.raw_bytes for s in tokens.shards()), 3),
            "warm_vs_ceiling": round(tok["ours"] / tok["ceiling"], 3),
            "compressed_tier_vs_ceiling": round(tok["ours_compressed_tier"] / tok["ceiling"], 3),
        })
        log("warm, tokens, samples/s", results["warm_tokens"])

        # ---- overlap: compute per batch = load per batch
        for name, batch_size, busy in (("overlap", args.batch_size, False), ("overlap_large_batch", 2048, False),
                                       ("overlap_cpu_compute", args.batch_size, True)):
            results[name] = overlap(url, opts, args, batch_size, busy)
            log(name, results[name])
        results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        s3.stop()
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)

    summary = {
        "warm_vs_mosaic": results["warm"]["warm_vs_mosaic"],
        "warm_vs_ceiling": results["warm"]["warm_vs_ceiling"],
        "warm_vs_shuffled_ceiling": results["warm"]["warm_vs_shuffled_ceiling"],
        "warm_vs_ray_data": results["warm"].get("warm_vs_ray_data"),
        "cold_vs_plain": results["cold"]["cold_vs_plain"],
        "overlap_vs_ideal": results["overlap"]["overlap_vs_ideal"],
        "stall_share": results["overlap"]["stall_share"],
        **results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
