"""Training throughput on this machine: 1 rank vs 2 ranks (one thread each), bf16 vs fp32.

Runs the real product path: the `train_model` flow on a local Dask cluster of two
single-threaded worker processes, reporting to a local Prefect server. Throughput is the
samples/s of the last epoch (the first warms up allocators and caches), summed over ranks.

    .venv/bin/python benchmarks/train_bench.py [--rows 12000] [--epochs 2]

The last printed line is one JSON object with `scaling_2_vs_1` and `bf16_vs_fp32`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=12_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="swarm-train-bench-"))
    os.environ["SWARM_HOME"] = str(work / "home")
    from deployments.runtime import PrefectServer, use_api
    from distributed import LocalCluster

    from flows.train import train_model
    from tasks.staging import StageConfig, stage_here
    from tasks.training import TrainConfig

    server = PrefectServer(work / "prefect").start()
    use_api(server.url)
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    os.environ["SWARM_DASK_ADDRESS"] = cluster.scheduler_address
    try:
        dataset = str(work / "images")
        stage_here(StageConfig(source=f"synthetic-image?rows={args.rows}&size={args.size}", dest=dataset,
                               val_fraction=0.1, shard_size="8MB"))
        model_args = {"channels": [32, 64], "hidden": 128}

        def run(name: str, **kw) -> float:
            cfg = TrainConfig(dataset=dataset, model="cnn", model_args=model_args, epochs=args.epochs,
                              batch_size=kw.pop("batch_size", 64), checkpoint_dir=str(work / "ck" / name),
                              resume=False, **kw)
            result = train_model(cfg)
            sps = result.history[-1]["samples_per_s"]
            stall = result.history[-1]["data_stall_share"]
            print(f"{name:28s} {sps:10,.0f} samples/s   stall {100 * stall:5.1f}%   val acc {result.val_acc:.3f}",
                  flush=True)
            return sps

        print(f"cnn {model_args} on synthetic-image {args.rows} rows 3x{args.size}x{args.size}, "
              f"{args.epochs} epochs, per-rank batch 64, one thread per rank", flush=True)
        one = run("1 rank fp32", world_size=1)
        two = run("2 ranks fp32", world_size=2)
        two_fp16 = run("2 ranks fp32, fp16 grads", world_size=2, grad_compression="fp16")
        two_small = run("2 ranks fp32, 1 MB buckets", world_size=2, bucket_cap_mb=1.0)
        bf16 = run("1 rank bf16-mixed", world_size=1, precision="bf16-mixed")
        summary = {
            "scaling_2_vs_1": round(two / one, 3),
            "bf16_vs_fp32": round(bf16 / one, 3),
            "fp16_grad_compression_vs_none": round(two_fp16 / two, 3),
            "bucket_1mb_vs_25mb": round(two_small / two, 3),
            "samples_per_s": {"1_rank": one, "2_ranks": two, "1_rank_bf16": bf16},
        }
        print(json.dumps(summary))
    finally:
        cluster.close()
        server.stop()


if __name__ == "__main__":
    main()
