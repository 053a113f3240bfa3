"""The optimization flow: check, optimize and measure on a Dask worker, report, gate."""

from __future__ import annotations

from deployments.cluster import dask_runner
from flows.base import swarm_flow
from storage.errors import QualityGateError
from tasks import artifacts
from tasks.optimize import (
    OptimizeConfig,
    OptimizeResult,
    comparison_rows,
    optimize_task,
    prepare_optimization_task,
)


@swarm_flow(name="optimize-model",
            description="Merge LoRA, prune, quantize to int8 or cast a trained model; refuse it if accuracy drops too far.")
def optimize_model(config: OptimizeConfig) -> OptimizeResult:
    """Optimize ``config.checkpoint`` into ``config.output``; steps run as merge-lora -> prune -> quantize | cast."""
    plan = prepare_optimization_task(config)
    with dask_runner(config.dask_address) as runner:
        result = runner.submit(optimize_task, {"config": config, "plan": plan}).result()
    verdict = "passed" if result.passed else "REFUSED by the quality gate"
    artifacts.table(
        "optimize-model",
        comparison_rows(result.before, result.after),
        description=f"{' -> '.join(plan.steps)} on {plan.model_name} ({verdict}; quality on {result.eval_rows} rows "
                    f"of {config.eval_dataset}, timings with {config.threads} thread(s))",
    )
    if not result.passed:
        raise QualityGateError(result.gate_message())
    return result
