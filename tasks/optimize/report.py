"""What an optimization changed: size, parameters, latency, throughput and accuracy
(for a language model: validation perplexity, and throughput in tokens/s over blocks).

Timing is best-of-N: each figure is the fastest of several timed blocks, each block long
enough to dwarf timer resolution, taken in rounds that alternate between the models
compared. On a shared machine other work only ever adds time, so the minimum is the
steadiest estimate of what the model itself costs. Inside a Dask worker the timing runs
under :func:`tasks.allocator.steady_allocator`, so figures match an ordinary process.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from storage.checkpoint import unshared
from tasks.allocator import steady_allocator
from tasks.optimize.quantize import SCALE_SUFFIX
from tasks.training.data import Columns, feature_tensor

THROUGHPUT_BATCH = 64
LM_THROUGHPUT_BATCH = 8  # blocks of seq_len tokens
EVAL_BATCH = 1024


@dataclass(frozen=True)
class ModelStats:
    size_bytes: int  # the model's tensors as safetensors
    parameters: int  # weights and biases (int8 ones included; quantization scales are not)
    nonzeros: int
    latency_ms: float  # one sample
    throughput: float  # samples/s at batch THROUGHPUT_BATCH (language models: tokens/s at LM_THROUGHPUT_BATCH blocks)
    accuracy: float | None
    perplexity: float | None = None  # language models
    rmse: float | None = None  # regressions, in the target's units

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def best_seconds(fn: Callable[[], Any], repeats: int = 5, min_block_s: float = 0.02) -> float:
    """Seconds per call of ``fn``: the fastest of ``repeats`` blocks of calls."""
    fn()
    calls, elapsed = 1, 0.0
    while True:  # size a block to take at least min_block_s
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_block_s:
            break
        calls = max(calls * 2, int(calls * min_block_s / max(elapsed, 1e-9)) + 1)
    best = elapsed / calls
    for _ in range(repeats - 1):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def accuracy(model, x: np.ndarray, y: np.ndarray, cols: Columns) -> float:
    """A classifier's accuracy; a regression's RMSE in the target's units (see :func:`quality`)."""
    import torch

    correct, squared = 0, 0.0
    with torch.inference_mode():
        for i in range(0, len(y), EVAL_BATCH):
            out = model(feature_tensor(x[i:i + EVAL_BATCH], cols)).float()
            if cols.task == "regression":
                squared += float(np.square(out.reshape(-1).double().numpy() - y[i:i + EVAL_BATCH]).sum())
            else:
                correct += (out.argmax(1).numpy() == y[i:i + EVAL_BATCH]).sum()
    if cols.task == "regression":
        return float(np.sqrt(squared / len(y))) * (cols.labels.std or 1.0)
    return float(correct) / len(y)


def tensor_counts(tensors: dict[str, Any]) -> tuple[int, int]:
    """(parameters, non-zeros) of a state dict, leaving out quantization scales."""
    weights = [t for name, t in tensors.items() if not name.endswith(SCALE_SUFFIX)]
    return sum(t.numel() for t in weights), sum(int(t.count_nonzero()) for t in weights)


def measure(models: list[tuple[Any, dict[str, Any]]], x: np.ndarray, y: np.ndarray | None, cols: Columns,
            rounds: int = 3, lm=None) -> list[ModelStats]:
    """Everything the report shows, for each ``(model, stored tensors)``. Timing rounds
    alternate between the models, so a busy spell on a shared machine hits them alike.
    ``lm`` (a :class:`~tasks.training.lm.LMSpec`): ``x`` holds token blocks, scored by perplexity."""
    import torch
    from safetensors.torch import save as st_save

    if lm is not None:
        rows = np.resize(np.arange(len(x)), LM_THROUGHPUT_BATCH)
        one, batch = torch.from_numpy(x[:1, :lm.seq_len]), torch.from_numpy(x[rows, :lm.seq_len])
        per_batch_units = LM_THROUGHPUT_BATCH * lm.seq_len
    else:
        rows = np.resize(np.arange(len(y)), THROUGHPUT_BATCH)
        one, batch = feature_tensor(x[:1], cols), feature_tensor(x[rows], cols)
        per_batch_units = THROUGHPUT_BATCH
    latency, per_batch = [float("inf")] * len(models), [float("inf")] * len(models)
    with torch.inference_mode(), steady_allocator():
        for _ in range(rounds):
            for i, (model, _) in enumerate(models):
                latency[i] = min(latency[i], best_seconds(lambda: model(one), repeats=2))
                per_batch[i] = min(per_batch[i], best_seconds(lambda: model(batch), repeats=2))
    stats = []
    for (model, tensors), seconds_one, seconds_batch in zip(models, latency, per_batch):
        parameters, nonzeros = tensor_counts(tensors)
        stats.append(ModelStats(
            size_bytes=len(st_save(unshared(tensors)[0])),  # tied tensors stored once, as artifacts store them
            parameters=parameters,
            nonzeros=nonzeros,
            latency_ms=round(seconds_one * 1e3, 4),
            throughput=round(per_batch_units / seconds_batch, 1),
            accuracy=None if lm is not None or cols.task == "regression" else round(accuracy(model, x, y, cols), 6),
            perplexity=None if lm is None else round(perplexity(model, x, lm), 5),
            rmse=round(accuracy(model, x, y, cols), 6) if lm is None and cols.task == "regression" else None,
        ))
    return stats


def perplexity(model, blocks: np.ndarray, lm) -> float:
    """Validation perplexity: exp of the mean masked next-token loss over ``blocks``."""
    import math

    import torch

    from tasks.training.lm import lm_forward

    total = count = 0.0
    with torch.inference_mode():
        for i in range(0, len(blocks), LM_THROUGHPUT_BATCH):
            loss_sum, kept = lm_forward(model, torch.from_numpy(blocks[i:i + LM_THROUGHPUT_BATCH]), lm)
            total, count = total + float(loss_sum), count + float(kept)
    return math.exp(min(total / max(count, 1.0), 50.0))


def comparison_rows(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per figure: before, after and the change (a ratio, or points for accuracy)."""
    rows = []
    lm = before.get("perplexity") is not None
    for key, label in (("size_bytes", "size on disk (bytes)"), ("parameters", "parameters"),
                       ("nonzeros", "non-zeros"), ("latency_ms", "latency, batch 1 (ms)"),
                       ("throughput", f"throughput, batch {LM_THROUGHPUT_BATCH} blocks (tokens/s)" if lm
                        else f"throughput, batch {THROUGHPUT_BATCH} (samples/s)")):
        b, a = before[key], after[key]
        rows.append({"metric": label, "before": b, "after": a, "change": f"x{a / b:.3f}" if b else "-"})
    if lm:
        b, a = before["perplexity"], after["perplexity"]
        rows.append({"metric": "validation perplexity", "before": b, "after": a, "change": f"{100 * (a / b - 1):+.2f}%"})
        return rows
    if before.get("rmse") is not None:
        b, a = before["rmse"], after["rmse"]
        rows.append({"metric": "RMSE", "before": b, "after": a, "change": f"{100 * (a / b - 1):+.2f}%" if b else "-"})
        return rows
    drop = 100 * (before["accuracy"] - after["accuracy"])
    rows.append({"metric": "accuracy (%)", "before": round(100 * before["accuracy"], 2),
                 "after": round(100 * after["accuracy"], 2), "change": f"{-drop:+.2f} points"})
    return rows
