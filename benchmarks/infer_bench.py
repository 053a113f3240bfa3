"""Batched inference on this machine, offline and online, in one command.

Offline: the `batch_inference` flow, as a user runs it (a local Dask cluster of one
single-threaded worker process reporting to the managed Prefect server), predicts a staged
dataset with the adaptive batch size, against
  - a batch-1 loop: ``model(x[i:i+1])`` over rows already in memory, in this process, on
    one torch thread (the model alone: no reading, no writing);
  - every static batch size of a sweep, through the same flow (``adaptive=False``).
Runs are interleaved (each repeat runs every mode once) and figures are medians. Offline
throughput is a run's rows over the wall time of its prediction phase (tasks submitted to
last result: model loading, reading, decoding, predicting, writing shards), as the flow
reports it; a sample of rows is checked against the batch-1 loop's classes. Beside each
rows/s figure, rows per CPU-second (of the worker process, or of the batch-1 loop's
thread): on a machine shared with other jobs these move far less than wall time does.

Online: benchmarks/serve_bench.py's measurement (its functions): `swarm serve-model` batched vs
unbatched under a closed-loop load.

Model, for both: serve_bench's MLP with wide layers (64 -> 2048 -> 2048 -> 2048 -> 10,
8.5 M parameters) trained for one epoch on the built-in digits. The offline dataset is
``--rows`` synthetic 8x8 one-channel images (64 values a row, the digits' width).

    .venv/bin/python benchmarks/infer_bench.py [--rows 40000] [--sizes 16,32,...,1024] [--repeat 3]

Writes benchmarks/infer_bench.png (both parts) and prints, as its last line, one JSON object
with ``offline_vs_batch1``, ``offline_vs_best_static``, ``online_throughput_vs_unbatched``
and ``online_p99_ms``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import serve_bench  # noqa: E402 - after the path is set


def stage_images(work: Path, rows: int, shard_size: str) -> str:
    from tasks.staging import StageConfig, stage_here

    dataset = str(work / "images")
    stage_here(StageConfig(source=f"synthetic-image?rows={rows}&size=8&channels=1", dest=dataset,
                           shard_size=shard_size), groups=1)
    return dataset


def batch1_loop(checkpoint: str, dataset: str, rows: int) -> tuple[dict, np.ndarray]:
    """Rows per second and per CPU-second of ``model(x[i:i+1])`` over the dataset's first
    ``rows`` rows, and their classes."""
    import torch

    from storage.dataset import Dataset
    from tasks.inference.kernels import fastest_forward
    from tasks.models.loading import load_model
    from tasks.training.data import Columns, feature_array, feature_tensor

    torch.set_num_threads(1)
    loaded = load_model(checkpoint)
    c = loaded.columns
    cols = Columns(c["feature"], "", tuple(c["shape"]), c.get("scale"))
    ds = Dataset.open(dataset)
    x = np.concatenate([feature_array(ds.read_shard(e), cols.feature) for e in ds.shards()])[:rows]
    inputs = [feature_tensor(x[i:i + 1], cols) for i in range(len(x))]
    classes = np.empty(len(x), dtype=np.int64)
    with torch.inference_mode():
        loaded.model(inputs[0])
        began, cpu = time.perf_counter(), time.thread_time()
        for i, row in enumerate(inputs):
            classes[i] = loaded.model(row).argmax()
        seconds, cpu = time.perf_counter() - began, time.thread_time() - cpu
        # For the record, not the ratio: the same loop on the kernel path the flow would pick at one row.
        forward, kernel = fastest_forward(loaded.model, inputs[0], "cpu")
        began = time.perf_counter()
        for row in inputs:
            forward(row).argmax()
        tuned = len(x) / (time.perf_counter() - began)
    return {"rows_per_s": len(x) / seconds, "rows_per_cpu_s": len(x) / cpu, "tuned_rows_per_s": tuned,
            "tuned_kernel": kernel}, classes


def offline_run(checkpoint: str, dataset: str, output: Path, size: int | None, workers: list[int]) -> dict:
    """One flow run: adaptive (``size`` None, up to 1024 rows) or static at ``size`` rows.
    Besides rows/s, rows per CPU-second of the ``workers`` processes: other jobs taking
    turns on the cores move it far less."""
    from flows.infer import batch_inference
    from tasks.inference.offline import InferConfig

    shutil.rmtree(output, ignore_errors=True)
    options = {"max_batch_size": 1024} if size is None else {"max_batch_size": size, "adaptive": False}
    began, cpu = time.perf_counter(), sum(serve_bench.cpu_seconds(pid) for pid in workers)
    result = batch_inference(InferConfig(model=checkpoint, dataset=dataset, output=str(output), **options))
    cpu = sum(serve_bench.cpu_seconds(pid) for pid in workers) - cpu
    return {"mode": "adaptive" if size is None else size, "rows_per_s": result.rows_per_second,
            "rows_per_cpu_s": round(result.rows / cpu, 1),
            "flow_rows_per_s": round(result.rows / (time.perf_counter() - began), 1),
            "chosen": [b["size"] for b in result.batch_sizes], "kernels": [b["kernel"] for b in result.batch_sizes],
            "tried": [{k: v["rows_per_s"] for k, v in b["tried"].items()} for b in result.batch_sizes],
            "stall_share": result.data_stall_share}


def check_against_batch1(output: Path, dataset: str, classes: np.ndarray) -> None:
    from storage.dataset import Dataset

    first = Dataset.open(dataset).shards()[0]
    table = Dataset.open(str(output)).read_table()
    got = {(s, r): p for s, r, p in zip(table.column("shard").to_pylist(), table.column("row").to_pylist(),
                                          table.column("prediction").to_pylist())}
    n = min(len(classes), first.rows)
    wrong = [r for r in range(n) if got[(first.name, r)] != classes[r]]
    if wrong:
        raise RuntimeError(f"{len(wrong)} of {n} offline predictions differ from the batch-1 loop, e.g. row {wrong[0]}")


def offline(args: argparse.Namespace, checkpoint: str, work: Path) -> dict:
    os.environ.setdefault("SWARM_WORKERS", "1")
    from deployments.cluster import scheduler_address
    from deployments.runtime import ensure_prefect_api

    dataset = stage_images(work, args.rows, args.shard_size)
    ensure_prefect_api()  # first: the workers inherit its URL
    address = scheduler_address()  # the local cluster starts here, outside the timings
    from distributed import Client

    with Client(address, set_as_default=False) as client:
        workers = list(client.run(os.getpid).values())
    sizes = [int(s) for s in args.sizes.split(",")]
    output = work / "predictions"
    warm = offline_run(checkpoint, dataset, output, None, workers)  # workers import torch, load the model once
    print(f"offline: {args.rows:,} rows, {os.environ['SWARM_WORKERS']} worker(s) x 1 thread; warm-up run "
          f"{warm['rows_per_s']:,.0f} rows/s, chose {warm['chosen']}", flush=True)
    runs: dict = {"batch1": [], "adaptive": [], **{s: [] for s in sizes}}
    for repeat in range(args.repeat):
        modes = [None] + sizes
        shift = repeat % len(modes)  # a different order each repeat: drift hits every mode
        for size in modes[shift:] + modes[:shift]:
            if size is None:  # the batch-1 loop right before the adaptive run: the same minute of load
                rate, classes = batch1_loop(checkpoint, dataset, args.batch1_rows)
                runs["batch1"].append(rate)
                tuned = f"; on its fastest kernel path, {rate['tuned_kernel']}: {rate['tuned_rows_per_s']:,.0f} rows/s"
                print(f"  repeat {repeat + 1}:  batch-1 {rate['rows_per_s']:9,.0f} rows/s, "
                      f"{rate['rows_per_cpu_s']:,.0f} per CPU-second (the model alone, in this process{tuned})",
                      flush=True)
            run = offline_run(checkpoint, dataset, output, size, workers)
            runs[run["mode"]].append(run)
            extra = f", chose {run['chosen']}, tried {run['tried'][-1]}" if size is None else ""
            extra += f", kernel {'/'.join(sorted(set(run['kernels'])))}"
            print(f"  repeat {repeat + 1}: {str(run['mode']):>8s} {run['rows_per_s']:9,.0f} rows/s, "
                  f"{run['rows_per_cpu_s']:,.0f} per CPU-second (whole flow {run['flow_rows_per_s']:,.0f} rows/s, "
                  f"stall {100 * run['stall_share']:.1f}%){extra}",
                  flush=True)
            if size is None:
                check_against_batch1(output, dataset, classes)
    med, cpu = (_medians(runs, key) for key in ("rows_per_s", "rows_per_cpu_s"))
    best, best_cpu = (max(sizes, key=lambda s: m[s]) for m in (med, cpu))
    return runs, {
        "offline_vs_batch1": round(med["adaptive"] / med["batch1"], 2),
        "offline_vs_best_static": round(med["adaptive"] / med[best], 3),
        "offline_vs_batch1_per_repeat": [round(a["rows_per_s"] / b["rows_per_s"], 2)
                                         for a, b in zip(runs["adaptive"], runs["batch1"])],
        "offline_rows_per_s": round(med["adaptive"], 1),
        "offline_batch1_rows_per_s": round(med["batch1"], 1),
        "offline_best_static_size": best,
        "offline_best_static_rows_per_s": round(med[best], 1),
        "offline_static_rows_per_s": {str(s): round(med[s], 1) for s in sizes},
        "offline_per_cpu_s": {"offline_vs_batch1": round(cpu["adaptive"] / cpu["batch1"], 2),
                              "offline_vs_best_static": round(cpu["adaptive"] / cpu[best_cpu], 3),
                              "best_static_size": best_cpu,
                              "rows_per_cpu_s": {str(k): round(v, 1) for k, v in cpu.items()}},
        "offline_adaptive_chosen": [r["chosen"] for r in runs["adaptive"]],
        "offline_kernels": sorted({k for r in runs["adaptive"] for k in r["kernels"]}),
        "offline_batch1_fastest_kernel": sorted({r["tuned_kernel"] for r in runs["batch1"]}),
        "offline_batch1_fastest_kernel_rows_per_s": [round(r["tuned_rows_per_s"], 1) for r in runs["batch1"]],
        "offline_runs": {str(k): [round(r["rows_per_s"], 1) for r in v] for k, v in runs.items()},
    }


def _medians(runs: dict, key: str) -> dict:
    return {mode: statistics.median(r[key] for r in rs) for mode, rs in runs.items()}


def plot(runs: dict, online_rows: list[dict] | None, path: Path, args) -> None:
    """Offline rows/s over the static sizes with the adaptive result marked; beside it the
    online throughput and latency over concurrency (serve_bench's panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    panels = 1 if online_rows is None else 3
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.4), squeeze=False)
    ax = axes[0][0]
    sizes = [s for s in runs if isinstance(s, int)]
    med, cpu = (_medians(runs, key) for key in ("rows_per_s", "rows_per_cpu_s"))
    lo = [med[s] - min(r["rows_per_s"] for r in runs[s]) for s in sizes]
    hi = [max(r["rows_per_s"] for r in runs[s]) - med[s] for s in sizes]
    ax.errorbar(sizes, [med[s] for s in sizes], yerr=[lo, hi], fmt="o-", color="tab:blue", capsize=3,
                label="static batch size (flow)")
    chosen = [c for r in runs["adaptive"] for c in r["chosen"]]
    ax.plot([statistics.median(chosen)], [med["adaptive"]], "*", color="tab:red", markersize=16,
            label=f"adaptive (flow), chose {', '.join(map(str, sorted(set(chosen))))}")
    ax.axhline(med["adaptive"], color="tab:red", lw=0.8, ls=":")
    ax.plot([1], [med["batch1"]], "s", color="tab:orange", markersize=9, label="batch-1 loop (model only)")
    ax.plot(sizes, [cpu[s] for s in sizes], ".--", color="tab:blue", alpha=0.5, label="static, per worker CPU-second")
    ax.plot([statistics.median(chosen)], [cpu["adaptive"]], "*", color="tab:red", alpha=0.5, markersize=12,
            markerfacecolor="none", label="adaptive, per worker CPU-second")
    ax.plot([1], [cpu["batch1"]], "s", color="tab:orange", alpha=0.5, markerfacecolor="none", markersize=8,
            label="batch-1, per CPU-second")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("rows per model call")
    ax.set_ylabel("rows / s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title(f"offline: batch_inference, {args.rows:,} rows,\n1 worker x 1 thread "
                 f"(medians of {args.repeat}, bars min-max)", fontsize=9)
    if online_rows is not None:
        serve_bench.plot_levels(online_rows, axes[0][1], axes[0][2])
        axes[0][1].set_title(f"online: swarm serve-model, max batch {args.max_batch_size}, max wait {args.max_wait_ms} ms,"
                             f"\n1 replica x {args.threads_per_replica} thread (medians of {args.repeat})", fontsize=9)
        axes[0][2].set_title("online: latency", fontsize=9)
    fig.suptitle(f"MLP 64-{args.hidden.replace(',', '-')}-10 (8.5 M parameters), 2 shared CPU cores, no GPU",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")  # before Prefect is imported
    logging.getLogger("distributed").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    serve_bench.add_arguments(parser)
    parser.add_argument("--rows", type=int, default=40_000, help="Offline: rows of the dataset predicted")
    parser.add_argument("--shard-size", default="256KB", help="Offline: staged shard size")
    parser.add_argument("--sizes", default="16,32,64,128,256,512,1024", help="Offline: static batch sizes swept")
    parser.add_argument("--batch1-rows", type=int, default=2000, help="Offline: rows timed in the batch-1 loop")
    parser.add_argument("--bench-plot", default=str(ROOT / "benchmarks" / "infer_bench.png"),
                        help="The plot of both parts")
    parser.add_argument("--skip-online", action="store_true", help="Explore: the offline part only")
    parser.set_defaults(plot="")  # serve_bench's own online plot: its panels are in --bench-plot
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="swarm-infer-bench-"))
    checkpoint, x, classes = serve_bench.train_model(work, [int(h) for h in args.hidden.split(",")])
    runs, summary = offline(args, checkpoint, work)
    online_rows = None
    if not args.skip_online:
        from deployments.cluster import close_local_cluster
        from deployments.runtime import stop_owned_servers

        close_local_cluster()  # the online server gets the cores to itself
        stop_owned_servers()
        summary.update(serve_bench.online(args, checkpoint, x, classes))
        online_rows = summary["levels"]
    plot(runs, online_rows, Path(args.bench_plot), args)
    summary["plot"] = serve_bench.shown(args.bench_plot)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
