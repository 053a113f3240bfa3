"""The training flow: validate, then DDP ranks gang-scheduled on Dask workers, retried as a group."""

from __future__ import annotations

import time
import uuid
from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel

from deployments.cluster import dask_runner
from deployments.gang import (
    GangFailed,
    Superseded,
    free_port_on,
    has_resource,
    host_of,
    pick_workers,
    run_gang,
    take_over,
    taken_over,
)
from deployments.progress import Progress
from flows.base import swarm_flow
from storage.errors import ConfigError, SwarmError
from tasks import artifacts
from tasks.training import (
    PROGRESS_TOPIC,
    RankJob,
    RankResult,
    TrainConfig,
    TrainPlan,
    clear_checkpoints_task,
    gang_key,
    latest_checkpoint_task,
    prepare_training_task,
    train_rank_task,
    unigram_baseline_task,
)


class TrainResult(BaseModel):
    """What training produced."""

    checkpoint: str
    checkpoint_dir: str
    model: str
    model_args: dict[str, Any]
    parameters: int
    world_size: int
    epochs: int
    steps: int
    attempts: int
    resumed_from: str | None
    val_acc: float | None
    train_loss: float
    val_rmse: float | None = None  # regression, in the target's units
    val_mae: float | None = None
    val_r2: float | None = None
    samples_per_s: float
    data_stall_share: float
    seconds: float
    history: list[dict[str, Any]]
    task: str = "classify"
    val_loss: float | None = None
    val_perplexity: float | None = None  # causal-lm
    unigram_val_perplexity: float | None = None  # causal-lm: a unigram model's, on the same tokens
    train_perplexity: float | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    samples: list[dict[str, Any]] = []  # causal-lm: greedy continuations of validation prompts


@flow(name="ddp-group", flow_run_name="ddp-group-attempt-{attempt}")
def ddp_group(config: TrainConfig, plan: TrainPlan, attempt: int = 1) -> list[RankResult]:
    """One attempt of the whole rank group, gang-scheduled; any failure fails all of it."""
    with dask_runner(config.dask_address) as runner:
        client = runner.client
        gpu = has_resource(client, "GPU")
        if config.precision == "fp16-mixed" and not gpu:
            raise ConfigError("precision fp16-mixed needs GPU workers (CUDA and a gradient scaler); use bf16-mixed or fp32")
        token = uuid.uuid4().hex
        restarted = _take_over(client, config, token)
        # A retry waits for the cluster to replace lost workers; a first attempt fails fast.
        workers = pick_workers(client, config.world_size, wait_s=0 if attempt <= 1 and not restarted else 90,
                               resource="GPU" if gpu else None)
        port = free_port_on(client, workers[0]) if config.world_size > 1 else 0
        resume_from = latest_checkpoint_task(config)
        jobs = [
            RankJob(config, plan.model_name, plan.model_args, plan.columns, rank, config.world_size,
                    host_of(workers[0]), port, attempt, resume_from, token, lm=plan.lm)
            for rank in range(config.world_size)
        ]
        progress: dict[str, Progress] = {}
        latest: dict[str, Any] = {}
        client.subscribe_topic(PROGRESS_TOPIC, lambda event: latest.update(event[1]))

        def forward_progress() -> None:
            event = dict(latest)
            if "done" in event:
                bar = progress.get("bar") or progress.setdefault("bar", Progress(event["description"], event["total"]))
                bar.advance(event["done"] - bar.done)

        try:
            return run_gang(runner, train_rank_task, jobs, workers, resources={"GPU": 1} if gpu else None,
                            on_poll=forward_progress, straggler_s=2 * config.timeout_s)
        except GangFailed as exc:
            if taken_over(client, gang_key(config), token):  # not ours to retry: another run took the folder
                raise Superseded(f"training on {config.checkpoint_dir!r} stopped: another run took over that "
                                 "checkpoint folder; give each concurrent run its own --checkpoint-dir") from exc
            raise
        finally:
            client.unsubscribe_topic(PROGRESS_TOPIC)
            forward_progress()


def _take_over(client, config: TrainConfig, token: str) -> list[str]:
    """Ranks of an earlier attempt or run on this checkpoint folder stop and leave before this one
    touches it: Dask cannot stop their threads, only they can (see :func:`deployments.gang.take_over`)."""
    return take_over(client, gang_key(config), token, wait_s=config.timeout_s + 30)


def _run_group_with_retries(config: TrainConfig, plan: TrainPlan) -> list[RankResult]:
    """Retry the whole group (a new subflow run each time) unless the failure is the user's."""
    for attempt in range(1, config.max_retries + 2):
        state = ddp_group(config, plan, attempt, return_state=True)
        if state.is_completed():
            return state.result()
        try:
            state.result()
        except SwarmError:
            raise
        except Exception as exc:
            if attempt > config.max_retries:
                raise
            get_run_logger().warning("training attempt %d of %d failed (%s: %s); retrying the whole group",
                                     attempt, config.max_retries + 1, type(exc).__name__, exc)
    raise AssertionError("unreachable")


@swarm_flow(name="train-model", description="Train a model with DDP across Dask workers.")
def train_model(config: TrainConfig) -> TrainResult:
    """Train ``config.model`` on ``config.dataset``; resumes from the last checkpoint."""
    started = time.perf_counter()
    with dask_runner(config.dask_address) as runner:  # before anything reads or clears the folder
        _take_over(runner.client, config, uuid.uuid4().hex)
    plan = prepare_training_task(config)
    if not config.resume:
        clear_checkpoints_task(config)
    results = _run_group_with_retries(config, plan)
    unigram = unigram_baseline_task(config, plan) if plan.lm else None
    main = results[0]
    last = main.history[-1]
    result = TrainResult(
        checkpoint=main.checkpoint,
        checkpoint_dir=config.checkpoint_dir,
        model=plan.model_name,
        model_args=plan.model_args,
        parameters=plan.parameters,
        world_size=config.world_size,
        epochs=main.epochs,
        steps=main.steps,
        attempts=main.attempt,
        resumed_from=main.resumed_from,
        val_acc=last.get("val_acc"),
        train_loss=last["train_loss"],
        val_rmse=last.get("val_rmse"),
        val_mae=last.get("val_mae"),
        val_r2=last.get("val_r2"),
        samples_per_s=last["samples_per_s"],
        data_stall_share=last["data_stall_share"],
        seconds=round(time.perf_counter() - started, 2),
        history=main.history,
        task=plan.task,
        val_loss=last.get("val_loss"),
        val_perplexity=last.get("val_ppl"),
        unigram_val_perplexity=None if unigram is None else round(unigram, 3),
        train_perplexity=last.get("train_ppl"),
        tokens_per_s=last.get("tokens_per_s"),
        mfu=last.get("mfu"),
        samples=main.samples,
    )
    artifacts.table(
        "train-model",
        [{k: v for k, v in result.model_dump().items() if k not in ("history", "model_args", "samples")}],
        description=f"Trained {plan.model_name} on {config.dataset}",
    )
    return result
