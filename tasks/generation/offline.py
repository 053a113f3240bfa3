"""Offline generation: a language model over a set of prompts, completions as shards.

The same plan / work / commit shape as offline classifier inference
(:mod:`tasks.inference.offline`), and its output machinery
(:mod:`tasks.inference.prediction_shards`):

- Plan (driver): load the model once to check it is a language model and to read its
  tokenizer and context, read and encode every prompt, check each against the engine's
  limits (:func:`tasks.generation.params.validate`: empty, longer than the context,
  ``max_new_tokens`` over the limit), and find the units (:mod:`tasks.generation.prompts`)
  whose output shard is not written yet. Writes nothing, so bad input leaves nothing behind.
- Generate (Dask workers, one task per group of units): one :class:`~tasks.generation.Engine`
  per task, its waiting queue kept full from every prompt of the group, so sequences of
  the next unit join the running batch while the last ones of a unit finish; a unit's
  shard is written (atomically) as soon as its last prompt finishes.
- Commit (driver): the manifest, last and atomically, keyed ``(shard, row)`` to the prompt
  rows; shards it does not name (a killed run's leftovers of other options) are removed.

An output shard's name hashes (prompt unit content, model, options): a re-run skips the
finished units, and a killed run leaves only whole shards, so every prompt ends with
exactly one output. With a ``seed``, each prompt's generator is seeded from the seed and
the prompt's (unit, row), so samples do not depend on how prompts were grouped or batched.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import pyarrow as pa
from pydantic import BaseModel

from storage import checkpoint as ckpt, manifest as manifest_mod
from storage.errors import ConfigError
from storage.manifest import ShardEntry
from storage.urls import url_to_fs
from tasks.generation.offline_config import GenerateConfig, GenerateOptions
from tasks.generation.params import Request, validate
from tasks.generation.prompts import PromptBatch, prompts_hash, read_prompts
from tasks.inference.offline_checks import check_output
from tasks.inference.prediction_shards import (
    commit_outputs,
    contiguous_groups,
    prediction_name,
    present_names,
    write_table,
)
from tasks.retries import retry_unless_user_error
from tasks.step_status import StepStatus, keyed_status

GENERATIONS_KIND = "generations"  # the output manifest's metadata ``kind``
OCCUPANCY_POINTS = 400  # per group, for the occupancy plot
SAMPLE_ROWS = 8


@dataclass
class GeneratePlan:
    config: GenerateConfig
    model_hash: str
    prompts_hash: str
    todo: list[tuple[PromptBatch, str]]  # (prompts of a unit, its output shard name)
    done: list[tuple[ShardEntry, str]]
    rows: int
    context: int
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    @property
    def todo_rows(self) -> int:
        return sum(b.entry.rows for b, _ in self.todo)


@dataclass(frozen=True)
class GenerateGroup:
    index: int
    config: GenerateConfig
    units: list[tuple[PromptBatch, str]]


@dataclass
class GenerateGroupOutput:
    index: int
    entries: list[ShardEntry]
    rows: int
    seconds: float
    prompt_tokens: int
    generated_tokens: int
    occupancy: list[tuple[float, int, int]]  # (seconds, running sequences, tokens run) per step, thinned
    max_batch: int
    samples: list[dict]
    worker: str = ""
    device: str = "cpu"
    steps: int = 0
    preemptions: int = 0


class GenerateResult(BaseModel):
    """What offline generation produced."""

    output: str
    rows: int
    shards: int
    generated_shards: int
    skipped_shards: int
    seconds: float
    prompt_tokens: int
    generated_tokens: int
    tokens_per_second: float  # generated tokens over the generation phase's wall time
    mean_occupancy: float  # running sequences per step over max_batch, averaged over steps
    devices: list[str]
    occupancy: list[dict]  # per group: worker, max_batch, points [[seconds, running, tokens], ...]
    samples: list[dict]
    manifest_hash: str


# --------------------------------------------------------------------------- plan


def model_hash(model: str, storage_options: dict) -> str:
    """The model's identity: its tensors' hash, or for an ``hf:`` folder the hash of its
    config and the names and sizes of its weight files."""
    if model.startswith("hf:"):
        from tasks.models.hf import local_folder

        folder = local_folder(model[3:], storage_options)  # a remote folder's local copy
        files = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".json")))
        body = [(f, os.path.getsize(os.path.join(folder, f))) for f in files]
        with open(os.path.join(folder, "config.json"), "rb") as f:
            body.append(("config", hashlib.sha256(f.read()).hexdigest()))
        return hashlib.sha256(json.dumps(body).encode()).hexdigest()
    _, meta = ckpt.read_meta(model, storage_options, formats=(ckpt.FORMAT_ID, ckpt.MODEL_FORMAT_ID))
    task = meta.get("task")
    if task not in (None, "causal-lm"):
        name = (meta.get("model") or {}).get("name")
        raise ConfigError(f"model {model!r} is a {task} model ({name!r}), not a language model: generation needs "
                          f"a causal-LM checkpoint (the built-in 'gpt' or an hf: model)")
    return meta["tensors_hash"]


def plan_generation(cfg: GenerateConfig) -> GeneratePlan:
    """Check model, prompts and output fit and find what is left to generate; writes nothing."""
    from tasks.generation.loading import load_runner

    cfg.sampling()
    fs, root = check_output(cfg.output, cfg.prompts, cfg.storage_options, kind=GENERATIONS_KIND)
    if not cfg.model.startswith("hf:"):
        model_hash(cfg.model, cfg.storage_options)  # refuses a classifier before loading any weights
    runner = load_runner(cfg.model, cfg.storage_options)  # checks an hf: folder, refuses what is not an LM
    identity = model_hash(cfg.model, cfg.storage_options)
    if cfg.max_tokens_per_step < cfg.max_batch:
        raise ConfigError(f"max_tokens_per_step ({cfg.max_tokens_per_step}) must be at least max_batch "
                          f"({cfg.max_batch}): every running sequence decodes a token at every step")
    batches = read_prompts(cfg.prompts, cfg.storage_options, cfg.prompt_column, cfg.split, cfg.prompts_per_shard,
                           runner.tokenizer, cfg.prompt_tokens)
    params = cfg.sampling()
    if params.max_new_tokens >= runner.context:
        raise ConfigError(f"max_new_tokens is {params.max_new_tokens}; model {cfg.model!r} has a context of "
                          f"{runner.context} tokens, prompt included: ask for at most {runner.context - 1}")
    pool = cfg.pool_tokens or runner.context  # the least a worker's default pool holds
    for batch in batches:
        for key, tokens in zip(batch.ids, batch.tokens):
            try:
                validate(Request(tokens, params, request_id="check"), runner.context, runner.vocab_size,
                         runner.context, pool)
            except ConfigError as exc:
                raise ConfigError(f"prompt {key} of {batch.entry.name!r}: {exc}") from None
    options = cfg.output_options()
    named = [(b, prediction_name(b.entry, identity, options)) for b in batches]
    present = present_names(fs, root)
    return GeneratePlan(cfg, identity, prompts_hash(cfg.prompts, cfg.storage_options),
                        todo=[(b, n) for b, n in named if n not in present],
                        done=[(b.entry, n) for b, n in named if n in present],
                        rows=sum(b.entry.rows for b in batches), context=runner.context)


def group_units(plan: GeneratePlan, n_groups: int) -> list[GenerateGroup]:
    """Contiguous groups of the unfinished units with similar prompt counts."""
    groups = contiguous_groups(plan.todo, n_groups, rows=lambda item: item[0].entry.rows)
    return [GenerateGroup(i, plan.config, g) for i, g in enumerate(groups)]


# --------------------------------------------------------------------------- generate (on a worker)


def row_seed(seed: int | None, unit: ShardEntry, row: int) -> int | None:
    if seed is None:
        return None
    digest = hashlib.sha256(f"{seed}/{unit.name}/{unit.hash}/{row}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFF_FFFF


def pool_tokens(cfg: GenerateConfig, runner) -> int:
    """The KV pool's size: as given, else ``max_batch`` x the context, capped at a quarter of
    the host's available memory (half of the GPU's free memory) but never under one context
    (every valid request must fit; the scheduler preempts when decoding runs out of blocks)."""
    if cfg.pool_tokens:
        return cfg.pool_tokens
    import psutil
    import torch

    device = runner.device
    free = (torch.cuda.mem_get_info(device)[0] // 2 if device.type == "cuda"
            else psutil.virtual_memory().available // 4)
    return max(runner.context, min(cfg.max_batch * runner.context, free // runner.bytes_per_token()))


def make_engine(cfg: GenerateConfig, runner):
    from tasks.generation import Engine

    return Engine(runner, pool_tokens=pool_tokens(cfg, runner), block_size=cfg.block_size, max_batch=cfg.max_batch,
                  max_waiting=max(256, 4 * cfg.max_batch), max_tokens_per_step=cfg.max_tokens_per_step)


def generate_group(group: GenerateGroup) -> GenerateGroupOutput:
    """Generate every prompt of ``group``'s units and write each unit's shard."""
    from tasks.generation.loading import load_runner
    from tasks.inference.offline import inference_device

    started = time.perf_counter()
    cfg = group.config
    runner = load_runner(cfg.model, cfg.storage_options)
    device = inference_device(cfg.device)
    if device.type == "cuda" and _cpu_only(runner.model):
        if cfg.device == "cuda":
            raise ConfigError(f"model {cfg.model!r} has int8-dynamic layers, which run on the CPU only; "
                              f"use device auto or cpu")
        device = inference_device("cpu")
    runner.model.to(device)
    engine = make_engine(cfg, runner)
    fs, root = url_to_fs(cfg.output, cfg.storage_options)
    root = root.rstrip("/")
    entries, samples = [], []

    def on_unit(batch: PromptBatch, name: str, results) -> None:
        table = generations_table(batch, results)
        entries.append(write_table(fs, root, name, batch.entry.split, table, cfg.codec))
        if len(samples) < SAMPLE_ROWS:
            samples.extend(table.select(["id", "prompt", "completion", "finish_reason"])
                           .slice(0, SAMPLE_ROWS - len(samples)).to_pylist())

    present = present_names(fs, root)  # a retried task keeps what its killed attempt finished
    run_units(engine, [(b, n) for b, n in group.units if n not in present], cfg, on_unit)
    stats = engine.stats()
    return GenerateGroupOutput(
        group.index, entries, sum(b.entry.rows for b, _ in group.units), time.perf_counter() - started,
        stats["prompt_tokens"], stats["generated_tokens"], thin(list(engine.metrics.occupancy), OCCUPANCY_POINTS),
        cfg.max_batch, samples, worker=f"{socket.gethostname()}:{os.getpid()}", device=str(device),
        steps=stats["steps"], preemptions=stats["preemptions"],
    )


def _cpu_only(model) -> bool:
    """Whether the model holds layers with CPU-only kernels (torch's dynamic int8 quantization)."""
    return any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())


