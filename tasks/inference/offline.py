"""Offline batch inference: a model over a dataset's shards, predictions as shards.

Plan (driver): check the model and the dataset fit, list the input shards, cut them into
coarse groups. Predict (Dask workers, one task per group): read each input shard through
the node's shard cache with the next shards prefetched, run the model in adaptive batch
sizes, write one prediction shard per input shard. Commit (driver): the manifest, last
and atomically, in the same format as staged data.

A prediction shard's name is a hash of (input shard content, model, options), so a re-run
finds finished shards by name and skips them, and a killed run never leaves a partial
shard visible (writes are atomic). Every prediction row carries ``shard`` (the input
shard's name in the dataset manifest) and ``row`` (its row in that shard): the key that
joins it back to its input.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from storage import checkpoint as ckpt, formats, manifest as manifest_mod
from storage.dataset import Dataset
from storage.errors import ConfigError, ManifestError
from storage.hashing import digest_bytes
from storage.manifest import Manifest, ShardEntry
from storage.shard_writer import PART_PREFIX
from storage.urls import url_to_fs
from tasks.staging import StorageAccess, retry_unless_user_error, remove_unreferenced
from tasks.training.data import Columns, column_transform, resolve_columns, to_arrays

PREDICTIONS_KIND = "predictions"
# Inputs are read-only views of Arrow buffers, which the model never writes to.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", module=r"tasks\.")


class InferOptions(BaseModel):
    """How to run the model over the data (shared with the lifecycle flow)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    split: str | None = Field(None, description="Split to predict (default: every split)")
    max_batch_size: int = Field(1024, ge=1, le=1_000_000, description="Rows per model call at most")
    initial_batch_size: int = Field(32, ge=1, description="Where the adaptive batch size starts")
    latency_target_ms: float | None = Field(None, gt=0, description="Stop growing batches whose compute passes this")
    memory_cap_mb: float | None = Field(None, gt=0, description="CPU: batches whose activations pass this count as OOM")
    probabilities: bool = Field(False, description="Also write each row's class probabilities")
    codec: str = Field("zstd", description="Codec of the prediction shards")


class InferTarget(BaseModel):
    model: str = Field(description="Model: an optimized model folder, a checkpoint folder, or a checkpoint root")
    dataset: str = Field(description="Staged dataset to predict")
    output: str = Field(description="Where the prediction dataset goes (any fsspec URL)")


class InferConfig(StorageAccess, InferOptions, InferTarget):
    """Parameters of ``batch_inference`` and ``swarm infer``."""


@dataclass(frozen=True)
class InferGroup:
    """One task's share: input shards (with their prediction names) of one dataset."""

    index: int
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


@dataclass
class GroupOutput:
    index: int
    entries: list[ShardEntry]
    rows: int
    seconds: float
    batch_sizes: dict[str, Any] = field(default_factory=dict)
    worker: str = ""


class InferResult(BaseModel):
    """What batch inference produced."""

    output: str
    rows: int
    shards: int
    predicted_shards: int
    skipped_shards: int
    seconds: float
    rows_per_second: float
    batch_sizes: list[dict[str, Any]]
    manifest_hash: str


