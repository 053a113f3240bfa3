"""Offline batch inference: a model over a dataset's shards, predictions as shards.

Plan (driver): check that the model and the dataset fit and that the output may be
written, list the input shards, cut the unfinished ones into coarse groups; writes
nothing. Predict (Dask workers, one task per group, on the worker's GPU where it has
one): read the group's shards ahead through the node's shard cache, run the model in
adaptive batch sizes (backing off on out-of-memory), write one prediction shard per input
shard (:mod:`tasks.inference.prediction_shards`). Commit (driver): the manifest, last and
atomically, in the same format as staged data, keyed ``(shard, row)`` to the input rows.

Prediction shards are named by a hash of (input shard, model, options): a re-run skips
the finished ones, and a killed run leaves only whole shards (atomic writes) that the
next commit either names or removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel

from storage import checkpoint as ckpt, codecs, manifest as manifest_mod
from storage.cleanup import remove_unreferenced
from storage.dataset import Dataset
from storage.errors import ConfigError, ManifestError
from storage.manifest import Manifest, ShardEntry
from storage.urls import url_to_fs
from tasks.inference.config import InferConfig, InferOptions, InferTarget  # noqa: F401 - also importable from here
from tasks.inference.offline_checks import check_output, model_columns
from tasks.inference.prediction_shards import (
    FORMAT,
    PREDICTIONS_KIND,
    existing_entry,
    prediction_name,
    present_names,
    read_inputs,
    schema_of,
    write_predictions,
)
from tasks.retries import retry_unless_user_error
from tasks.step_status import StepStatus, keyed_status
from tasks.training.data import Columns

# Offline only throughput counts: two sizes in a row may fail to beat the current one before
# the batch size settles (throughput over batch size has bumps; see BENCHMARKS.md).
GROWTH_PATIENCE = 2
MODEL_FORMATS = (ckpt.FORMAT_ID, ckpt.MODEL_FORMAT_ID)


@dataclass(frozen=True)
class InferGroup:
    """One task's share: input shards (with their prediction names) of one dataset."""

    index: int
    run: str  # one per plan: the groups of a run on one worker share what the batch size learned
    config: InferConfig
    columns: Columns
    inputs: list[tuple[ShardEntry, str]]  # (input shard, prediction shard name)


@dataclass
class InferPlan:
    config: InferConfig
    model_url: str
    model_hash: str
    dataset_hash: str
    columns: Columns
    todo: list[tuple[ShardEntry, str]]
    done: list[tuple[ShardEntry, str]]
    rows: int
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:12])


@dataclass
class GroupOutput:
    index: int
    entries: list[ShardEntry]
    rows: int
    seconds: float
    batch_sizes: dict[str, Any] = field(default_factory=dict)
    worker: str = ""
    device: str = "cpu"
    stall_s: float = 0.0  # time the model waited for input rows
    cache_hits: int = 0
    cache_misses: int = 0


class InferResult(BaseModel):
    """What batch inference produced."""

    output: str
    rows: int
    shards: int
    predicted_shards: int
    skipped_shards: int
    seconds: float
    rows_per_second: float
    data_stall_share: float
    cache_hits: int  # input shards read from this node's shard cache (remote datasets)
    cache_misses: int  # input shards fetched into it
    devices: list[str]
    batch_sizes: list[dict[str, Any]]
    manifest_hash: str


def _options(cfg: InferConfig) -> dict:
    """The options a prediction shard's content depends on (its name hashes them)."""
    options = {"probabilities": cfg.probabilities, "codec": cfg.codec}
    if cfg.keep_columns or cfg.output_format != FORMAT:  # leaves the names of earlier runs' shards as they were
        options.update(keep_columns=list(cfg.keep_columns), output_format=cfg.output_format)
    return options


# --------------------------------------------------------------------------- plan


