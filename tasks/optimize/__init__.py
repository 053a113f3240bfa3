"""Model optimization: LoRA merge, pruning, int8 quantization, precision; gated on accuracy.

Plain functions in :mod:`tasks.optimize.pipeline`; these are their thin Prefect tasks.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.optimize.config import STEP_ORDER, OptimizeConfig
from tasks.optimize.pipeline import OptimizePlan, OptimizeResult, optimize, prepare_optimization
from tasks.optimize.report import comparison_rows

__all__ = ["OptimizeConfig", "OptimizePlan", "OptimizeResult", "STEP_ORDER", "comparison_rows", "optimize",
           "optimize_task", "prepare_optimization", "prepare_optimization_task"]


@task(name="prepare-optimization", cache_policy=NO_CACHE)
def prepare_optimization_task(config: OptimizeConfig) -> OptimizePlan:
    """Check the checkpoint, steps, eval dataset and output before any work."""
    return prepare_optimization(config)


@task(name="optimize-model", retries=0, cache_policy=NO_CACHE)
def optimize_task(config: OptimizeConfig, plan: OptimizePlan) -> OptimizeResult:
    """Optimize, measure before and after, and write the model only if the gate passes."""
    return optimize(config, plan)