def _key(entry: ShardEntry, model_hash: str, options: dict) -> str:
    body = json.dumps({"input": [entry.name, entry.hash], "model": model_hash, "options": options}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()


def prediction_name(entry: ShardEntry, model_hash: str, options: dict) -> str:
    return f"{entry.split}/{PART_PREFIX}{_key(entry, model_hash, options)[:20]}.arrow"


def _options(cfg: InferConfig) -> dict:
    return {"probabilities": cfg.probabilities, "codec": cfg.codec}


def plan_inference(cfg: InferConfig) -> InferPlan:
    """Check model and data fit and find what is left to predict; writes nothing."""
    from storage.codecs import resolve

    resolve(cfg.codec)
    model_url, meta = ckpt.read_meta(cfg.model, cfg.storage_options, formats=(ckpt.FORMAT_ID, ckpt.MODEL_FORMAT_ID))
    trained = meta.get("columns") or {}
    ds = Dataset.open(cfg.dataset, cfg.storage_options)
    feature = trained.get("feature")
    if feature and feature not in ds.schema.names:
        raise ConfigError(
            f"model {cfg.model!r} reads column {feature!r}, which dataset {cfg.dataset!r} lacks "
            f"(columns: {', '.join(ds.schema.names)})"
        )
    label = trained.get("label") if trained.get("label") in ds.schema.names else None
    if label is None:
        cols = Columns(feature, "", tuple(trained["shape"]) if trained.get("shape") else None, trained.get("scale"))
    else:
        cols = resolve_columns(ds, feature, label)
        cols = Columns(cols.feature, cols.label, cols.shape, trained.get("scale", cols.scale))
    entries = ds.shards(cfg.split) if cfg.split is not None else ds.shards()
    if not entries:
        raise ConfigError(f"dataset {cfg.dataset!r} has no shards to predict (split {cfg.split!r})")
    fs, root = url_to_fs(cfg.output, cfg.storage_options)
    root = root.rstrip("/")
    if fs.isfile(root):
        raise ConfigError(f"output {cfg.output!r} is an existing file; give a folder for the predictions")
    names = [(e, prediction_name(e, meta["tensors_hash"], _options(cfg))) for e in entries]
    present = _present(fs, root)
    todo = [(e, n) for e, n in names if n not in present]
    done = [(e, n) for e, n in names if n in present]
    return InferPlan(cfg, model_url, meta["tensors_hash"], ds.manifest.content_hash(), cols, todo, done,
                     sum(e.rows for e in entries))


def _present(fs, root: str) -> set[str]:
    try:
        found = fs.find(root)
    except (FileNotFoundError, OSError):
        return set()
    prefix = fs._strip_protocol(root).rstrip("/") + "/"
    return {p[len(prefix):] for p in found if p.startswith(prefix)}


def group_inputs(plan: InferPlan, n_groups: int) -> list[InferGroup]:
    """Contiguous groups of input shards with similar row counts."""
    todo = plan.todo
    if not todo:
        return []
    n_groups = max(1, min(n_groups, len(todo)))
    target = sum(e.rows for e, _ in todo) / n_groups
    groups: list[list] = [[]]
    acc = 0
    for i, item in enumerate(todo):
        if groups[-1] and acc >= target * len(groups) and len(groups) < n_groups:
            groups.append([])
        groups[-1].append(item)
        acc += item[0].rows
    return [InferGroup(i, plan.config, plan.columns, g) for i, g in enumerate(groups)]


def _read_shards(group: InferGroup, cols: Columns):
    """The group's input shards, read ahead through the shard cache (remote datasets)."""
    from storage.loader import _with_cache

    ds = Dataset.open(_with_cache(group.config.dataset, "auto"), group.config.storage_options)
    transform = column_transform(cols)
    for entry, name in group.inputs:
        table = ds.read_shard(entry, verify=True)
        x, _ = to_arrays(table.select([cols.feature] + ([cols.label] if cols.label else [])), _with_label(cols))
        yield {"x": transform(x), "rows": table.num_rows, "entry": entry, "name": name}


def _with_label(cols: Columns) -> Columns:
    return cols if cols.label else Columns(cols.feature, cols.feature, cols.shape, cols.scale)


def predict_group(group: InferGroup) -> GroupOutput:
    """Predict every input shard of ``group`` and write its prediction shard."""
    import torch

    from storage.prefetch import Prefetcher
    from tasks.allocator import steady_allocator
    from tasks.inference.adaptive import AdaptiveBatchSize
    from tasks.inference.memory import MemoryCap, activation_bytes_per_row
    from tasks.inference.predict import make_predict
    from tasks.models.loading import load_model

    started = time.perf_counter()
    cfg = group.config
    loaded = load_model(cfg.model, cfg.storage_options)
    cols = group.columns
    controller = AdaptiveBatchSize(cfg.max_batch_size, initial=min(cfg.initial_batch_size, cfg.max_batch_size),
                                   latency_target_s=cfg.latency_target_ms / 1000 if cfg.latency_target_ms else None)
    fs, root = url_to_fs(cfg.output, cfg.storage_options)
    root = root.rstrip("/")
    entries, rows = [], 0
    cap = None
    with steady_allocator():
        for item in Prefetcher(_read_shards(group, cols), depth=2):
            x = item["x"]
            if cap is None and cfg.memory_cap_mb:
                example = torch.from_numpy(np.ascontiguousarray(x[:1]))
                cap = MemoryCap(int(cfg.memory_cap_mb * 2**20), activation_bytes_per_row(loaded.model, example))
            predict = make_predict(loaded.model, lambda a: torch.from_numpy(np.ascontiguousarray(a)),
                                   controller=controller, memory_cap=cap)
            logits = predict(x)
            entries.append(_write_predictions(fs, root, item["entry"], item["name"], logits, cfg))
            rows += item["rows"]
    return GroupOutput(group.index, entries, rows, time.perf_counter() - started, controller.report(),
                       worker=f"{socket.gethostname()}:{os.getpid()}")


def _write_predictions(fs, root: str, entry: ShardEntry, name: str, logits: np.ndarray, cfg: InferConfig) -> ShardEntry:
    from storage import atomic
    from tasks.inference.predict import softmax

    probs = softmax(logits.astype(np.float32))
    columns = {
        "shard": pa.array([entry.name] * len(logits)).dictionary_encode(),
        "row": pa.array(np.arange(len(logits), dtype=np.int64)),
        "prediction": pa.array(probs.argmax(axis=1).astype(np.int64)),
        "confidence": pa.array(probs.max(axis=1).astype(np.float32)),
    }
    if cfg.probabilities:
        columns["probabilities"] = pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), probs.shape[1])
    table = pa.table(columns)
    data = formats.get("arrow").encode(table, cfg.codec, None if cfg.codec == "none" else 3)
    atomic.write_bytes(fs, f"{root}/{name}", data)
    return ShardEntry(name=name, split=entry.split, rows=table.num_rows, bytes=len(data), hash=digest_bytes(data),
                      raw_bytes=table.nbytes)