def plan_inference(cfg: InferConfig) -> InferPlan:
    """Check model, data and output fit and find what is left to predict; writes nothing."""
    model_url, meta = ckpt.read_meta(cfg.model, cfg.storage_options, formats=MODEL_FORMATS)
    ds = Dataset.open(cfg.dataset, cfg.storage_options)
    cols = model_columns(cfg.model, meta, ds, cfg.keep_columns)
    if cfg.split is not None and cfg.split not in ds.manifest.splits:
        raise ConfigError(f"split {cfg.split!r} is not in dataset {cfg.dataset!r}; it has: "
                          f"{', '.join(ds.manifest.splits) or 'none'}")
    entries = ds.shards(cfg.split)
    if not entries:
        raise ConfigError(f"dataset {cfg.dataset!r} has no shards to predict")
    fs, root = check_output(cfg.output, cfg.dataset, cfg.storage_options)
    names = [(e, prediction_name(e, meta["tensors_hash"], _options(cfg))) for e in entries]
    present = present_names(fs, root)
    return InferPlan(cfg, model_url, meta["tensors_hash"], ds.manifest.content_hash(), cols,
                     todo=[(e, n) for e, n in names if n not in present],
                     done=[(e, n) for e, n in names if n in present], rows=sum(e.rows for e in entries))


def group_inputs(plan: InferPlan, n_groups: int) -> list[InferGroup]:
    """Contiguous groups of the unfinished input shards with similar row counts."""
    todo = plan.todo
    if not todo:
        return []
    n_groups = max(1, min(n_groups, len(todo)))
    target = sum(e.rows for e, _ in todo) / n_groups
    groups: list[list] = [[]]
    acc = 0
    for item in todo:
        if groups[-1] and acc >= target * len(groups) and len(groups) < n_groups:
            groups.append([])
        groups[-1].append(item)
        acc += item[0].rows
    return [InferGroup(i, plan.run, plan.config, plan.columns, g) for i, g in enumerate(groups)]


# --------------------------------------------------------------------------- predict (on a worker)


def inference_device(choice: str = "auto"):
    """CUDA when the process sees a GPU (a dask-cuda worker sees its own as device 0), else CPU."""
    import torch

    if choice != "cpu" and torch.cuda.is_available():
        return torch.device("cuda")
    if choice == "cuda":
        raise ConfigError("device 'cuda' was asked for but this worker sees no CUDA device; use device auto or cpu")
    return torch.device("cpu")


def batch_clock(device, latency_target_ms: float | None):
    """What batch sizes are judged by, and its name: on a CPU computing on the calling
    thread alone, that thread's CPU time, so that other processes taking turns on the core
    do not decide (per-batch spread ~2% where wall time spread ~16% on a shared machine,
    BENCHMARKS.md); else wall time (GPUs, several threads, and a latency target, which is
    about wall time)."""
    import torch

    if device.type == "cpu" and torch.get_num_threads() == 1 and latency_target_ms is None:
        return time.thread_time, "thread cpu time"
    return time.perf_counter, "wall time"


_CONTROLLERS: OrderedDict[tuple[str, str], Any] = OrderedDict()
_CONTROLLERS_LOCK = threading.Lock()


def _controller(group: InferGroup, device) -> Any:
    """The batch size controller of this run on this device, in this process: a worker's
    next group of the same run starts from what the previous one learned."""
    from tasks.inference.adaptive import AdaptiveBatchSize

    cfg = group.config
    key = (group.run, str(device))
    with _CONTROLLERS_LOCK:
        found = _CONTROLLERS.get(key)
        if found is None:
            target = cfg.latency_target_ms / 1000 if cfg.latency_target_ms else None
            initial = min(cfg.initial_batch_size, cfg.max_batch_size) if cfg.adaptive else cfg.max_batch_size
            found = _CONTROLLERS[key] = AdaptiveBatchSize(cfg.max_batch_size, initial=initial, latency_target_s=target,
                                                          reprobe_after=500 if cfg.adaptive else None,
                                                          patience=GROWTH_PATIENCE)
            while len(_CONTROLLERS) > 8:
                _CONTROLLERS.popitem(last=False)
        return found


