"""Scoring a split during training: classifiers by loss and accuracy, regressions by RMSE, MAE and R².

Each rank scores its share of the split once; the sums are kept on the device and summed
across ranks, read once at the end. A regression's sums are over standardised targets and
turned back into the target's units (RMSE, MAE) with the train split's standard deviation;
R² does not depend on the units.
"""

from __future__ import annotations

import math
from typing import Any


def evaluate(model, val, columns, world_size: int, device, autocast) -> dict[str, float]:
    """``{"val_loss", "val_acc"}`` for a classifier, ``{"val_loss", "val_rmse", "val_mae", "val_r2"}``
    for a regression (see the module docstring)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    regression = columns.task == "regression"
    model.eval()
    totals = torch.zeros(5 if regression else 3, dtype=torch.float64, device=device)
    feature, label = columns.feature, columns.label
    with torch.no_grad():
        for batch in val:
            xb, yb = batch[feature].to(device), batch[label].to(device)
            with autocast():
                out = model(xb)
            count = yb.new_full((), len(yb), dtype=torch.float64)  # a fill, not a copy
            if regression:
                y = yb.double()
                err = out.double().reshape(y.shape) - y
                totals += torch.stack([err.square().sum(), err.abs().sum(), y.sum(), y.square().sum(), count])
            else:
                totals += torch.stack([F.cross_entropy(out.float(), yb, reduction="sum").double(),
                                       (out.argmax(1) == yb).sum().double(), count])
    if world_size > 1:
        dist.all_reduce(totals)
    model.train()
    if not regression:
        loss, correct, count = totals.tolist()
        return {"val_loss": loss / count, "val_acc": correct / count}
    sse, sae, sy, syy, count = totals.tolist()
    scale = columns.labels.std or 1.0
    sst = syy - sy * sy / count
    return {"val_loss": sse / count, "val_rmse": math.sqrt(sse / count) * scale, "val_mae": sae / count * scale,
            "val_r2": 1.0 - sse / sst if sst > 0 else 0.0}


def metric_row(metrics: dict[str, Any] | None, regression: bool) -> dict[str, Any]:
    """The epoch row's validation columns (None where there is no validation split)."""
    keys = ("val_loss", "val_rmse", "val_mae", "val_r2") if regression else ("val_loss", "val_acc")
    return {k: None if not metrics else round(metrics[k], 5) for k in keys}
