"""The offline generation flow: groups of prompts on Dask workers, completions as shards."""

from __future__ import annotations

import time

from deployments.cluster import fan_out
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
        outputs, generate_seconds = fan_out(config.dask_address, generate_group_task, lambda n: group_units(plan, n),
                                            plan.todo_rows, f"generating {plan.todo_rows:,} prompts in "
                                                            f"{len(plan.todo)} shard(s)")
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
