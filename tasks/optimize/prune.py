"""Pruning: global magnitude (unstructured) and structured removal of units and channels.

Unstructured pruning zeroes the smallest-magnitude weights across all Linear and Conv
layers at once (one global threshold), so layers that matter keep more; shapes, file
size and dense latency stay as they are, only the non-zeros fall.

Structured pruning really removes rows and columns: hidden units of the MLP, conv
channels and the hidden layer of the CNN, the FFN width of the transformer. A unit's
importance is the norm of the weights that produce it times the norm of the weights
that read it, so a unit that is large going in but ignored coming out still goes. The
model is rebuilt with the new widths in its arguments (``hidden``, ``channels``,
``d_ff``), which is all a loader needs to rebuild it exactly.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from storage.errors import ConfigError
from tasks.models import build_model
import tasks.optimize.prune_lm as prune_lm

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prune_unstructured(model: nn.Module, amount: float) -> int:
    """Zero the ``amount`` fraction of smallest weights, globally, in place; returns how many."""
    weights = [m.weight for m in model.modules() if isinstance(m, PRUNABLE)]
    if not weights:
        raise ConfigError(f"the model has no Linear or Conv layer to prune ({type(model).__name__})")
    magnitudes = torch.cat([w.detach().abs().flatten() for w in weights])
    count = int(amount * magnitudes.numel())
    if count == 0:
        return 0
    keep = torch.ones(magnitudes.numel(), dtype=torch.bool)
    keep[magnitudes.topk(count, largest=False).indices] = False
    offset = 0
    with torch.no_grad():
        for w in weights:
            w.mul_(keep[offset:offset + w.numel()].view_as(w))
            offset += w.numel()
    return count


def _prune_chain(state: dict[str, torch.Tensor], chain: list[str], amount: float) -> list[int]:
    """Each layer of ``chain`` feeds the next: keep the most important output units of every
    layer but the last, slicing its rows and the next layer's input columns (a consumer may
    read several columns per unit, as a Linear after a pooled conv does). Returns the widths."""
    widths = []
    for producer, consumer in zip(chain, chain[1:]):
        weight, reader = state[f"{producer}.weight"], state[f"{consumer}.weight"]
        units = weight.shape[0]
        columns = reader.reshape(reader.shape[0], units, -1)
        score = weight.reshape(units, -1).norm(dim=1) * columns.transpose(0, 1).reshape(units, -1).norm(dim=1)
        keep = score.topk(max(1, round(units * (1 - amount)))).indices.sort().values
        state[f"{producer}.weight"] = weight[keep]
        if f"{producer}.bias" in state:
            state[f"{producer}.bias"] = state[f"{producer}.bias"][keep]
        state[f"{consumer}.weight"] = columns[:, keep].reshape(reader.shape[0], -1, *reader.shape[2:])
        widths.append(len(keep))
    return widths


def _layer_names(module: nn.Module, prefix: str, kinds=PRUNABLE) -> list[str]:
    return [f"{prefix}.{name}" for name, m in module.named_children() if isinstance(m, kinds)]


def _mlp(model, state, args, amount):
    hidden = _prune_chain(state, _layer_names(model.body, "body") + ["head"], amount)
    return {**args, "hidden": hidden}


def _cnn(model, state, args, amount):
    widths = _prune_chain(state, _layer_names(model.features, "features") + ["fc", "head"], amount)
    return {**args, "channels": widths[:-1], "hidden": widths[-1]}


def _transformer(model, state, args, amount):
    widths = set()
    for i in range(len(model.encoder.layers)):
        widths.update(_prune_chain(state, [f"encoder.layers.{i}.linear1", f"encoder.layers.{i}.linear2"], amount))
    assert len(widths) == 1, "every layer keeps the same FFN width"
    return {**args, "d_ff": widths.pop()}


STRUCTURED: dict[str, Callable[..., dict[str, Any]]] = {"mlp": _mlp, "cnn": _cnn, "transformer": _transformer,
                                                        "gpt": prune_lm.gpt_mlp}


def _structured(name: str):
    return prune_lm.hf_mlp if name.startswith("hf:") else STRUCTURED.get(name)


def check_structured(name: str) -> None:
    if _structured(name) is None:
        raise ConfigError(
            f"structured pruning knows the layout of the built-in models ({', '.join(STRUCTURED)}) and of hf: "
            f"Llama/GPT-2-family models, "
            f"not {name!r}; use unstructured pruning (drop --structured) for it"
        )


def prune_structured(name: str, args: dict[str, Any], model: nn.Module, amount: float) -> tuple[nn.Module, dict]:
    """A smaller model of the same kind with the most important units kept, and its arguments."""
    check_structured(name)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    new_args = _structured(name)(model, state, args, amount)
    pruned = build_model(name, new_args)
    pruned.load_state_dict(state)
    if name.startswith("hf:"):  # the new width is in the config the artifact records, not in the spec
        new_args = {k: v for k, v in new_args.items() if k != "config"}
    return pruned.eval(), new_args
