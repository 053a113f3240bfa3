"""The online inference service without HTTP: a loaded model, its thread replicas and the batcher.

``InferenceService(config)`` loads the checkpoint (user errors raise at once, before any
port is bound), builds one replica per ``config.replicas`` (copies of the model, spread
over GPUs when there are any) and a micro-batcher routing to the least-loaded replica.
``await start()`` in the serving event loop; ``begin_drain()`` when shutdown starts;
``await close()`` answers everything accepted, then stops the replica threads. Replicas on
Dask workers are :class:`tasks.inference.cluster_service.ClusterInferenceService`, behind
the same :class:`BatchingFront`.
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
from tasks.inference.metrics import ServeMetrics
from tasks.inference.model_replica import build_replica, load_served_model
from tasks.inference.replicas import Replica, ReplicaPool


class BatchingFront:
    """What the HTTP front needs of a service, whatever runs its replicas: ``config``, ``name``,
    ``spec``, ``batcher``, ``metrics``, ``describe()``, ``batch_size_reports()``, ``start``/``close``."""

    def _init_front(self) -> None:
        self.requests_in_flight = 0
        self.answered = 0
        self.draining = False
        self.started_at = time.time()

    def begin_drain(self) -> None:
        """Shutdown has begun: report it on /health and stop holding batches for their deadline."""
        self.draining = True
        self.batcher.drain()

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


class InferenceService(BatchingFront):
    def __init__(self, config: ServeConfig):
        served = load_served_model(config)
        loaded = served.loaded
        self.config = config
        self.name, self.url = loaded.name, loaded.url
        self.max_batch_size = config.max_batch_size
        self.spec = served.spec
        self.controllers: list[AdaptiveBatchSize | None] = []
        self.kernels: list[str] = []  # per replica: the CPU kernel path it runs (tasks.inference.kernels)
        replicas = []
        for index, device in enumerate(_devices(config.device, config.replicas)):
            model = loaded.model if index == 0 else copy.deepcopy(loaded.model)
            replica = build_replica(served, model, config, device, config.replica_threads())
            self.controllers.append(replica.controller)
            self.kernels.append(replica.kernel)
            replicas.append(Replica(index, replica.predict, replica.threads, observe=self._batch_done))
        self.pool = ReplicaPool(replicas)
        self.metrics = ServeMetrics(self, config.max_batch_size)
        policy = BatchPolicy(config.max_batch_size, config.max_wait_s, config.max_queue_rows)
        self.batcher = MicroBatcher(self.pool, policy, on_batch=self.metrics.batch_started)
        self._init_front()

    def _batch_done(self, rows: int, seconds: float) -> None:
        self.metrics.batch_done(rows, seconds)

    async def start(self) -> None:
        self.batcher.start()

    async def close(self) -> None:
        self.begin_drain()
        await self.batcher.close()
        self.pool.close()

    def batch_size_reports(self) -> list:
        return [c.report() if c else None for c in self.controllers]

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "checkpoint": self.url,
            "input": self.spec.describe(),
            "replicas": len(self.pool.replicas),
            "max_batch_size": self.max_batch_size,
            "max_wait_ms": self.config.max_wait_ms,
            "batch_sizes": self.batch_size_reports(),
            "kernels": self.kernels,
        }


def _devices(device: str, replicas: int) -> list[str]:
    import torch

    gpus = torch.cuda.device_count() if device in ("auto", "cuda") else 0
    if device == "cuda" and gpus == 0:
        raise ConfigError("--device cuda: no CUDA device is visible here; use --device cpu or auto")
    return [f"cuda:{i % gpus}" if gpus else "cpu" for i in range(replicas)]
