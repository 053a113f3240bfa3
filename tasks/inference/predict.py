"""A model as a predict function over NumPy rows: adaptive chunks, memory cap, no grad.

Shared by the online replicas and offline inference: ``make_predict`` turns a model in
eval mode into ``rows -> outputs`` (float32, one output row per input row) that runs in
chunks of the adaptive batch size and retries a chunk smaller after out-of-memory.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from tasks.inference.adaptive import AdaptiveBatchSize, run_adaptive
from tasks.inference.memory import MemoryCap


def make_predict(model: Any, to_tensor: Callable[[np.ndarray], Any], device: Any = "cpu",
                 controller: AdaptiveBatchSize | None = None, memory_cap: MemoryCap | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> Callable[[np.ndarray], np.ndarray]:
    """``clock`` times each batch for the controller (wall time by default)."""
    import torch

    device = torch.device(device)
    after_oom = torch.cuda.empty_cache if device.type == "cuda" else None

    def predict(rows: np.ndarray) -> np.ndarray:
        x = to_tensor(rows).to(device, non_blocking=True)

        def chunk(start: int, stop: int):
            if memory_cap is not None:
                memory_cap.check(stop - start)
            with torch.inference_mode():
                return model(x[start:stop]).float().cpu()

        parts = run_adaptive(chunk, len(x), controller, after_oom, clock=clock)
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).numpy()

    return predict


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)
