"""Staging throughput and size: the ``stage_dataset`` flow against MosaicML Streaming's MDSWriter.

    make bench                          # installs the peer without touching torch, then runs this
    python benchmarks/stage_bench.py [--image-rows 100000] [--token-rows 500000] [--repeats 5]

Both sides read the same Parquet files (prepared once, before any timing, from the
built-in ``synthetic-image`` (3x32x32 uint8, CIFAR-shaped) and ``synthetic-tokens``
(64 int32 ids) datasets) and write zstd level 3 shards of the same target size (16 MB
decoded) into a fresh local folder:

* **flow**: the product path, ``stage_dataset`` (plan, write, commit) on a local Dask
  cluster of 2 single-threaded worker processes, reporting to a real Prefect server.
  Server and cluster start-up are outside the timing; everything the flow does is in.
* **plain**: the same plain steps (``stage_here``: plan, write each group, commit) in
  this one process, without Prefect or Dask, for reference.
* **mds**: ``MDSWriter`` in this one process, fed row by row from the Parquet record
  batches as NumPy views (static ``ndarray`` dtype and shape, ``int`` labels).

Per dataset, ``--warmup`` untimed rounds of all three paths come first, then
``--repeats`` timed rounds, the paths interleaved; the median time counts. Bytes are all
the files each side leaves (shards and index). The last line printed is one JSON object:
``speedup_vs_mds`` is the *worst* (smallest) flow-vs-MDS rows/s ratio over the datasets,
``size_vs_mds`` the *worst* (largest) bytes ratio; per-dataset figures follow.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # this checkout's packages, also for the spawned Dask workers

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

WORKERS = 2
CODEC, LEVEL = "zstd", 3  # MDS's `compression="zstd"` is zstd level 3
SPEEDUP_TARGET, SIZE_TARGET = 2.0, 1.0


@dataclass(frozen=True)
class Dataset:
    name: str
    builtin: str
    mds_columns: dict[str, str]  # MDS encodings, with static dtype and shape where fixed
    shapes: dict[str, tuple[int, ...]]  # per-row shape of each list column, for the NumPy views


def datasets(image_rows: int, token_rows: int) -> list[Dataset]:
    return [
        Dataset("synthetic-image", f"synthetic-image?rows={image_rows}&size=32&channels=3",
                {"image": "ndarray:uint8:3,32,32", "label": "int"}, {"image": (3, 32, 32)}),
        Dataset("synthetic-tokens", f"synthetic-tokens?rows={token_rows}&seq_len=64",
                {"tokens": "ndarray:int32:64", "label": "int"}, {"tokens": (64,)}),
    ]


# --------------------------------------------------------------------------- source


def prepare_source(ds: Dataset, folder: Path, files: int) -> list[Path]:
    """Write the built-in dataset once as ``files`` Parquet files (pyarrow defaults)."""
    from tasks.datasets import open_builtin

    folder.mkdir(parents=True, exist_ok=True)
    source = open_builtin(ds.builtin)
    rows = source.num_rows()
    bounds = np.linspace(0, rows, files + 1).astype(int)
    paths = []
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        path = folder / f"part-{i:03d}.parquet"
        pq.write_table(source.read(int(lo), int(hi)), path)
        paths.append(path)
    return paths


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --------------------------------------------------------------------------- the three paths


def stage_flow(source: Path, dest: Path, shard_size: int, dask_address: str) -> tuple[float, float]:
    """Wall seconds of the flow call, and the seconds its body measured (plan to commit)."""
    from flows.stage import stage_dataset
    from tasks.staging import StageConfig

    config = StageConfig(source=str(source), dest=str(dest), codec=CODEC, level=LEVEL,
                         shard_size=shard_size, dask_address=dask_address)
    started = time.perf_counter()
    result = stage_dataset(config)
    return time.perf_counter() - started, result.seconds


def stage_plain(source: Path, dest: Path, shard_size: int) -> float:
    from tasks.staging import StageConfig, stage_here

    config = StageConfig(source=str(source), dest=str(dest), codec=CODEC, level=LEVEL, shard_size=shard_size)
    started = time.perf_counter()
    stage_here(config, groups=1)
    return time.perf_counter() - started


def mds_writer_class():
    """MDSWriter without ``streaming/__init__`` (which imports torchvision, not installed here)."""
    try:
        from streaming.base import MDSWriter  # a full install with torchvision
        return MDSWriter
    except ImportError:
        pass
    for name in [m for m in sys.modules if m == "streaming" or m.startswith("streaming.")]:
        del sys.modules[name]
    spec = importlib.util.find_spec("streaming")
    if spec is None:
        sys.exit("mosaicml-streaming is not installed: run `make bench` (it installs it without replacing torch)")
    package = types.ModuleType("streaming")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["streaming"] = package
    from streaming.base import MDSWriter

    return MDSWriter


def stage_mds(ds: Dataset, files: list[Path], dest: Path, shard_size: int) -> float:
    writer_class = mds_writer_class()
    started = time.perf_counter()
    with writer_class(columns=ds.mds_columns, out=str(dest), compression=f"{CODEC}:{LEVEL}",
                      size_limit=shard_size) as writer:
        for path in files:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
                columns = {}
                for name in ds.mds_columns:
                    column = batch.column(name)
                    if name in ds.shapes:
                        columns[name] = column.flatten().to_numpy().reshape((len(column), *ds.shapes[name]))
                    else:
                        columns[name] = column.to_pylist()
                names = list(columns)
                for row in zip(*columns.values()):
                    writer.write(dict(zip(names, row)))
    return time.perf_counter() - started


# --------------------------------------------------------------------------- services


class Services:
    """A real Prefect server and a local Dask cluster of single-threaded worker processes."""

    def __init__(self, home: Path):
        from deployments.runtime import PrefectServer, use_api

        os.environ["SWARM_HOME"] = str(home / "swarm-home")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        self.server = PrefectServer(home / "prefect").start()
        use_api(self.server.url)  # before the workers start, so they inherit it
        from distributed import LocalCluster

        try:
            self.cluster = LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True,
                                        dashboard_address=None)
        except BaseException:
            self.server.stop()
            raise
        self.address = self.cluster.scheduler_address

    def close(self) -> None:
        self.cluster.close()
        self.server.stop()


# --------------------------------------------------------------------------- run and report


def run(args: argparse.Namespace) -> dict:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="stage-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    chosen = datasets(args.image_rows, args.token_rows)
    print(f"preparing sources under {work} ...", flush=True)
    sources = {ds.name: prepare_source(ds, work / "source" / ds.name, args.files) for ds in chosen}
    services = Services(work)
    load_before = os.getloadavg()[0]
    if load_before > 0.5 * (os.cpu_count() or 1):
        print(f"note: load average {load_before:.1f} on {os.cpu_count()} CPUs before timing; other work competes "
              "with the benchmark and its figures will be noisy", flush=True)
    try:
        figures = {}
        for ds in chosen:
            files = sources[ds.name]
            rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
            runs: dict[str, list[float]] = {"flow": [], "flow_body": [], "plain": [], "mds": []}
            for repeat in range(-args.warmup, args.repeats):  # negative: warm-up rounds, not counted
                out = {path: work / "out" / ds.name / f"{path}-{repeat}" for path in ("flow", "plain", "mds")}
                wall, body = stage_flow(files[0].parent, out["flow"], args.shard_size, services.address)
                plain = stage_plain(files[0].parent, out["plain"], args.shard_size)
                mds = stage_mds(ds, files, out["mds"], args.shard_size)
                if repeat >= 0:
                    for path, seconds in (("flow", wall), ("flow_body", body), ("plain", plain), ("mds", mds)):
                        runs[path].append(seconds)
                sizes = {path: folder_bytes(folder) for path, folder in out.items()}
                shutil.rmtree(work / "out" / ds.name)
            figures[ds.name] = summarize(rows, folder_bytes(files[0].parent), runs, sizes)
            print_table(ds.name, figures[ds.name])
    finally:
        services.close()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    speedup = min(f["speedup_vs_mds"] for f in figures.values())
    size = max(f["size_vs_mds"] for f in figures.values())
    return {
        "speedup_vs_mds": speedup,
        "size_vs_mds": size,
        "aggregate": "speedup: minimum over datasets of the median-time ratio; size: maximum over datasets",
        "target_met": speedup >= SPEEDUP_TARGET and size <= SIZE_TARGET,
        "target": {"speedup_vs_mds": f">= {SPEEDUP_TARGET}", "size_vs_mds": f"<= {SIZE_TARGET}"},
        "setup": {"workers": WORKERS, "codec": f"{CODEC}:{LEVEL}", "shard_size": args.shard_size,
                  "repeats": args.repeats, "warmup": args.warmup, "cpus": os.cpu_count(),
                  "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
        "datasets": figures,
    }


def summarize(rows: int, source_bytes: int, runs: dict[str, list[float]], sizes: dict[str, int]) -> dict:
    median = {path: statistics.median(times) for path, times in runs.items()}
    best = {path: min(times) for path, times in runs.items()}
    return {
        "rows": rows,
        "source_bytes": source_bytes,
        "seconds": {path: round(t, 3) for path, t in median.items()},
        "rows_per_s": {path: round(rows / t, 1) for path, t in median.items()},
        "runs": {path: [round(t, 3) for t in times] for path, times in runs.items()},
        "bytes": sizes,
        "speedup_vs_mds": round(median["mds"] / median["flow"], 3),
        "speedup_vs_mds_best_of_runs": round(best["mds"] / best["flow"], 3),
        "plain_speedup_vs_mds": round(median["mds"] / median["plain"], 3),
        "size_vs_mds": round(sizes["flow"] / sizes["mds"], 4),
    }


def print_table(name: str, fig: dict) -> None:
    print(f"\n{name}: {fig['rows']:,} rows, {fig['source_bytes'] / 1e6:.1f} MB of Parquet source")
    print(f"  {'path':<34} {'seconds':>8} {'rows/s':>12} {'bytes':>13} {'speed':>7} {'size':>7}")
    labels = {"flow": f"stage_dataset flow ({WORKERS} Dask workers)", "plain": "plain functions (1 process)",
              "mds": "MDSWriter (1 process)"}
    for path, label in labels.items():
        if path not in fig["bytes"]:
            continue
        speed = fig["seconds"]["mds"] / fig["seconds"][path]
        size = fig["bytes"][path] / fig["bytes"]["mds"]
        print(f"  {label:<34} {fig['seconds'][path]:>8.3f} {fig['rows_per_s'][path]:>12,.0f} "
              f"{fig['bytes'][path]:>13,} {speed:>6.2f}x {size:>6.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-rows", type=int, default=100_000, help="rows of 3x32x32 uint8 images")
    parser.add_argument("--token-rows", type=int, default=500_000, help="rows of 64 int32 tokens")
    parser.add_argument("--files", type=int, default=4, help="Parquet files per source")
    parser.add_argument("--shard-size", type=int, default=16_000_000, help="target decoded bytes per shard, both sides")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per path and dataset; the median counts")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds of every path first, per dataset")
    parser.add_argument("--workdir", help="keep sources and outputs here (default: a temporary folder, removed)")
    report = run(parser.parse_args())
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
