"""The staging flow: source -> compressed shards + manifest, written on Dask workers."""

from __future__ import annotations

import time

from tasks import artifacts
from deployments.cluster import dask_runner, map_groups, worker_count
from deployments.progress import Progress
from flows.base import swarm_flow
from tasks.staging import (
    StageConfig,
    StageResult,
    commit_task,
    group_tasks,
    plan_stage_task,
    write_group_task,
)


@swarm_flow(name="stage-dataset", description="Stage a source into compressed shards with a manifest.")
def stage_dataset(config: StageConfig) -> StageResult:
    """Stage ``config.source`` into a sharded dataset at ``config.dest``."""
    started = time.perf_counter()
    plan = plan_stage_task(config)
    results = []
    if not plan.up_to_date:
        with dask_runner(config.dask_address) as runner:
            groups = group_tasks(plan, n_groups=worker_count(runner))
            progress = Progress(f"staging {plan.rows:,} rows into {plan.shard_count} shard(s)", total=plan.rows)
            results = map_groups(runner, write_group_task, groups, progress)
            progress.finish()
    result = commit_task(plan, results, time.perf_counter() - started)
    artifacts.table("stage-dataset", [summary_row(result)], description=f"Staged {config.source} -> {config.dest}")
    return result


def summary_row(result: StageResult) -> dict:
    text = {k: result.text[k] for k in ("documents", "tokens", "vocab_size")} if result.text else {}
    return {
        "dest": result.dest,
        "rows": result.rows,
        "shards": result.shards,
        "splits": ", ".join(f"{k}={v}" for k, v in result.splits.items()),
        "bytes_in": result.bytes_in,
        "bytes_out": result.bytes_out,
        "compression_ratio": result.compression_ratio,
        "rows_per_s": result.rows_per_second,
        "written": result.written_shards,
        "skipped": result.skipped_shards,
        "seconds": result.seconds,
    } | text | ({"classes": len(result.images["classes"]), "skipped_bad": result.images["skipped_bad"]}
                if result.images else {})
