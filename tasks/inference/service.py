"""The online inference service without HTTP: a loaded model, its replicas and the batcher.

``InferenceService(config)`` loads the checkpoint (user errors raise at once, before any
port is bound), builds one replica per ``config.replicas`` (copies of the model, spread
over GPUs when there are any) and a micro-batcher routing to the least-loaded replica.
``await start()`` in the serving event loop; ``begin_drain()`` when shutdown starts;
``await close()`` answers everything accepted, then stops the replica threads.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np

from storage.errors import ConfigError
from tasks.inference.adaptive import AdaptiveBatchSize
from tasks.inference.batcher import BatchPolicy, MicroBatcher
from tasks.inference.config import ServeConfig
from tasks.inference.inputs import InputSpec
from tasks.inference.kernels import PROBE_ROWS, fastest_forward
from tasks.inference.memory import MemoryCap, activation_bytes_per_row
from tasks.inference.metrics import ServeMetrics
from tasks.inference.predict import make_predict
from tasks.inference.replicas import Replica, ReplicaPool


class InferenceService:
    def __init__(self, config: ServeConfig):
        import torch

        from tasks.models.loading import load_model

        loaded = load_model(config.model, config.storage_options)
        self.config = config
        self.name, self.url = loaded.name, loaded.url
        self.max_batch_size = config.max_batch_size
        self.spec = InputSpec.from_checkpoint(loaded.name, loaded.args, loaded.columns)
        example = self.spec.to_tensor(np.zeros((1, self.spec.width), dtype=np.float32))
        try:
            bytes_per_row = activation_bytes_per_row(loaded.model, example)
        except Exception as exc:  # noqa: BLE001 - any failure is a model/input mismatch
            raise ConfigError(
                f"model {loaded.name!r} of {loaded.url!r} cannot take rows of shape {list(self.spec.shape)} "
                f"recorded in its checkpoint: {type(exc).__name__}: {exc}"
            ) from None
        cap = None
        if config.memory_cap_mb is not None:
            cap = MemoryCap(int(config.memory_cap_mb * 2**20), bytes_per_row)
        devices = _devices(config.device, config.replicas)
        self.controllers: list[AdaptiveBatchSize | None] = []
        self.kernels: list[str] = []  # per replica: the CPU kernel path it runs (tasks.inference.kernels)
        replicas = []
        for index, device in enumerate(devices):
            model = loaded.model if index == 0 else copy.deepcopy(loaded.model)
            model.to(device)
            controller = None
            if config.adaptive:
                target = config.latency_target_ms / 1000 if config.latency_target_ms else None
                controller = AdaptiveBatchSize(config.max_batch_size, initial=config.initial_batch_size,
                                               latency_target_s=target)
            self.controllers.append(controller)
            threads = config.replica_threads() if torch.device(device).type == "cpu" else None
            probe = self.spec.to_tensor(_probe_rows(self.spec, min(config.max_batch_size, PROBE_ROWS)))
            outer = torch.get_num_threads()
            torch.set_num_threads(threads or outer)  # chosen with the threads the replica will have
            try:
                forward, kernel = fastest_forward(model, probe.to(device), device, kernel=config.kernel,
                                                  key=(loaded.url, loaded.meta.get("tensors_hash")))
            finally:
                torch.set_num_threads(outer)
            self.kernels.append(kernel)
            predict = make_predict(forward, self.spec.to_tensor, device, controller, cap)
            replicas.append(Replica(index, predict, threads, observe=self._batch_done))
        self.pool = ReplicaPool(replicas)
        self.metrics = ServeMetrics(self, config.max_batch_size)
        policy = BatchPolicy(config.max_batch_size, config.max_wait_s, config.max_queue_rows)
        self.batcher = MicroBatcher(self.pool, policy, on_batch=self.metrics.batch_started)
        self.requests_in_flight = 0
        self.answered = 0
        self.draining = False
        self.started_at = time.time()

    def _batch_done(self, rows: int, seconds: float) -> None:
        self.metrics.batch_done(rows, seconds)

    async def start(self) -> None:
        self.batcher.start()

    def begin_drain(self) -> None:
        """Shutdown has begun: report it on /health and stop holding batches for their deadline."""
        self.draining = True
        self.batcher.drain()

    async def close(self) -> None:
        self.begin_drain()
        await self.batcher.close()
        self.pool.close()

    async def predict(self, rows: np.ndarray) -> np.ndarray:
        """Outputs (logits) for ``rows``; raises ``QueueFull`` / ``BatcherClosed`` at once."""
        future = self.batcher.submit(rows)
        self.requests_in_flight += 1
        try:
            outputs = await future
        finally:
            self.requests_in_flight -= 1
        self.answered += 1
        return outputs

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "checkpoint": self.url,
            "input": {"width": self.spec.width, "shape": list(self.spec.shape), "scale": self.spec.columns.scale},
            "replicas": len(self.pool.replicas),
            "max_batch_size": self.max_batch_size,
            "max_wait_ms": self.config.max_wait_ms,
            "batch_sizes": [c.report() if c else None for c in self.controllers],
            "kernels": self.kernels,
        }


def _probe_rows(spec: InputSpec, rows: int) -> np.ndarray:
    """Rows to choose a replica's kernel path on (deterministic; features in [0, 1))."""
    if spec.tokens:
        return np.zeros((rows, spec.width), dtype=np.int64)
    return np.random.default_rng(0).random((rows, spec.width), dtype=np.float32)


def _devices(device: str, replicas: int) -> list[str]:
    import torch

    gpus = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    if device == "cuda" and gpus == 0:
        raise ConfigError("--device cuda: no CUDA device is visible here; use --device cpu or auto")
    return [f"cuda:{i % gpus}" if gpus else "cpu" for i in range(replicas)]