def run_units(engine, units: list[tuple[PromptBatch, str]], cfg: GenerateConfig, on_unit) -> None:
    """Run every prompt of ``units`` through ``engine`` with its waiting queue kept full;
    ``on_unit(batch, name, results)`` as soon as a unit's last prompt finishes."""
    params = cfg.sampling()
    pending = ((u, row, Request(tokens, params if cfg.seed is None else
                                replace(params, seed=row_seed(cfg.seed, b.entry, row))))
               for u, (b, _) in enumerate(units) for row, tokens in enumerate(b.tokens))
    handles: list[list] = [[] for _ in units]
    left = [b.entry.rows for b, _ in units]
    unfinished: list[tuple[int, object]] = []
    nxt = next(pending, None)
    try:
        while nxt is not None or engine.has_work:
            while nxt is not None and engine.scheduler.has_room():
                u, _, request = nxt
                handle = engine.submit(request)
                handles[u].append(handle)
                unfinished.append((u, handle))
                nxt = next(pending, None)
            engine.step()
            still = []
            for u, handle in unfinished:
                if not handle.done:
                    still.append((u, handle))
                    continue
                left[u] -= 1
                if left[u] == 0:
                    on_unit(units[u][0], units[u][1], [h.result() for h in handles[u]])
            unfinished = still
    except BaseException:
        for _, handle in unfinished:
            engine.cancel(handle.request_id)
        raise


