"""Training: plan (validate data and model), then one Prefect task per DDP rank."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from storage import checkpoint as ckpt
from storage.dataset import Dataset
from storage.errors import ConfigError, IntegrityError
from tasks.models import build_model, default_model, resolve_factory
from tasks.models.sizing import check_model as check_sizes, data_size, model_arguments
from tasks.models.hf import is_hf
from tasks.training.config import TrainConfig, TrainOptions
from tasks.training.data import Columns, feature_tensor, resolve_columns, to_arrays
from tasks.step_status import StepStatus, keyed_status
from tasks.training.lm import LMSpec
from tasks.training.lm_data import check_model, lm_spec, resolve_task
from tasks.training.rank import RankJob, RankResult, gang_key, train_rank

PROGRESS_TOPIC = "swarm-train-progress"

__all__ = ["TrainConfig", "TrainPlan", "prepare_training", "prepare_training_task", "train_rank_task", "RankJob",
           "RankResult", "PROGRESS_TOPIC", "gang_key"]


@dataclass(frozen=True)
class TrainPlan:
    model_name: str
    model_args: dict[str, Any]
    columns: Columns
    train_rows: int
    val_rows: int
    parameters: int
    resume_from: str | None
    task: str = "classify"
    lm: LMSpec | None = None  # causal-lm: the token column and the data contract's metadata


def _refuse_lm_only_options(cfg: TrainConfig) -> None:
    """Classifiers train through the captured step (tasks.training.step), which has no
    accumulation, clipping or schedule yet: say so instead of ignoring the option."""
    given = [flag for flag, on in (("--grad-accum", cfg.grad_accum > 1), ("--grad-clip", bool(cfg.grad_clip)),
                                   ("--lr-schedule cosine", cfg.lr_schedule == "cosine"),
                                   ("--warmup-steps", cfg.warmup_steps > 0)) if on]
    if given:
        raise ConfigError(f"{', '.join(given)} apply to causal-LM training only (--task causal-lm); "
                          "classifier training does not support them yet")


def prepare_training(cfg: TrainConfig) -> TrainPlan:
    """Check the dataset, model and checkpoints before any rank starts; writes nothing."""
    ds = Dataset.open(cfg.dataset, cfg.storage_options)
    task = resolve_task(ds, "classify" if cfg.task == "classification" else cfg.task, cfg.label_column)
    meta = ds.manifest.metadata
    lm = lm_spec(ds, cfg.feature_column, cfg.seq_len) if task == "causal-lm" else None
    if lm is None:
        _refuse_lm_only_options(cfg)
    cols = Columns(lm.column, None, None, None) if lm else resolve_columns(
        ds, cfg.feature_column, cfg.label_column, cfg.feature_columns, cfg.task, cfg.normalize)
    if not lm:
        task = cols.task
    name = default_model(meta, task) if cfg.model == "auto" else cfg.model
    classes = cols.labels.classes if cols.labels is not None and task == "classify" else None
    size = data_size(meta, (lm.seq_len,) if lm else cols.shape, task, len(classes) if classes else None)
    args = model_arguments(name, None if is_hf(name) else resolve_factory(name), size, cfg.model_args)
    if lm and name == "gpt" and "seq_len" not in cfg.model_args:
        args["seq_len"] = lm.seq_len
    model = build_model(name, args, storage_options=cfg.storage_options)
    splits = {s: sum(e.rows for e in ds.shards(s)) for s in ds.manifest.splits}
    if "train" not in splits:
        raise ConfigError(f"dataset {cfg.dataset!r} has no 'train' split (splits: {', '.join(splits)})")
    if splits["train"] < cfg.batch_size * cfg.world_size:
        raise ConfigError(
            f"the train split has {splits['train']} rows, fewer than one global batch "
            f"({cfg.world_size} ranks x batch {cfg.batch_size}); lower --batch-size or --world-size"
        )
    if lm:
        check_model(model, name, lm, ds)
    else:
        _check_forward(model, ds, cols, name, size)
    if cfg.init_from and not is_hf(cfg.init_from):
        _, init_meta = ckpt.load(cfg.init_from, cfg.storage_options)
        spec = init_meta.get("model", {})
        if spec.get("name") != name or spec.get("args") != args:
            raise ConfigError(
                f"--init-from {cfg.init_from!r} holds model {spec.get('name')!r} with {spec.get('args')}, "
                f"not {name!r} with {args}"
            )
    resume_from = latest_checkpoint(cfg) if cfg.resume else None
    if resume_from:
        _, old = ckpt.read_meta(resume_from, cfg.storage_options)
        spec = old.get("model", {})
        if spec.get("name") != name or spec.get("args") != args:
            raise ConfigError(
                f"checkpoint dir {cfg.checkpoint_dir!r} holds a run of model {spec.get('name')!r} with "
                f"{spec.get('args')}; pass --no-resume to start over there, or another --checkpoint-dir"
            )
    return TrainPlan(name, args, cols, splits["train"], splits.get("val", 0),
                     sum(p.numel() for p in model.parameters()), resume_from, task, lm)


def _check_forward(model, ds: Dataset, cols: Columns, name: str, size) -> None:
    """One batch of the train split through the model on the driver (see tasks.models.sizing)."""
    table = ds.read_shard(ds.shards("train")[0]).slice(0, 64)
    x, y = to_arrays(table, cols)
    what = f"feature columns {', '.join(cols.table.names)} of {ds.url!r}" if cols.table else \
        f"column {cols.feature!r} of {ds.url!r}"
    check_sizes(model, name, size, feature_tensor(x, cols), y, what=what)


class PrefectReporter:
    """Rank 0's reports: progress as Dask events (the flow turns them into a Prefect progress
    artifact and the CLI bar), and at the end the per-epoch table and the curves plot."""

    def __init__(self, description: str):
        self.description = description
        self.last = 0.0

    def _event(self, payload: dict) -> None:
        try:
            from distributed import get_worker

            get_worker().log_event(PROGRESS_TOPIC, payload)
        except ValueError:  # not on a Dask worker (plain call)
            pass

    def progress(self, step: int, total: int, metrics: dict) -> None:
        import time

        now = time.monotonic()
        if now - self.last < 0.25 and step < total:
            return
        self.last = now
        self._event({"description": self.description, "done": step, "total": total, **metrics})

    def epoch(self, row: dict) -> None:
        self._event({"description": self.description, "epoch_row": row})

    def finish(self, history: list[dict]) -> None:
        from tasks import artifacts
        from tasks.training.plots import curves_png

        lm = bool(history) and "train_ppl" in history[-1]
        artifacts.table("train-epochs", history, description="Per-epoch training metrics")
        artifacts.image("train-curves", curves_png(history),
                        description="Loss and perplexity per epoch" if lm else "Loss and accuracy per epoch")

    def samples(self, rows: list[dict]) -> None:
        from tasks import artifacts

        artifacts.table("train-samples", rows, description="Greedy continuations of validation prompts after training")


def clear_checkpoints(cfg: TrainConfig) -> None:
    """``--no-resume``: start over, so a retried group never resumes an older run."""
    from storage.urls import url_to_fs

    fs, root = url_to_fs(cfg.checkpoint_dir, cfg.storage_options)
    for step in ckpt.steps(fs, root.rstrip("/")):
        fs.rm(f"{root.rstrip('/')}/ckpt-{step:09d}", recursive=True)


def latest_checkpoint(cfg: TrainConfig) -> str | None:
    """The checkpoint to resume from: the newest intact one (a damaged newer one is skipped, and said so)."""
    url, damaged = ckpt.latest_intact(cfg.checkpoint_dir, cfg.storage_options)
    for problem in damaged:
        _logger().warning("not resuming from a damaged checkpoint, but from %s: %s", url, problem)
    return url


def _logger():
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        import logging

        return logging.getLogger(__name__)


#: Options that change how a run executes, not what it produces.
RUNTIME_ONLY = {"max_retries", "timeout_s", "threads_per_rank", "keep_last", "checkpoint_every"}


def train_identity(cfg: TrainConfig) -> str:
    """A content key of a training run: dataset content, options, starting weights."""
    import hashlib
    import json

    dataset_hash = Dataset.open(cfg.dataset, cfg.storage_options).manifest.content_hash()
    init_hash = None
    if cfg.init_from:
        init_hash = cfg.init_from if is_hf(cfg.init_from) else ckpt.read_meta(cfg.init_from, cfg.storage_options)[1]["tensors_hash"]
    options = cfg.model_dump(include=set(TrainOptions.model_fields) - RUNTIME_ONLY)
    body = json.dumps({"dataset": dataset_hash, "init": init_hash, "options": options}, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def training_finished(cfg: TrainConfig) -> bool:
    """Whether ``cfg.checkpoint_dir`` holds the end-of-training checkpoint of ``cfg``."""
    try:
        latest, _ = ckpt.latest_intact(cfg.checkpoint_dir, cfg.storage_options)
    except IntegrityError:
        return False
    if latest is None:
        return False
    _, meta = ckpt.read_meta(latest, cfg.storage_options)
    return meta.get("epoch") == cfg.epochs and meta.get("batch") == 0


@task(name="prepare-training", cache_policy=NO_CACHE)
def prepare_training_task(cfg: TrainConfig) -> TrainPlan:
    """Validate dataset, model and checkpoints."""
    return prepare_training(cfg)


@task(name="train-rank", retries=0, cache_policy=NO_CACHE)
def train_rank_task(job: RankJob) -> RankResult:
    """Run one DDP rank; a failure fails the whole group, which is retried as one."""
    reporter = PrefectReporter(f"training {job.model_name} on {job.world_size} rank(s)") if job.rank == 0 else None
    return train_rank(job, reporter)


@task(name="train-status", cache_policy=NO_CACHE)
def train_status_task(cfg: TrainConfig, checkpoints_prefix: str) -> StepStatus:
    """The training's content key, its checkpoint folder (``checkpoints_prefix`` + key), and
    whether that folder holds the end-of-training checkpoint."""
    return keyed_status(cfg, "checkpoint_dir", checkpoints_prefix, train_identity, training_finished)


@task(name="clear-checkpoints", cache_policy=NO_CACHE)
def clear_checkpoints_task(cfg: TrainConfig) -> None:
    """``--no-resume``: remove the folder's checkpoints before the first attempt."""
    clear_checkpoints(cfg)


@task(name="latest-checkpoint", cache_policy=NO_CACHE)
def latest_checkpoint_task(cfg: TrainConfig) -> str | None:
    """The newest intact checkpoint to resume from, if any."""
    return latest_checkpoint(cfg)


@task(name="unigram-baseline", cache_policy=NO_CACHE)
def unigram_baseline_task(cfg: TrainConfig, plan: TrainPlan) -> float | None:
    """Causal LM: a unigram model's validation perplexity on the same tokens (the floor to beat)."""
    from tasks.training.baseline import unigram_perplexity

    return unigram_perplexity(cfg.dataset, plan.lm, cfg.storage_options) if plan.lm else None
