"""The training step without host round trips: metrics on the device, the step captured.

    step = TrainStep(model, net, optimizer, classification_loss("image", "label"), device=device,
                     capture="graph", amp_dtype=torch.bfloat16)
    for batch in loader:
        step(batch)                        # no .item(), no other device-to-host sync
        if step.steps % 50 == 0:
            sums = step.read()             # one sync: {"loss": Σ, "acc": Σ, "count": n, "steps": k}

The loss is pluggable: any ``loss_fn(model, batch) -> (loss, metrics)`` where ``metrics``
are per-step *sums* — device tensors (accumulated on the device, in float64) or Python
numbers known on the host (counted there, no sync) — and ``"count"`` is the denominator
of the epoch's means (samples, or tokens for a language model). :func:`classification_loss`
is the image/table one; a causal-LM loss (tokens as the count) plugs in the same way.

How the step runs (``capture``):

* ``"none"``: eager, as before (the CPU default). fp16's gradient scaler reads its inf
  check on the host every step, so with it the step is never one graph (compile or none).
* ``"graph"``: the whole step — forward, loss, backward, fused AdamW (``capturable``)
  and the metric sums — is captured once as one CUDA graph after ``warmup`` eager steps
  on a side stream, then replayed: one launch per step. Batches are copied into the
  graph's static inputs (device to device); a batch of another shape runs eagerly. One
  rank only (DDP's reducer is not captured here) and not with a grad scaler.
* ``"compile"``: ``torch.compile`` of the model (``mode="reduce-overhead"`` on CUDA, so
  forward and backward replay as CUDA graphs; the default mode on CPU); the optimizer
  step stays eager (fused AdamW is one multi-tensor launch already). Works with DDP.

Which one is the CUDA default (``graph``) is a design choice still **to be measured on a
GPU** with ``benchmarks/gpu_check.py`` (section ``train_step``, which runs both): one
graph per step has no per-step launches and no compiler warm-up, but covers fewer cases.

Written here rather than taken from a library: Lightning/Accelerate wrap the whole loop
(and bring their own checkpointing and launchers), and ``torch.cuda.make_graphed_callables``
captures a module's forward and backward but not the optimizer step or the metric sums.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F

Capture = Literal["none", "graph", "compile"]
LossFn = Callable[[torch.nn.Module, dict[str, Any]], "tuple[torch.Tensor, dict[str, Any]]"]


def classification_loss(feature: str, label: str) -> LossFn:
    """Cross-entropy over class logits: sums of loss and correct predictions, and the count."""

    def loss_fn(model, batch):
        x, y = batch[feature], batch[label]
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        n = int(y.shape[0])
        return loss, {"loss": loss.detach() * n, "acc": (logits.argmax(1) == y).sum(), "count": n}

    return loss_fn


def regression_loss(feature: str, label: str) -> LossFn:
    """Mean squared error on one (standardised) target: the loss sum and the count."""

    def loss_fn(model, batch):
        x, y = batch[feature], batch[label]
        pred = model(x).float().reshape(y.shape)
        loss = F.mse_loss(pred, y.float())
        n = int(y.shape[0])
        return loss, {"loss": loss.detach() * n, "count": n}

    return loss_fn


def task_loss(task: str, feature: str, label: str) -> LossFn:
    """The loss of a classifier or of a regression."""
    return regression_loss(feature, label) if task == "regression" else classification_loss(feature, label)


def is_convolutional(model: torch.nn.Module) -> bool:
    return any(isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)) for m in model.modules())


def use_channels_last(model: torch.nn.Module, device: torch.device, mixed: bool) -> bool:
    """Convert a convolutional model on CUDA under autocast to ``channels_last`` (cuDNN's fast
    layout for reduced precision); whether it did. Call before the optimizer's state exists."""
    if device.type != "cuda" or not mixed or not is_convolutional(model):
        return False
    model.to(memory_format=torch.channels_last)
    return True


def make_optimizer(params, lr: float, weight_decay: float, device: torch.device, capture: Capture):
    """AdamW: fused (one kernel for all parameters) on CUDA, ``capturable`` for a graph;
    on CPU as before (the fused CPU kernel gives slightly different rounding)."""
    if device.type == "cuda":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True,
                                 capturable=capture == "graph")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def resolve_capture(compile: bool | None, mode: Capture, device: torch.device, world_size: int,
                    grad_scaler: bool) -> Capture:
    """What the step does: ``compile`` None is on for CUDA, off on CPU (measured slower there,
    see BENCHMARKS.md); a whole-step graph needs one rank and no grad scaler, else compile."""
    on = device.type == "cuda" if compile is None else compile
    if not on or mode == "none":
        return "none"
    if mode == "graph" and (device.type != "cuda" or world_size > 1 or grad_scaler):
        return "compile"
    return mode


