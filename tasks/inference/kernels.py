"""The fastest CPU kernel path for a model, measured on batches like those it will run.

On CPU a float32 model can run as it is (``eager``: ATen's kernels) or with its
Linear/Conv/BatchNorm layers converted to oneDNN with their weights packed once
(``torch.utils.mkldnn.to_mkldnn``), either with the activations kept as oneDNN tensors
from input to output (``onednn``: every op of the forward must take them; a ``flatten``
of a 4-d input, say, does not) or dense between the packed layers (``onednn-layers``:
each layer converts its input and output, which costs a copy of the activations and
works with any forward). Which is fastest depends on the model and the batch size.
:func:`fastest_forward` runs each path on a probe batch of the size the caller will use,
drops a path that fails or whose outputs differ from eager's (``allclose`` at float32
tolerance, same class per row), and keeps the fastest. Models with other parameterised
layers (int8, LoRA, reduced precision, embeddings, attention), GPU devices and torch
builds without oneDNN keep eager without a trial. Figures are in BENCHMARKS.md.

``--kernel eager`` (``kernel="eager"`` in the configs) turns the trial off. The choice is
remembered per process for (model, device, probe shape), so tasks that
load the same model again on a worker do not measure again.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable

EAGER, ONEDNN, ONEDNN_LAYERS = "eager", "onednn", "onednn-layers"
#: Rows of the probe batch at most: the batch size the caller will use, up to this.
PROBE_ROWS = 256
_CHOICES: dict[tuple, str] = {}
_MAX_CHOICES = 64


def fastest_forward(model: Any, probe: Any, device: Any, key: tuple | None = None,
                    kernel: str = "auto") -> tuple[Callable, str]:
    """``(forward, kernel)``: ``forward(x)`` computes ``model(x)`` for dense ``x`` on the
    fastest path for batches like ``probe`` (a tensor of rows on ``device``); ``kernel``
    names it (``eager``, ``onednn``, ``onednn-layers``). ``key`` identifies the model
    across loads (e.g. its checkpoint hash) for the per-process memory of the choice.
    ``kernel="eager"`` skips the trial and runs the model as it is."""
    import torch

    if kernel == EAGER or torch.device(device).type != "cpu" or not _convertible(model):
        return model, EAGER
    memo = None if key is None else (*key, str(device), tuple(probe.shape))
    known = _CHOICES.get(memo) if memo is not None else None
    if known == EAGER:
        return model, EAGER
    paths = {EAGER: model, **_onednn(model)}
    choice = known or _measure(paths, probe)
    if memo is not None and known is None:
        _CHOICES[memo] = choice
        while len(_CHOICES) > _MAX_CHOICES:
            _CHOICES.pop(next(iter(_CHOICES)))
    return paths[choice], choice


def _convertible(model: Any) -> bool:
    import torch
    from torch import nn

    if not torch.backends.mkldnn.is_available():
        return False
    layers = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm2d, nn.BatchNorm3d)
    for module in model.modules():
        own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if not own:
            continue
        if type(module) not in layers:  # exact types: subclasses (LoRA, int8) carry their own forward
            return False
        if any(t.is_floating_point() and t.dtype != torch.float32 for t in own):
            return False
    return True


def _onednn(model: Any) -> dict[str, Callable]:
    """The model with oneDNN-packed layers, two ways to run it: activations as oneDNN
    tensors from input to output (``onednn``; needs every op of the forward to take them),
    or dense between layers (``onednn-layers``; each packed layer converts its own input
    and output: a copy of the activations per layer, any forward)."""
    from torch.utils import mkldnn

    packed = mkldnn.to_mkldnn(copy.deepcopy(model).eval())  # it rewrites containers in place

    def whole(x):
        return packed(x.to_mkldnn()).to_dense()

    return {ONEDNN: whole, ONEDNN_LAYERS: packed}


def _measure(paths: dict[str, Callable], probe: Any, budget_s: float = 0.05) -> str:
    """The fastest path on ``probe`` among those whose outputs match eager's (best of 3 to
    20 interleaved runs each, as many as fit ``budget_s`` per path)."""
    import torch

    with torch.inference_mode():
        began = time.perf_counter()
        reference = paths[EAGER](probe)
        repeats = min(20, max(3, int(budget_s / max(time.perf_counter() - began, 1e-6))))
        usable = {EAGER: paths[EAGER]}
        for name, fn in paths.items():
            if name == EAGER:
                continue
            try:
                out = fn(probe)
            except Exception:  # noqa: BLE001 - an op oneDNN tensors do not support: not this path
                continue
            if (out.shape == reference.shape and torch.allclose(out, reference, rtol=1e-4, atol=1e-5)
                    and (reference.dim() < 2 or torch.equal(out.argmax(-1), reference.argmax(-1)))):
                usable[name] = fn
        if len(usable) == 1:
            return EAGER
        best = dict.fromkeys(usable, float("inf"))
        for _ in range(repeats):  # interleaved, best of each: robust to a busy machine
            for name, fn in usable.items():
                began = time.perf_counter()
                fn(probe)
                best[name] = min(best[name], time.perf_counter() - began)
    return min(best, key=best.get)