def predict_group(group: InferGroup) -> GroupOutput:
    """Predict every input shard of ``group`` and write its prediction shard."""
    from tasks.allocator import steady_allocator
    from tasks.inference.kernels import PROBE_ROWS, fastest_forward
    from tasks.inference.predict import make_predict
    from tasks.models.loading import load_model
    from tasks.training.data import scale_features

    started = time.perf_counter()
    cfg, cols = group.config, group.columns
    device = inference_device(cfg.device)
    loaded = load_model(cfg.model, cfg.storage_options)
    model = loaded.model.to(device)
    controller = _controller(group, device)
    clock, timed_by = batch_clock(device, cfg.latency_target_ms)
    fs, root = url_to_fs(cfg.output, cfg.storage_options)
    root = root.rstrip("/")
    entries, rows, hits, misses = [], 0, 0, 0
    predict, kernel = None, None
    inputs = read_inputs(cfg.dataset, cfg.storage_options, group.inputs, cols, device, keep=cfg.keep_columns)
    with steady_allocator():
        for item in inputs:
            shard = item["shard"]
            x = scale_features(item["x"], cols)
            if predict is None:
                cap = _memory_cap(loaded, model, x, cols, cfg.memory_cap_mb)
                probe = x[:min(len(x), controller.maximum, PROBE_ROWS)]
                forward, kernel = fastest_forward(model, probe, device, kernel=cfg.kernel,
                                                  key=(loaded.url, loaded.meta.get("tensors_hash")))
                predict = make_predict(forward, lambda t: t, device, controller=controller, memory_cap=cap, clock=clock)
            logits = predict(x)
            entries.append(write_predictions(fs, root, shard, logits, cfg.probabilities, cfg.codec, cols,
                                             cfg.output_format))
            shard.release()
            rows += shard.entry.rows
            hits += shard.cache_hit is True
            misses += shard.cache_hit is False
    return GroupOutput(group.index, entries, rows, time.perf_counter() - started,
                       {**controller.report(), "timed_by": timed_by, "kernel": kernel},
                       worker=f"{socket.gethostname()}:{os.getpid()}", device=str(device),
                       stall_s=inputs.stats.stall_s, cache_hits=hits, cache_misses=misses)


def _memory_cap(loaded, model, x, cols: Columns, cap_mb: float | None):
    """Run the model on one row (a clear error if it cannot take these rows) and make the
    memory cap from the activations it measured."""
    from tasks.inference.memory import MemoryCap, activation_bytes_per_row

    try:
        per_row = activation_bytes_per_row(model, x[:1])
    except Exception as exc:  # noqa: BLE001 - any failure here is a model/input mismatch
        raise ConfigError(f"model {loaded.name!r} of {loaded.url!r} cannot take the rows of column {cols.feature!r} "
                          f"(shape {list(x.shape[1:])}, {x.dtype}): {type(exc).__name__}: {exc}") from None
    if cap_mb is None:
        return None
    cap = MemoryCap(int(cap_mb * 2**20), per_row)
    if per_row > cap.limit_bytes:
        raise ConfigError(f"memory cap {cap_mb:g} MB is below one row's activations ({per_row / 2**20:.2f} MB) "
                          f"for model {loaded.name!r}; raise it or leave it unset")
    return cap


# --------------------------------------------------------------------------- commit