class TrainStep:
    """One optimizer step per call, with metric sums kept on the device until :meth:`read`."""

    def __init__(self, model: torch.nn.Module, net: torch.nn.Module, optimizer, loss_fn: LossFn, *,
                 device: torch.device, capture: Capture = "none", amp_dtype: torch.dtype | None = None,
                 scaler=None, warmup: int = 3):
        if capture not in ("none", "graph", "compile"):
            raise ValueError(f"capture {capture!r} is not allowed; allowed: none, graph, compile")
        if capture == "graph" and (device.type != "cuda" or scaler is not None):
            raise ValueError("capture='graph' needs a CUDA device and no grad scaler; use 'compile' or 'none'")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.device, self.capture, self.amp_dtype, self.scaler = device, capture, amp_dtype, scaler
        self.warmup = max(1, warmup)
        self.channels_last = use_channels_last(model, device, amp_dtype is not None)
        self.net = net
        if capture == "compile":
            self.net = torch.compile(net, mode="reduce-overhead" if device.type == "cuda" else "default")
        self.steps = 0  # calls since the last read
        self._keys: list[str] | None = None  # device metrics, in accumulator order
        self._host: dict[str, float] = {}
        self._acc: torch.Tensor | None = None
        self._graph = None
        self._static: dict[str, torch.Tensor] = {}
        self._host_metrics: dict[str, float] = {}  # the last step's numbers known on the host
        self._graph_host: dict[str, float] = {}  # the captured step's
        self._stream = torch.cuda.Stream(device) if capture == "graph" else None
        self._eager_calls = 0

    # ------------------------------------------------------------------ the step

    def __call__(self, batch: dict[str, Any]) -> None:
        batch = self._prepare(batch)
        if self.capture != "graph":
            self._eager(batch)
        elif self._graph is not None and self._fits(batch):
            for name, value in self._static.items():
                value.copy_(batch[name], non_blocking=True)
            self._graph.replay()
            self._accumulate_host(self._graph_host)  # host numbers depend on shapes only: the same each replay
        elif self._graph is None and self._eager_calls >= self.warmup:
            self._capture(batch)
        else:
            self._side_stream_eager(batch)
        self.steps += 1

    def _prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        if not self.channels_last:
            return batch
        return {k: v.contiguous(memory_format=torch.channels_last)
                if torch.is_tensor(v) and v.dim() == 4 and v.is_floating_point() else v for k, v in batch.items()}

    def _autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        # A captured graph must not use autocast's weight cast cache (it would be freed under it).
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=self.capture != "graph")

    def _forward_backward(self, batch) -> dict[str, Any]:
        with self._autocast():
            loss, metrics = self.loss_fn(self.net, batch)
        self.optimizer.zero_grad(set_to_none=self.capture != "graph")
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return metrics

    def _eager(self, batch) -> None:
        self._accumulate(self._forward_backward(batch))
        self._eager_calls += 1

    def _side_stream_eager(self, batch) -> None:
        # Warm-up before capture runs on a side stream, as CUDA graph capture asks.
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        with torch.cuda.stream(self._stream):
            self._eager(batch)
        current.wait_stream(self._stream)

    def _capture(self, batch) -> None:
        """Capture the whole step on this batch's shapes, then replay it for this batch."""
        self._static = {k: v.clone() for k, v in batch.items() if torch.is_tensor(v)}
        static_batch = {**batch, **self._static}
        self.optimizer.zero_grad(set_to_none=True)  # the graph's backward allocates the grads from its pool
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self._stream):
            self._accumulate(self._forward_backward(static_batch), host=False)
        self._graph, self._graph_host = graph, dict(self._host_metrics)
        self._graph.replay()
        self._accumulate_host(self._graph_host)

    def _fits(self, batch) -> bool:
        return all(torch.is_tensor(batch.get(k)) and batch[k].shape == v.shape and batch[k].dtype == v.dtype
                   for k, v in self._static.items())

    # ------------------------------------------------------------------ metrics

    def _accumulate(self, metrics: dict[str, Any], host: bool = True) -> None:
        device_keys = [k for k, v in metrics.items() if torch.is_tensor(v)]
        if self._keys is None:
            self._keys = device_keys
            self._acc = torch.zeros(len(device_keys), dtype=torch.float64, device=self.device)
        elif device_keys != self._keys:
            raise ValueError(f"the loss function's device metrics changed from {self._keys} to {device_keys}")
        if device_keys:
            self._acc += torch.stack([metrics[k].detach().to(torch.float64) for k in device_keys])
        self._host_metrics = {k: float(v) for k, v in metrics.items() if not torch.is_tensor(v)}
        if host:
            self._accumulate_host(self._host_metrics)

    def _accumulate_host(self, values: dict[str, float]) -> None:
        for k, v in values.items():
            self._host[k] = self._host.get(k, 0.0) + v

    def read(self) -> dict[str, float]:
        """The metric sums since the last read (one device-to-host copy), and ``steps``; resets them."""
        out = dict(self._host)
        if self._acc is not None and self._keys:
            out.update(zip(self._keys, self._acc.tolist()))
            self._acc.zero_()
        out["steps"] = self.steps
        self._host, self.steps = {}, 0
        return out
