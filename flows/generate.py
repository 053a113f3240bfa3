"""The offline generation flow: groups of prompts on Dask workers, completions as shards."""

from __future__ import annotations

import time

from deployments.cluster import dask_runner, gpu_tasks, map_groups, worker_count
from deployments.progress import Progress
from flows.base import swarm_flow
from tasks import artifacts
from tasks.generation.offline import (
    GenerateResult,
    commit_generation_task,
    generate_group_task,
    group_units,
    plan_generation_task,
)
from tasks.generation.offline_config import GenerateConfig
from tasks.generation.plots import occupancy_png


@swarm_flow(name="batch-generate", description="Generate completions of prompts with a language model, resumably.")
def batch_generate(config: GenerateConfig) -> GenerateResult:
    """Complete every prompt of ``config.prompts`` with ``config.model`` into ``config.output``;
    re-runs skip finished shards."""
    started = time.perf_counter()
    plan = plan_generation_task(config)
    outputs = []
    generate_seconds = None
    if plan.todo:
        with dask_runner(config.dask_address) as runner, gpu_tasks(runner) as on_gpus:
            # One task per worker: each loads the model once and keeps its engine's queue full.
            groups = group_units(plan, n_groups=worker_count(runner, "GPU" if on_gpus else None))
            rows = plan.todo_rows
            progress = Progress(f"generating {rows:,} prompts in {len(plan.todo)} shard(s)", total=rows)
            began = time.perf_counter()
            outputs = map_groups(runner, generate_group_task, groups, progress)
            generate_seconds = time.perf_counter() - began
            progress.finish()
    result = commit_generation_task(plan, outputs, time.perf_counter() - started, generate_seconds)
    artifacts.table("batch-generate", [{
        "output": result.output, "prompts": result.rows, "shards": result.shards,
        "generated": result.generated_shards, "skipped": result.skipped_shards,
        "generated_tokens": result.generated_tokens, "tokens_per_s": result.tokens_per_second,
        "mean_occupancy": result.mean_occupancy, "devices": ", ".join(result.devices) or "-",
        "seconds": result.seconds,
    }], description=f"Generations of {config.model} for {config.prompts}")
    if result.occupancy:
        artifacts.image("batch-occupancy", occupancy_png(result.occupancy),
                        "Running sequences per engine step, per task")
    if result.samples:
        artifacts.table("sample-generations", result.samples, description="A few prompts and their completions")
    return result