def commit_inference(plan: InferPlan, outputs: list[GroupOutput], seconds: float,
                     predict_seconds: float | None = None) -> InferResult:
    """Write the prediction manifest last, atomically; drop shards it does not name.

    ``predict_seconds``: wall time of the prediction phase (default: ``seconds``)."""
    cfg = plan.config
    fs, root = url_to_fs(cfg.output, cfg.storage_options)
    root = root.rstrip("/")
    previous = manifest_mod.read_if_exists(fs, root)
    known = {e.name: e for e in previous.shards} if previous is not None else {}
    known.update({e.name: e for o in outputs for e in o.entries})
    entries = []
    for source, name in sorted(plan.todo + plan.done, key=lambda p: (p[0].split, p[0].name)):
        entry = existing_entry(fs, root, name, source.split, known)
        if entry.rows != source.rows:
            raise ManifestError(f"prediction shard {name!r} has {entry.rows} rows for {source.rows} input rows")
        entries.append(entry)
    codec, level = codecs.resolve(cfg.codec)
    manifest = Manifest(
        shard_format=cfg.output_format, codec=codec, level=level, schema=schema_of(fs, root, entries[0]), shards=entries,
        metadata={"kind": PREDICTIONS_KIND, "key": ["shard", "row"], "model": plan.model_url,
                  "model_hash": plan.model_hash, "dataset": cfg.dataset, "dataset_hash": plan.dataset_hash},
        source={"model_hash": plan.model_hash, "dataset_hash": plan.dataset_hash, "options": _options(cfg)},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    manifest_mod.write(fs, root, manifest)
    remove_unreferenced(fs, root, keep=[manifest, previous])
    predicted = sum(o.rows for o in outputs)
    busy = sum(o.seconds for o in outputs)
    return InferResult(
        output=cfg.output, rows=manifest.rows, shards=len(entries), predicted_shards=sum(len(o.entries) for o in outputs),
        skipped_shards=len(plan.done), seconds=round(seconds, 3),
        rows_per_second=round(predicted / max(predict_seconds or seconds, 1e-9), 1) if outputs else 0.0,
        data_stall_share=round(sum(o.stall_s for o in outputs) / busy, 4) if busy else 0.0,
        cache_hits=sum(o.cache_hits for o in outputs), cache_misses=sum(o.cache_misses for o in outputs),
        devices=sorted({o.device for o in outputs}),
        batch_sizes=[{"group": o.index, "worker": o.worker, "device": o.device, **o.batch_sizes}
                     for o in sorted(outputs, key=lambda o: o.index)],
        manifest_hash=manifest.content_hash(),
    )


def inference_finished(cfg: InferConfig) -> bool:
    """Whether ``cfg.output`` holds this model's predictions of this dataset."""
    fs, root = url_to_fs(cfg.output, cfg.storage_options)
    previous = manifest_mod.read_if_exists(fs, root.rstrip("/"))
    if previous is None or previous.metadata.get("kind") != PREDICTIONS_KIND:
        return False
    _, meta = ckpt.read_meta(cfg.model, cfg.storage_options, formats=MODEL_FORMATS)
    dataset_hash = Dataset.open(cfg.dataset, cfg.storage_options).manifest.content_hash()
    return previous.source == {"model_hash": meta["tensors_hash"], "dataset_hash": dataset_hash,
                               "options": _options(cfg)}


def infer_identity(cfg: InferConfig) -> str:
    _, meta = ckpt.read_meta(cfg.model, cfg.storage_options, formats=MODEL_FORMATS)
    dataset_hash = Dataset.open(cfg.dataset, cfg.storage_options).manifest.content_hash()
    options = cfg.model_dump(include=set(InferOptions.model_fields))
    body = json.dumps({"model": meta["tensors_hash"], "dataset": dataset_hash, "options": options}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


# --------------------------------------------------------------------------- Prefect tasks


def _prefect_tasks():
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    plan = task(name="plan-inference", cache_policy=NO_CACHE)(plan_inference)
    predict = task(name="predict-shards", retries=2, retry_delay_seconds=1, retry_condition_fn=retry_unless_user_error,
                   cache_policy=NO_CACHE)(predict_group)
    commit = task(name="commit-predictions", cache_policy=NO_CACHE)(commit_inference)
    status = task(name="infer-status", cache_policy=NO_CACHE)(infer_status)
    return plan, predict, commit, status


def infer_status(cfg: InferConfig, output_prefix: str) -> StepStatus:
    """The inference's content key, its output folder (``output_prefix`` + key), and whether that
    folder holds this model's predictions of this dataset."""
    return keyed_status(cfg, "output", output_prefix, infer_identity, inference_finished)


plan_inference_task, predict_group_task, commit_inference_task, infer_status_task = _prefect_tasks()
