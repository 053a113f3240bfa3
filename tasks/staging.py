"""Staging: any source (files or a built-in) into a sharded, compressed dataset.

Plan (driver): resolve and inspect the source, validate everything, fix the shard
layout. Write (Dask workers, one coarse task per group of shards): read the rows, split,
encode, hash and store shards. Commit (driver): write the manifest last, atomically,
then remove shard files neither the new nor the previous manifest names.

The shard layout is a pure function of the data and the options (shards follow the
source's readable units, see :mod:`storage.layout`; a row's split is a hash of its global
index), never of the cluster size, so a re-run reproduces the same shard names and skips
the ones already stored. Tasks are cut at unit boundaries, so each unit is read once.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, model_validator

from storage import codecs, image_sources, layout, manifest as manifest_mod, sources
from storage.cleanup import remove_unreferenced
from storage.errors import SourceError
from storage.manifest import Manifest, ShardEntry
from storage.shard_writer import ShardSpec, write_shard
from storage.sources import SourceUnit
from storage.urls import url_to_fs
from tasks import datasets, images as image_plan
from tasks.images import ImageOptions
from tasks.fields import Codec, ShardFormat, SourceFormat, byte_size
from tasks.retries import retry_unless_user_error
from tasks.splits import split_mask
from tasks.step_status import StepStatus
from tasks.tables import stats as column_stats
from tasks.storage_access import StorageAccess, StorageOptions, check_destination, check_storage_options  # noqa: F401 - callers from before these moved
from tasks.text import plan as text_plan
from tasks.text.options import TextOptions


class StageOptions(BaseModel):
    """How to stage: format, compression, shard size and split (shared with the lifecycle flow)."""

    model_config = ConfigDict(extra="forbid")

    format: SourceFormat = Field("auto", description="Source file format")
    codec: Codec = Field("zstd", description="Shard compression codec")
    level: int | None = Field(None, description="Codec level (zstd 1..22, lz4 1..12); empty for the default")
    shard_size: byte_size("shard size") = Field(
        "64MB", validate_default=True, description="Target decoded bytes per shard (e.g. 64MB, 1GiB)")
    shard_format: ShardFormat = Field("arrow", description="Shard file format")
    val_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="Fraction of rows held out as the 'val' split")
    seed: int = Field(0, ge=0, description="Seed of the train/val split (and of the order image files are staged in)")

    @model_validator(mode="after")
    def _level_fits_codec(self) -> "StageOptions":
        _, self.level = codecs.resolve(self.codec, self.level)
        return self


class StageTarget(BaseModel):
    source: str = Field(
        description="Source: an fsspec URL (file, folder or glob of Parquet/CSV/JSONL/NumPy or .txt/.md/.py "
        "files; s3://…, memory://…) or a built-in dataset: digits, synthetic-image, synthetic-tokens, "
        "python-help, python-stdlib"
    )
    dest: str = Field(description="Destination dataset root, any fsspec URL")


class StageConfig(StorageAccess, ImageOptions, TextOptions, StageOptions, StageTarget):
    """Parameters of the staging flow (the Prefect UI form and `swarm stage`)."""


@dataclass
class StagePlan:
    config: StageConfig
    schema: pa.Schema
    units: list[SourceUnit]
    unit_offsets: list[int]
    rows: int
    bytes_in: int
    bounds: list[int]  # first row of every shard, then the row count
    metadata: dict[str, Any]
    source: dict[str, Any]
    previous: Manifest | None
    key: str = ""  # content hash of the source listing, the options and the destination
    up_to_date: bool = False
    text: text_plan.TextPlan | None = None  # set where the source is staged as text

    @property
    def shard_count(self) -> int:
        return len(self.bounds) - 1


@dataclass(frozen=True)
class GroupTask:
    """What one write task needs: its shard range and the source units that cover it."""

    index: int
    dest: str
    first_shard: int
    bounds: tuple[int, ...]  # first row of each of its shards, then the row after the last
    units: list[tuple[int, SourceUnit]]
    schema: pa.Schema
    spec: ShardSpec
    val_fraction: float
    seed: int
    storage_options: dict[str, Any] = field(default_factory=dict)
    text: text_plan.TextSpec | None = None


@dataclass(frozen=True)
class GroupResult:
    index: int
    entries: list[ShardEntry]
    written: int
    skipped: int
    rows: int
    seconds: float
    worker: str = ""
    text: dict[str, int] | None = None  # counts of tokenized text
    bad: tuple[str, ...] = ()  # images that did not decode, by path
    stats: dict[str, Any] | None = None  # tables: the column summary of its rows (tasks.tables.stats)


class StageResult(BaseModel):
    """What staging did."""

    dest: str
    rows: int
    shards: int
    splits: dict[str, int]
    bytes_in: int
    bytes_out: int
    raw_bytes: int
    compression_ratio: float
    written_shards: int
    skipped_shards: int
    seconds: float
    rows_per_second: float
    up_to_date: bool
    manifest_hash: str
    text: dict[str, Any] | None = None  # text: documents, tokens, vocab_size, packing, seq_len
    images: dict[str, Any] | None = None  # images: classes, stored, size, skipped_bad


# --------------------------------------------------------------------------- plan

BUILTIN = "builtin"


def _inspect_builtin(spec: str, unit_bytes: int):
    ds = datasets.open_builtin(spec)
    schema, rows = ds.schema(), ds.num_rows()
    probe = ds.read(0, min(rows, 256))
    row_bytes = max(1, probe.nbytes // max(1, probe.num_rows))
    step = max(1, unit_bytes // row_bytes)
    units = [
        SourceUnit(f"{BUILTIN}:{spec}", BUILTIN, s, min(rows, s + step), min(rows, s + step) - s, (min(rows, s + step) - s) * row_bytes)
        for s in range(0, rows, step)
    ]
    fp = "builtin:" + spec
    return schema, units, rows, rows * row_bytes, dict(ds.metadata), fp


def _inspect_files(config: StageConfig, unit_bytes: int):
    files = sources.list_files(config.source, config.format, config.storage_options)
    inspected = [sources.inspect(f, unit_bytes, config.storage_options) for f in files]
    schema = sources.unify(inspected)
    units = [u for i in inspected for u in i.units]
    rows = sum(i.rows for i in inspected)
    return schema, units, rows, sum(f.size for f in files), _metadata_from_schema(schema), sources.fingerprint(files)


def _metadata_from_schema(schema: pa.Schema) -> dict[str, Any]:
    """Training hints for file sources: a ``label`` column and one feature column if obvious."""
    meta: dict[str, Any] = {}
    if "label" in schema.names:
        meta["label"] = "label"
        others = [f for f in schema if f.name != "label"]
        if len(others) == 1:
            meta["feature"] = others[0].name
            shape = (others[0].metadata or {}).get(sources.SHAPE_KEY)
            if shape:
                meta["shape"] = json.loads(shape)
    return meta


def plan_stage(config: StageConfig) -> StagePlan:
    """Inspect the source and destination and fix the shard layout; writes nothing."""
    fs, root = check_destination(config.dest, config.storage_options)
    schema, units, rows, bytes_in, metadata, fp = inspect_source(config)
    if rows == 0:
        raise SourceError(f"source {config.source!r} has zero rows; nothing to stage")
    if not schema.names:
        raise SourceError(f"source {config.source!r} has no columns")
    bounds = layout.shard_bounds(units, int(config.shard_size))
    offsets, acc = [], 0
    for u in units:
        offsets.append(acc)
        acc += u.rows
    assert acc == rows, (acc, rows)
    options = config.model_dump(include=set(StageOptions.model_fields))
    source = {"source": _redact(config.source), "fingerprint": fp, "options": options, "shards": len(bounds) - 1}
    text = None
    if text_plan.is_text(config, metadata, units):
        text = text_plan.request(config, config.source, config.storage_options)
        text_plan.check_column(text, schema, config.source)
        if bytes_in == 0:
            raise SourceError(f"source {config.source!r} holds no text (every file is empty); nothing to stage")
        source["text"] = text.identity
    previous = manifest_mod.read_if_exists(fs, root)
    body = json.dumps({"source": fp, "dest": config.dest, "options": options, "text": source.get("text")},
                      sort_keys=True, default=str)
    plan = StagePlan(config, schema, units, offsets, rows, bytes_in, bounds, metadata, source, previous,
                     key=hashlib.sha256(body.encode()).hexdigest())
    plan.up_to_date = previous is not None and previous.source == source and _all_present(fs, root, previous)
    if text is not None and not plan.up_to_date:
        texts = text_plan.train_texts(units, text.column, lambda u: read_rows(u, schema, config.storage_options),
                                      keep=lambda rows: ~split_mask(rows, config.seed, config.val_fraction))
        plan.text = text_plan.prepare(text, config, config.source, metadata, texts)
    return plan


def inspect_source(config: StageConfig | Any, unit_bytes: int | None = None):
    """``(schema, units, rows, bytes_in, metadata, fingerprint)`` of a source (a config's
    ``source``, ``format`` and ``storage_options``); reads schemas, not data."""
    unit_bytes = unit_bytes or int(config.shard_size)
    if datasets.is_builtin(config.source):
        return _inspect_builtin(config.source, unit_bytes)
    _refuse_unknown_builtin(config.source)
    return image_plan.inspect(config, unit_bytes) or _inspect_files(config, unit_bytes)


def _refuse_unknown_builtin(source: str) -> None:
    """A source that is neither a URL nor path-like names a built-in: refuse an unknown one by name."""
    if "://" not in source and not ("/" in source or "." in source or "*" in source):
        datasets.open_builtin(source)  # raises: unknown built-in, naming the known ones
        raise AssertionError("unreachable")


def _redact(url: str) -> str:
    if "://" in url and "@" in url.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def _all_present(fs, root: str, manifest: Manifest) -> bool:
    try:
        sizes = {p: int(i.get("size") or 0) for p, i in fs.find(root, detail=True).items()}
    except (FileNotFoundError, OSError):
        return False
    strip = fs._strip_protocol
    return all(sizes.get(strip(f"{root}/{s.name}")) == s.bytes for s in manifest.shards)


def group_tasks(plan: StagePlan, n_groups: int) -> list[GroupTask]:
    """Cut the shards into at most ``n_groups`` contiguous, coarse tasks of similar rows,
    at source unit boundaries where possible so that no unit is read by two tasks."""
    cfg = plan.config
    cuts = layout.group_cuts(plan.bounds, set(plan.unit_offsets), n_groups) + [plan.shard_count]
    spec = ShardSpec(cfg.shard_format, cfg.codec, cfg.level)
    tasks = []
    for g, (first, end) in enumerate(zip(cuts[:-1], cuts[1:])):
        lo, hi = plan.bounds[first], plan.bounds[end]
        units = [
            (off, u) for off, u in zip(plan.unit_offsets, plan.units) if off < hi and off + u.rows > lo
        ]
        tasks.append(
            GroupTask(g, cfg.dest, first, tuple(plan.bounds[first:end + 1]), units, plan.schema, spec,
                      cfg.val_fraction, cfg.seed, cfg.storage_options, plan.text.spec if plan.text else None)
        )
    return tasks


# --------------------------------------------------------------------------- write


def read_rows(unit: SourceUnit, schema: pa.Schema, storage_options: dict[str, Any]) -> pa.Table:
    """The rows of one source unit (of a built-in or of files)."""
    if unit.format == BUILTIN:
        return datasets.open_builtin(unit.url.split(":", 1)[1]).read(unit.start, unit.stop)
    if unit.format == image_sources.IMAGES:
        return image_sources.read_unit(unit, storage_options)
    return sources.read_unit(unit, schema, storage_options)


def write_group(task: GroupTask) -> GroupResult:
    """Read the rows of a group's shards, split them and write the shards."""
    start_time = time.perf_counter()
    fs, root = url_to_fs(task.dest, task.storage_options)
    root = root.rstrip("/")
    bounds = task.bounds
    lo, hi = bounds[0], bounds[-1]
    entries: list[ShardEntry] = []
    written = skipped = 0
    pending: list[pa.Table] = []
    pending_start = lo
    pending_rows = 0
    k = 0  # the group's next shard to write
    text_counts = text_plan.TextCounts() if task.text else None
    images, bad = image_plan.is_images([u for _, u in task.units]), []
    summaries: list[dict] = []

    def flush(table: pa.Table, index: int, first_row: int) -> None:
        nonlocal written, skipped
        mask = split_mask(np.arange(first_row, first_row + table.num_rows), task.seed, task.val_fraction)
        if images:
            table, mask, dropped = image_plan.drop_bad(table, mask)
            bad.extend(dropped)
        elif task.text is None:
            summaries.append(column_stats.partial(table, ~mask))
        parts = [("train", table)] if not mask.any() else [
            ("train", table.filter(pa.array(~mask))),
            ("val", table.filter(pa.array(mask))),
        ]
        for split, part in parts:
            if part.num_rows and task.text:
                part, counts = text_plan.tokenize_table(part, task.text)
                text_counts.add(counts)
            if part.num_rows == 0:
                continue
            out = write_shard(fs, root, split, index, part, task.spec)
            entries.append(out.entry)
            skipped += out.skipped
            written += not out.skipped

    for offset, unit in task.units:
        table = read_rows(unit, task.schema, task.storage_options)
        if table.num_rows != unit.rows:
            raise SourceError(
                f"{unit.url!r} changed while staging: expected {unit.rows} rows in this part, read {table.num_rows}"
            )
        a, b = max(lo, offset) - offset, min(hi, offset + unit.rows) - offset
        pending.append(table.slice(a, b - a))
        pending_rows += b - a
        while k < len(bounds) - 1 and pending_start + pending_rows >= bounds[k + 1]:
            combined = pa.concat_tables(pending)
            take = bounds[k + 1] - pending_start
            flush(combined.slice(0, take), task.first_shard + k, pending_start)
            rest = combined.slice(take)
            pending, pending_rows, pending_start = [rest], rest.num_rows, bounds[k + 1]
            k += 1
    assert k == len(bounds) - 1, (k, bounds)
    return GroupResult(task.index, entries, written, skipped, hi - lo, time.perf_counter() - start_time,
                       worker=f"{socket.gethostname()}:{os.getpid()}",
                       text=vars(text_counts) if text_counts else None, bad=tuple(bad),
                       stats=column_stats.merge(summaries) if task.text is None and not images else None)


