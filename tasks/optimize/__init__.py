"""Model optimization: LoRA merge, pruning, int8 quantization, precision; gated on accuracy.

Plain functions in :mod:`tasks.optimize.pipeline`; these are their thin Prefect tasks.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.optimize.config import STEP_ORDER, OptimizeConfig, OptimizeOptions
from tasks.optimize.pipeline import OptimizePlan, OptimizeResult, optimize, prepare_optimization
from tasks.optimize.report import comparison_rows
from tasks.step_status import StepStatus, keyed_status

__all__ = ["OptimizeConfig", "OptimizePlan", "OptimizeResult", "STEP_ORDER", "comparison_rows", "optimize",
           "optimize_status_task", "optimize_task", "prepare_optimization", "prepare_optimization_task"]


def optimize_identity(cfg: OptimizeConfig) -> str:
    """A content key of an optimization: checkpoint tensors, eval data content, options."""
    import hashlib
    import json

    from storage import checkpoint as ckpt
    from storage.dataset import Dataset

    _, meta = ckpt.read_meta(cfg.checkpoint, cfg.storage_options)
    data = Dataset.open(cfg.eval_dataset, cfg.storage_options).manifest.content_hash()
    options = cfg.model_dump(include=set(OptimizeOptions.model_fields) - {"threads"})
    body = json.dumps({"checkpoint": meta["tensors_hash"], "eval": data, "options": options}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def optimization_finished(cfg: OptimizeConfig) -> bool:
    """Whether ``cfg.output`` already holds an optimized model (outputs are keyed by content)."""
    from storage import checkpoint as ckpt
    from storage.errors import ManifestError

    try:
        ckpt.read_meta(cfg.output, cfg.storage_options, formats=(ckpt.MODEL_FORMAT_ID,))
    except ManifestError:
        return False
    return True


@task(name="prepare-optimization", cache_policy=NO_CACHE)
def prepare_optimization_task(config: OptimizeConfig) -> OptimizePlan:
    """Check the checkpoint, steps, eval dataset and output before any work."""
    return prepare_optimization(config)


@task(name="optimize-model", retries=0, cache_policy=NO_CACHE)
def optimize_task(config: OptimizeConfig, plan: OptimizePlan) -> OptimizeResult:
    """Optimize, measure before and after, and write the model only if the gate passes."""
    return optimize(config, plan)


@task(name="optimize-status", cache_policy=NO_CACHE)
def optimize_status_task(config: OptimizeConfig, output_prefix: str) -> StepStatus:
    """The optimization's content key, its output folder (``output_prefix`` + key), and whether
    that folder holds the optimized model."""
    return keyed_status(config, "output", output_prefix, optimize_identity, optimization_finished)