def _entry_of(fs, root: str, name: str, split: str) -> ShardEntry:
    data = fs.cat_file(f"{root}/{name}")
    table = formats.get("arrow").decode(data)
    return ShardEntry(name=name, split=split, rows=table.num_rows, bytes=len(data), hash=digest_bytes(data),
                      raw_bytes=table.nbytes)


def commit_inference(plan: InferPlan, outputs: list[GroupOutput], seconds: float) -> InferResult:
    """Write the prediction manifest last, atomically; drop shards it does not name."""
    cfg = plan.config
    fs, root = url_to_fs(cfg.output, cfg.storage_options)
    root = root.rstrip("/")
    made = {e.name: e for o in outputs for e in o.entries}
    entries = []
    for source, name in sorted(plan.todo + plan.done, key=lambda p: (p[0].split, p[0].name)):
        entry = made.get(name) or _entry_of(fs, root, name, source.split)
        if entry.rows != source.rows:
            raise ManifestError(f"prediction shard {name!r} has {entry.rows} rows for {source.rows} input rows")
        entries.append(entry)
    schema = formats.get("arrow").decode(fs.cat_file(f"{root}/{entries[0].name}")).schema
    previous = manifest_mod.read_if_exists(fs, root)
    manifest = Manifest(
        shard_format="arrow", codec=cfg.codec, level=None if cfg.codec == "none" else 3, schema=schema,
        shards=entries,
        metadata={"kind": PREDICTIONS_KIND, "key": ["shard", "row"], "model": plan.model_url,
                  "model_hash": plan.model_hash, "dataset": cfg.dataset, "dataset_hash": plan.dataset_hash},
        source={"model_hash": plan.model_hash, "dataset_hash": plan.dataset_hash, "options": _options(cfg)},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    manifest_mod.write(fs, root, manifest)
    remove_unreferenced(fs, root, keep=[manifest, previous])
    return InferResult(
        output=cfg.output, rows=manifest.rows, shards=len(entries), predicted_shards=len(made),
        skipped_shards=len(plan.done), seconds=round(seconds, 3),
        rows_per_second=round(sum(o.rows for o in outputs) / max(sum(o.seconds for o in outputs), 1e-9), 1)
        if outputs else 0.0,
        batch_sizes=[{"group": o.index, "worker": o.worker, **o.batch_sizes} for o in outputs],
        manifest_hash=manifest.content_hash(),
    )


def inference_finished(cfg: InferConfig) -> bool:
    """Whether ``cfg.output`` holds this model's predictions of this dataset."""
    fs, root = url_to_fs(cfg.output, cfg.storage_options)
    previous = manifest_mod.read_if_exists(fs, root.rstrip("/"))
    if previous is None or previous.metadata.get("kind") != PREDICTIONS_KIND:
        return False
    _, meta = ckpt.read_meta(cfg.model, cfg.storage_options, formats=(ckpt.FORMAT_ID, ckpt.MODEL_FORMAT_ID))
    dataset_hash = Dataset.open(cfg.dataset, cfg.storage_options).manifest.content_hash()
    return previous.source == {"model_hash": meta["tensors_hash"], "dataset_hash": dataset_hash,
                               "options": _options(cfg)}


def infer_identity(cfg: InferConfig) -> str:
    _, meta = ckpt.read_meta(cfg.model, cfg.storage_options, formats=(ckpt.FORMAT_ID, ckpt.MODEL_FORMAT_ID))
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
    return plan, predict, commit


plan_inference_task, predict_group_task, commit_inference_task = _prefect_tasks()
