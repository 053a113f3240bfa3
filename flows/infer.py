"""The offline inference flow: groups of shards on Dask workers, predictions as shards."""

from __future__ import annotations

import time

from prefect.futures import as_completed

from deployments.cluster import dask_runner, worker_count
from deployments.progress import Progress
from flows.base import swarm_flow
from tasks import artifacts
from tasks.inference.offline import (
    InferConfig,
    InferResult,
    commit_inference_task,
    group_inputs,
    plan_inference_task,
    predict_group_task,
)


@swarm_flow(name="batch-inference", description="Predict a dataset with a model, shard by shard, resumably.")
def batch_inference(config: InferConfig) -> InferResult:
    """Predict ``config.dataset`` with ``config.model`` into ``config.output``; re-runs skip finished shards."""
    started = time.perf_counter()
    plan = plan_inference_task(config)
    outputs = []
    if plan.todo:
        with dask_runner(config.dask_address) as runner:
            groups = group_inputs(plan, n_groups=2 * worker_count(runner))
            progress = Progress(f"predicting {sum(e.rows for e, _ in plan.todo):,} rows in {len(plan.todo)} shard(s)",
                                total=sum(e.rows for e, _ in plan.todo))
            futures = [runner.submit(predict_group_task, {"group": g}) for g in groups]
            for future in as_completed(futures):
                out = future.result()
                outputs.append(out)
                progress.advance(out.rows)
            progress.finish()
    result = commit_inference_task(plan, outputs, time.perf_counter() - started)
    artifacts.table("batch-inference", [{
        "output": result.output, "rows": result.rows, "shards": result.shards, "predicted": result.predicted_shards,
        "skipped": result.skipped_shards, "rows_per_s": result.rows_per_second, "seconds": result.seconds,
    }], description=f"Predictions of {config.model} on {config.dataset}")
    if result.batch_sizes:
        artifacts.table("batch-sizes", [
            {"group": b["group"], "worker": b["worker"], "chosen": b["size"],
             "tried": ", ".join(f"{k}: {v['rows_per_s']:,.0f} rows/s" for k, v in b["tried"].items()),
             "out_of_memory_at": ", ".join(map(str, b["out_of_memory_at"])) or "-"}
            for b in result.batch_sizes
        ], description="Adaptive batch sizes chosen per task")
    return result
