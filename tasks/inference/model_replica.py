"""A served model and one replica's predict function, built alike in-process and on a Dask worker.

:func:`load_served_model` loads the checkpoint and checks that the model takes the rows its
checkpoint records (user errors raise :class:`ConfigError` at once); :func:`build_replica`
turns one copy of the model on one device into ``rows -> outputs`` with its own adaptive
batch size, memory cap and CPU kernel path. The in-process service (threads) and the
replicas on Dask workers (:mod:`tasks.inference.replica_host`) both use these two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from storage.errors import ConfigError
from tasks.inference.adaptive import AdaptiveBatchSize
from tasks.inference.config import ServeConfig
from tasks.inference.inputs import InputSpec
from tasks.inference.kernels import PROBE_ROWS, fastest_forward
from tasks.inference.memory import MemoryCap, activation_bytes_per_row
from tasks.inference.predict import make_predict


@dataclass
class ServedModel:
    loaded: Any  # tasks.models.loading.LoadedModel
    spec: InputSpec
    cap: MemoryCap | None


@dataclass
class ReplicaModel:
    predict: Callable[[np.ndarray], np.ndarray]
    controller: AdaptiveBatchSize | None
    kernel: str  # the CPU kernel path it runs (tasks.inference.kernels)
    threads: int | None  # torch threads of the thread that runs it (None: leave as is)


def load_served_model(config: ServeConfig) -> ServedModel:
    from tasks.models.loading import load_model

    loaded = load_model(config.model, config.storage_options)
    spec = InputSpec.from_checkpoint(loaded.name, loaded.args, loaded.columns)
    example = spec.to_tensor(np.zeros((1, spec.width), dtype=np.float32))
    try:
        bytes_per_row = activation_bytes_per_row(loaded.model, example)
    except Exception as exc:  # noqa: BLE001 - any failure is a model/input mismatch
        raise ConfigError(
            f"model {loaded.name!r} of {loaded.url!r} cannot take rows of shape {list(spec.shape)} "
            f"recorded in its checkpoint: {type(exc).__name__}: {exc}"
        ) from None
    cap = MemoryCap(int(config.memory_cap_mb * 2**20), bytes_per_row) if config.memory_cap_mb is not None else None
    return ServedModel(loaded, spec, cap)


def build_replica(served: ServedModel, model: Any, config: ServeConfig, device: str, threads: int | None) -> ReplicaModel:
    """``model`` (a copy of the served one) on ``device`` as a replica's predict function;
    ``threads``: the torch threads its thread will have (CPU), the kernel path is chosen with them."""
    import torch

    model.to(device)
    controller = None
    if config.adaptive:
        target = config.latency_target_ms / 1000 if config.latency_target_ms else None
        controller = AdaptiveBatchSize(config.max_batch_size, initial=config.initial_batch_size, latency_target_s=target)
    if torch.device(device).type != "cpu":
        threads = None
    probe = served.spec.to_tensor(probe_rows(served.spec, min(config.max_batch_size, PROBE_ROWS)))
    outer = torch.get_num_threads()
    torch.set_num_threads(threads or outer)  # chosen with the threads the replica will have
    try:
        forward, kernel = fastest_forward(model, probe.to(device), device, kernel=config.kernel,
                                          key=(served.loaded.url, served.loaded.meta.get("tensors_hash")))
    finally:
        torch.set_num_threads(outer)
    predict = make_predict(forward, served.spec.to_tensor, device, controller, served.cap)
    return ReplicaModel(predict, controller, kernel, threads)


def probe_rows(spec: InputSpec, rows: int) -> np.ndarray:
    """Rows to choose a replica's kernel path on (deterministic; features in [0, 1))."""
    if spec.tokens:
        return np.zeros((rows, spec.width), dtype=np.int64)
    return np.random.default_rng(0).random((rows, spec.width), dtype=np.float32)
