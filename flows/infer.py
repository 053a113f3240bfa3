"""The offline inference flow: groups of shards on Dask workers, predictions as shards."""

from __future__ import annotations

import time

from deployments.cluster import fan_out
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
    predict_seconds = None
    if plan.todo:
        rows = sum(e.rows for e, _ in plan.todo)
        outputs, predict_seconds = fan_out(config.dask_address, predict_group_task, lambda n: group_inputs(plan, n),
                                           rows, f"predicting {rows:,} rows in {len(plan.todo)} shard(s)")
    result = commit_inference_task(plan, outputs, time.perf_counter() - started, predict_seconds)
    artifacts.table("batch-inference", [{
        "output": result.output, "rows": result.rows, "shards": result.shards, "predicted": result.predicted_shards,
        "skipped": result.skipped_shards, "rows_per_s": result.rows_per_second,
        "data_stall_share": result.data_stall_share, "devices": ", ".join(result.devices) or "-",
        "seconds": result.seconds,
    }], description=f"Predictions of {config.model} on {config.dataset}")
    if result.batch_sizes:
        artifacts.table("batch-sizes", [
            {"group": b["group"], "worker": b["worker"], "device": b["device"], "chosen": b["size"],
             "tried": ", ".join(f"{k}: {v['rows_per_s']:,.0f} rows/s" for k, v in b["tried"].items()) or "-",
             "timed_by": b.get("timed_by", "-"), "kernel": b.get("kernel") or "-",
             "out_of_memory_at": ", ".join(map(str, b["out_of_memory_at"])) or "-"}
            for b in result.batch_sizes
        ], description="Batch sizes chosen per task (adaptive: the size it settled on or was using at the end)")
    return result