# --------------------------------------------------------------------------- commit


def commit(plan: StagePlan, results: list[GroupResult], seconds: float) -> StageResult:
    """Write the manifest (last, atomically) and remove shards no manifest names."""
    cfg = plan.config
    fs, root = url_to_fs(cfg.dest, cfg.storage_options)
    root = root.rstrip("/")
    if plan.up_to_date:
        manifest = plan.previous
        written, skipped = 0, len(manifest.shards)
    else:
        entries = sorted((e for r in results for e in r.entries), key=lambda e: (e.split, e.name))
        got = sum(e.rows for e in entries) if plan.text is None else sum(r.text["documents"] for r in results)
        bad = [b for r in results for b in r.bad]
        if got + len(bad) != plan.rows:
            raise SourceError(f"staged {got} rows but the source has {plan.rows}; the source changed while staging")
        schema = plan.schema
        metadata = image_plan.check_bad(plan, bad, fs, root)
        if plan.text is not None:
            schema, metadata = text_plan.before_manifest(fs, root, plan.text, [r.text for r in results])
        elif not image_plan.is_images(plan.units):  # per-column statistics of the train split (tasks.tables)
            metadata = {**metadata, "column_stats": column_stats.finish(column_stats.merge([r.stats for r in results]))}
        manifest = Manifest(
            shard_format=cfg.shard_format,
            codec=cfg.codec,
            level=cfg.level,
            schema=schema,
            shards=entries,
            metadata=metadata,
            source=plan.source,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        manifest_mod.write(fs, root, manifest)
        remove_unreferenced(fs, root, keep=[manifest, plan.previous])
        written = sum(r.written for r in results)
        skipped = sum(r.skipped for r in results)
    raw = sum(s.raw_bytes for s in manifest.shards)
    splits: dict[str, int] = {}
    for s in manifest.shards:
        splits[s.split] = splits.get(s.split, 0) + s.rows
    return StageResult(
        dest=cfg.dest,
        rows=manifest.rows,
        shards=len(manifest.shards),
        splits=splits,
        bytes_in=plan.bytes_in,
        bytes_out=manifest.bytes,
        raw_bytes=raw,
        compression_ratio=round(raw / manifest.bytes, 3) if manifest.bytes else 0.0,
        written_shards=written,
        skipped_shards=skipped,
        seconds=round(seconds, 3),
        rows_per_second=round(manifest.rows / seconds, 1) if seconds > 0 else 0.0,
        up_to_date=plan.up_to_date,
        manifest_hash=manifest.content_hash(),
        text=text_plan.summary(manifest.metadata),
        images=image_plan.summary(manifest.metadata),
    )


def stage_here(config: StageConfig, groups: int = 2) -> StageResult:
    """Stage in this process, without Prefect or Dask: plan, write each group in turn, commit.

    The same steps as the staging flow, for tests, benchmarks and scripts; nothing is
    written when the destination already holds this staging."""
    started = time.perf_counter()
    plan = plan_stage(config)
    results = [] if plan.up_to_date else [write_group(group) for group in group_tasks(plan, groups)]
    return commit(plan, results, time.perf_counter() - started)


# --------------------------------------------------------------------------- Prefect tasks


@task(name="plan-staging", cache_policy=NO_CACHE)
def plan_stage_task(config: StageConfig) -> StagePlan:
    """Inspect the source and destination and fix the shard layout."""
    return plan_stage(config)


@task(name="write-shards", retries=2, retry_delay_seconds=1, retry_condition_fn=retry_unless_user_error,
      cache_policy=NO_CACHE)
def write_group_task(group: GroupTask) -> GroupResult:
    """Read one group's source rows and write its shards (idempotent)."""
    return write_group(group)


@task(name="commit-manifest", cache_policy=NO_CACHE)
def commit_task(plan: StagePlan, results: list[GroupResult], seconds: float) -> StageResult:
    """Write the manifest last and atomically; clean up unreferenced shards."""
    return commit(plan, results, seconds)


@task(name="stage-status", cache_policy=NO_CACHE)
def stage_status_task(config: StageConfig) -> StepStatus:
    """The staging's content key, whether the destination already holds it, and its plan."""
    plan = plan_stage(config)
    return StepStatus(plan.key, plan.up_to_date, config, plan)
