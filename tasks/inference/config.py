"""Inference parameters: online serving (``ServeConfig``: ``swarm serve-model`` and
:func:`tasks.inference.server.serve`, classifiers and language models) and offline batch
inference (``InferConfig``: ``batch_inference`` and ``swarm infer``)."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.fields import Codec, NameList
from tasks.storage_access import StorageAccess, check_storage_options


class ServeConfig(BaseModel):
    """What to serve, how requests are batched, and the limits that protect the server."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(description=(
        "Checkpoint URL: a ckpt-* folder, or a checkpoint root (its latest); a language model (causal-lm "
        "checkpoint, or hf:FOLDER) is served for generation (OpenAI-compatible /v1/completions)"))
    replicas: int = Field(1, ge=1, le=64, description=(
        "Model replicas: each on its own Dask worker (threads in this process with --in-process); "
        "with autoscaling, how many start"))
    max_batch_size: int = Field(32, ge=1, le=65_536, description=(
        "Rows per batch at most (language models: sequences generated together at most)"))
    max_wait_ms: float = Field(5.0, ge=0, le=60_000, description="How long a batch waits to fill once it has a row")
    max_queue_rows: int = Field(1024, ge=1, description="Rows waiting for a batch at most; more get HTTP 429")
    max_request_rows: int = Field(256, ge=1, description="Rows per request at most (HTTP 413 past it)")
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="Request body size at most (HTTP 413 past it)")
    threads_per_replica: int | None = Field(None, ge=1, le=256, description="torch threads per replica (default: cores / replicas)")
    adaptive: bool = Field(True, description="Adapt each replica's batch size (grow while throughput improves, halve on OOM)")
    initial_batch_size: int = Field(8, ge=1, description="Where the adaptive batch size starts")
    latency_target_ms: float | None = Field(None, gt=0, description="Adaptive: stop growing batches whose compute passes this")
    memory_cap_mb: float | None = Field(None, gt=0, description="CPU: treat batches whose activations pass this as out-of-memory")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when available, replicas spread over GPUs")
    kernel: Literal["auto", "eager"] = Field(
        "auto", description="CPU: auto tries oneDNN against eager at start and keeps the faster; eager: the model as is")
    host: str = Field("127.0.0.1", description="Interface to bind")
    port: int = Field(8000, ge=0, le=65_535, description="Port (0: a free one)")
    storage_options: dict[str, Any] = Field(default_factory=dict)
    in_process: bool = Field(False, description=(
        "Replicas as threads in this process (the smallest setups) instead of on Dask worker processes"))
    dask_address: str | None = Field(None, description=(
        "Dask scheduler to place replicas on (default: $SWARM_DASK_ADDRESS, else a local cluster of worker processes)"))
    min_replicas: int | None = Field(None, ge=1, le=64, description="Autoscaling: replicas at least (default: --replicas)")
    max_replicas: int | None = Field(None, ge=1, le=64, description="Autoscaling: replicas at most (default: --replicas)")
    target_ongoing: float = Field(16.0, gt=0, description=(
        "Autoscaling: outstanding requests per replica to aim for (more scales up, fewer scales down)"))
    upscale_delay_s: float = Field(2.0, ge=0, description="Autoscaling: load must stay over the target this long to add replicas")
    downscale_delay_s: float = Field(10.0, ge=0, description=(
        "Autoscaling: load must stay under the target this long to remove a replica (drained first)"))
    autoscale_window_s: float = Field(1.0, gt=0, le=600, description=(
        "Autoscaling: outstanding requests are averaged over this many seconds (requests come in bursts)"))
    replica_batches: int = Field(2, ge=1, le=64, description=(
        "Batches sent to one replica at once (one computes while the next travels); its queue holds no more"))
    probe_interval_s: float = Field(1.0, gt=0, description="How often each replica's health is probed")
    probe_timeout_s: float = Field(10.0, gt=0, description=(
        "A replica that answers no probe or batch for this long is taken out of rotation and replaced"))
    replica_start_timeout_s: float = Field(180.0, gt=0, description="How long a replica may take to load on its worker")
    kv_pool_tokens: int | None = Field(None, ge=1, description=(
        "Language models: KV-cache pool size in tokens, allocated once (default: max_batch_size x the model's context)"))
    kv_block_size: int = Field(16, ge=1, le=4096, description="Language models: tokens per KV-cache block")
    max_waiting: int = Field(256, ge=1, description=(
        "Language models: requests waiting for room in the running batch at most; more get HTTP 429"))
    max_tokens_per_step: int = Field(256, ge=1, description=(
        "Language models: tokens run in one engine step at most (long prompts are prefilled in chunks of this)"))
    max_new_tokens_limit: int | None = Field(None, ge=1, description=(
        "Language models: max_tokens a request may ask for at most (default: the model's context)"))

    @field_validator("storage_options")
    @classmethod
    def _no_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_storage_options(value)

    @model_validator(mode="after")
    def _coherent(self) -> "ServeConfig":
        if self.max_request_rows > self.max_queue_rows:
            raise ValueError(
                f"max_request_rows ({self.max_request_rows}) must not exceed max_queue_rows ({self.max_queue_rows}): "
                "such a request could never be queued"
            )
        low, high = self.min_replicas or self.replicas, self.max_replicas or self.replicas
        if not low <= self.replicas <= high:
            raise ValueError(f"replicas ({self.replicas}) must lie between min_replicas ({low}) and max_replicas ({high})")
        if self.in_process and (low != high or self.dask_address):
            raise ValueError("in_process replicas are threads of this process: they neither autoscale "
                             "(min_replicas/max_replicas) nor use a dask_address")
        return self

    @property
    def replica_bounds(self) -> tuple[int, int]:
        """(min, max) replicas: autoscaling when they differ."""
        return self.min_replicas or self.replicas, self.max_replicas or self.replicas

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000

    def replica_threads(self) -> int:
        return self.threads_per_replica or max(1, (os.cpu_count() or 1) // self.replicas)


class InferOptions(BaseModel):
    """How to run the model over the data (shared with the lifecycle flow)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    split: str | None = Field(None, description="Split to predict (default: every split)")
    max_batch_size: int = Field(1024, ge=1, le=1_000_000, description="Rows per model call at most")
    initial_batch_size: int = Field(32, ge=1, description="Where the adaptive batch size starts")
    adaptive: bool = Field(True, description="Adapt the batch size (else every batch has max_batch_size rows)")
    latency_target_ms: float | None = Field(None, gt=0, description="Stop growing batches whose compute passes this")
    memory_cap_mb: float | None = Field(None, gt=0, description="Batches whose activations pass this count as OOM")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: the worker's GPU when it has one")
    kernel: Literal["auto", "eager"] = Field(
        "auto", description="CPU: auto tries oneDNN against eager per task and keeps the faster; eager: the model as is")
    probabilities: bool = Field(False, description="Also write each row's class probabilities")
    codec: Codec = Field("zstd", description="Codec of the prediction shards")
    keep_columns: NameList = Field(default_factory=list, description=(
        "Input columns carried into the predictions (comma-separated or repeated), e.g. id,label"))
    output_format: Literal["arrow", "parquet"] = Field("arrow", description="File format of the prediction shards")


class InferTarget(BaseModel):
    model: str = Field(description="Model: an optimized model folder, a checkpoint folder, or a checkpoint root")
    dataset: str = Field(description="Staged dataset to predict")
    output: str = Field(description="Where the prediction dataset goes (any fsspec URL)")


class InferConfig(StorageAccess, InferOptions, InferTarget):
    """Parameters of ``batch_inference`` and ``swarm infer``."""
