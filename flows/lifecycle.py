"""The whole lifecycle as one flow: stage -> train -> optimize -> infer, each a subflow.

For a language model (a text source, ``--preset text``), the last stage is not classifier
inference: the optimized model's validation perplexity is compared with a unigram model's
on the same tokens (both in the result and the summary).

Each stage runs inside a cached task whose key is a content hash of its inputs (source
listing, manifest, checkpoint tensors) and options, never of Python objects, and whose
outputs go to a folder named by that key. So a second identical call finds every stage
``Cached``; a changed training parameter re-runs training and what follows, nothing
before; and a failed run, re-run, skips the stages that finished and resumes the one
that failed (training from its last checkpoint). Before each stage, one status task of
that stage (:class:`tasks.step_status.StepStatus`) gives its key, its output folder and
whether that output is already finished: the flow itself reads no manifest or checkpoint.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

from prefect import task
from pydantic import BaseModel, Field

from flows.base import swarm_flow
from flows.presets import Preset, apply_preset
from flows.stage import stage_dataset
from flows.infer import batch_inference
from flows.optimize import optimize_model
from flows.train import TrainResult, train_model
from tasks import artifacts
from tasks.inference.config import InferConfig, InferOptions
from tasks.inference.offline import InferResult, infer_status_task
from tasks.optimize import OptimizeConfig, OptimizeResult, optimize_status_task
from tasks.optimize.config import OptimizeOptions
from tasks.text.options import TextOptions
from tasks.staging import StageConfig, StageOptions, StageResult, stage_status_task
from tasks.step_status import StepStatus
from tasks.training import TrainConfig, TrainOptions, train_status_task

CACHED = dict(cache_key_fn=lambda context, parameters: parameters["key"], persist_result=True,
              result_serializer="json")


class DataParams(TextOptions, StageOptions):
    """What data to stage, and how."""

    source: str = Field("digits", description="Built-in dataset (digits, synthetic-image, …) or an fsspec URL")
    name: str | None = Field(None, description="Dataset name in the output folder (default: from the source)")
    val_fraction: float = Field(0.2, ge=0.0, lt=1.0, description="Fraction of rows held out as the 'val' split")


class LifecycleResult(BaseModel):
    """Where everything went, and how well it did."""

    output: str
    dataset: str
    checkpoint: str
    model: str
    staged: StageResult
    trained: TrainResult
    optimized: OptimizeResult
    predictions: str | None  # classifiers: the infer stage's output
    predicted: InferResult | None
    stages_run: list[str]
    stages_cached: list[str]
    seconds: float


@task(name="stage", **CACHED)
def stage_step(config: StageConfig, key: str) -> StageResult:
    """Stage the data (cached by source content and options)."""
    return stage_dataset(config)


@task(name="train", **CACHED)
def train_step(config: TrainConfig, key: str) -> TrainResult:
    """Train (cached by dataset content, options and starting weights)."""
    return train_model(config)


@task(name="optimize", **CACHED)
def optimize_step(config: OptimizeConfig, key: str) -> OptimizeResult:
    """Optimize (cached by checkpoint tensors, eval data content and options)."""
    return optimize_model(config)


@task(name="infer", **CACHED)
def infer_step(config: InferConfig, key: str) -> InferResult:
    """Batch inference (cached by model tensors, dataset content and options)."""
    return batch_inference(config)


def dataset_name(params: DataParams) -> str:
    if params.name:
        return params.name
    base = params.source.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return base.split(".", 1)[0].replace("*", "all") or "dataset"


def _run(step, status: StepStatus, ran: list[str], cached: list[str], label: str):
    state = step.with_options(refresh_cache=not status.up_to_date)(status.config, status.key, return_state=True)
    (cached if state.name == "Cached" else ran).append(label)
    return state.result()


@swarm_flow(name="lifecycle", description="Stage, train, optimize and serve predictions, end to end.")
def lifecycle(
    data: DataParams = DataParams(),
    training: TrainOptions = TrainOptions(),
    optimization: OptimizeOptions = OptimizeOptions(quantize="int8-dynamic"),
    inference: InferOptions = InferOptions(),
    output: Annotated[str, Field(description="Root folder or URL for datasets, checkpoints, models, predictions")]
    = "swarm-data",
    storage_options: Annotated[dict[str, Any] | None, Field(description="fsspec options; never credentials")] = None,
    dask_address: Annotated[str | None, Field(description="Existing Dask scheduler (default: a local cluster)")] = None,
    preset: Annotated[Preset, Field(description="digits: a classifier; text: a GPT on python-help. "
                                                "Options set explicitly win over the preset's")] = "digits",
) -> LifecycleResult:
    """The AI lifecycle on the built-in digits by default; every stage cached by content."""
    started = time.perf_counter()
    data = apply_preset(preset, "data", data, DataParams())
    training = apply_preset(preset, "training", training, TrainOptions())
    optimization = apply_preset(preset, "optimization", optimization, OptimizeOptions(quantize="int8-dynamic"))
    ran: list[str] = []
    cached: list[str] = []
    name = dataset_name(data)
    root = output.rstrip("/")
    access = {"storage_options": storage_options or {}, "dask_address": dask_address}

    stage_cfg = StageConfig(dest=f"{root}/datasets/{name}", **data.model_dump(exclude={"name"}), **access)
    staged = _run(stage_step, stage_status_task(stage_cfg), ran, cached, "stage")

    probe = TrainConfig(dataset=staged.dest, checkpoint_dir="-", **training.model_dump(), **access)
    trained = _run(train_step, train_status_task(probe, f"{root}/checkpoints/{name}-"), ran, cached, "train")

    probe = OptimizeConfig(checkpoint=trained.checkpoint, eval_dataset=staged.dest, output="-",
                           **optimization.model_dump(), **access)
    optimized = _run(optimize_step, optimize_status_task(probe, f"{root}/models/{name}-"), ran, cached, "optimize")

    predicted = None
    if trained.task != "causal-lm":
        probe = InferConfig(model=optimized.output, dataset=staged.dest, output="-", **inference.model_dump(),
                            **access)
        predicted = _run(infer_step, infer_status_task(probe, f"{root}/predictions/{name}-"), ran, cached, "infer")

    result = LifecycleResult(
        output=root, dataset=staged.dest, checkpoint=trained.checkpoint, model=optimized.output,
        staged=staged, trained=trained, optimized=optimized, predicted=predicted,
        predictions=predicted.output if predicted else None,
        stages_run=ran, stages_cached=cached, seconds=round(time.perf_counter() - started, 2),
    )
    artifacts.table("lifecycle", [{
        "dataset": staged.dest, "rows": staged.rows, "val_acc": trained.val_acc,
        "val_perplexity": trained.val_perplexity, "unigram_val_perplexity": trained.unigram_val_perplexity,
        "model": optimized.output, "model_bytes_before": optimized.before.get("size_bytes"),
        "model_bytes_after": optimized.after.get("size_bytes"), "predictions": result.predictions or "-",
        "ran": ", ".join(ran) or "-", "cached": ", ".join(cached) or "-", "seconds": result.seconds,
    }], description="The lifecycle run")
    return result