def generations_table(batch: PromptBatch, results) -> pa.Table:
    """A unit's output rows, keyed ``(shard, row)`` to its prompts."""
    n = len(results)
    return pa.table({
        "shard": pa.DictionaryArray.from_arrays(pa.array([0] * n, type=pa.int32()), pa.array([batch.entry.name])),
        "row": pa.array(range(n), type=pa.int64()),
        "id": pa.array(batch.ids, type=pa.string()),
        "prompt": pa.array(batch.texts, type=pa.string()),
        "prompt_tokens": pa.array([len(t) for t in batch.tokens], type=pa.int32()),
        "completion": pa.array([r.text for r in results], type=pa.string()),
        "completion_tokens": pa.array([len(r.tokens) for r in results], type=pa.int32()),
        "completion_ids": pa.array([r.tokens for r in results], type=pa.list_(pa.int32())),
        "finish_reason": pa.array([r.finish_reason for r in results], type=pa.string()),
    })


def thin(points: list, at_most: int) -> list:
    if len(points) <= at_most:
        return points
    step = len(points) / at_most
    return [points[int(i * step)] for i in range(at_most)] + [points[-1]]


# --------------------------------------------------------------------------- commit


def commit_generation(plan: GeneratePlan, outputs: list[GenerateGroupOutput], seconds: float,
                      generate_seconds: float | None = None) -> GenerateResult:
    """Write the generations' manifest last, atomically; drop shards it does not name."""
    cfg = plan.config
    fs, root = url_to_fs(cfg.output, cfg.storage_options)
    pairs = [(b.entry, n) for b, n in plan.todo] + plan.done
    manifest = commit_outputs(
        fs, root.rstrip("/"), pairs, [e for o in outputs for e in o.entries], cfg.codec,
        metadata={"kind": GENERATIONS_KIND, "key": ["shard", "row"], "model": cfg.model, "model_hash": plan.model_hash,
                  "prompts": cfg.prompts, "options": cfg.output_options()},
        source=_source(plan.model_hash, plan.prompts_hash, cfg),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    generated = sum(o.generated_tokens for o in outputs)
    steps = [p for o in outputs for p in o.occupancy]
    ordered = sorted(outputs, key=lambda o: o.index)
    return GenerateResult(
        output=cfg.output, rows=manifest.rows, shards=len(manifest.shards),
        generated_shards=sum(len(o.entries) for o in outputs), skipped_shards=len(plan.done),
        seconds=round(seconds, 3), prompt_tokens=sum(o.prompt_tokens for o in outputs), generated_tokens=generated,
        tokens_per_second=round(generated / max(generate_seconds or seconds, 1e-9), 1) if outputs else 0.0,
        mean_occupancy=round(sum(p[1] for p in steps) / len(steps) / cfg.max_batch, 4) if steps else 0.0,
        devices=sorted({o.device for o in outputs}),
        occupancy=[{"group": o.index, "worker": o.worker, "max_batch": o.max_batch,
                    "points": [list(p) for p in o.occupancy]} for o in ordered],
        samples=[s for o in ordered for s in o.samples][:SAMPLE_ROWS],
        manifest_hash=manifest.content_hash(),
    )


def _source(model_identity: str, prompts_identity: str, cfg: GenerateConfig) -> dict:
    return {"model_hash": model_identity, "prompts_hash": prompts_identity, "options": cfg.output_options()}


def generation_identity(cfg: GenerateConfig) -> str:
    options = cfg.model_dump(include=set(GenerateOptions.model_fields))
    body = {"model": model_hash(cfg.model, cfg.storage_options),
            "prompts": prompts_hash(cfg.prompts, cfg.storage_options), "options": options}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def generation_finished(cfg: GenerateConfig) -> bool:
    """Whether ``cfg.output`` holds this model's generations for these prompts and options."""
    fs, root = url_to_fs(cfg.output, cfg.storage_options)
    previous = manifest_mod.read_if_exists(fs, root.rstrip("/"))
    if previous is None or previous.metadata.get("kind") != GENERATIONS_KIND:
        return False
    return previous.source == _source(model_hash(cfg.model, cfg.storage_options),
                                      prompts_hash(cfg.prompts, cfg.storage_options), cfg)


def generate_status(cfg: GenerateConfig, output_prefix: str) -> StepStatus:
    """The generation's content key, its output folder (``output_prefix`` + key), and whether
    that folder already holds it (the lifecycle's last stage for a language model)."""
    return keyed_status(cfg, "output", output_prefix, generation_identity, generation_finished)


# --------------------------------------------------------------------------- Prefect tasks


def _prefect_tasks():
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    plan = task(name="plan-generation", cache_policy=NO_CACHE)(plan_generation)
    generate = task(name="generate-group", retries=2, retry_delay_seconds=1,
                    retry_condition_fn=retry_unless_user_error, cache_policy=NO_CACHE)(generate_group)
    commit = task(name="commit-generations", cache_policy=NO_CACHE)(commit_generation)
    status = task(name="generate-status", cache_policy=NO_CACHE)(generate_status)
    return plan, generate, commit, status


plan_generation_task, generate_group_task, commit_generation_task, generate_status_task = _prefect_tasks()
