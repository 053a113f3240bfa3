"""Checks of a prediction dataset against its input: the key joins back to every input row
exactly once, and each prediction is what the model gives that row alone."""

from __future__ import annotations

import numpy as np
import torch

from storage import checkpoint as ckpt
from storage.dataset import Dataset
from storage.urls import url_to_fs
from tasks.models.loading import load_model
from tasks.training.data import Columns, feature_array, feature_tensor


def random_checkpoint(root, hidden: list[int], scale: float | None = 1 / 255, seed: int = 0) -> str:
    """A checkpoint of an untrained MLP over 8x8 ``image`` rows (no training: predictions need not be good)."""
    from tasks.models import build_model

    torch.manual_seed(seed)
    args = {"in_features": 64, "num_classes": 10, "hidden": hidden}
    model = build_model("mlp", args)
    columns = {"feature": "image", "label": "label", "shape": [1, 8, 8], "scale": scale}
    return ckpt.save(str(root), 1, {f"model.{k}": v for k, v in model.state_dict().items()},
                     {"model": {"name": "mlp", "args": args}, "columns": columns, "lora": None})


def read_predictions(output: str, storage_options: dict | None = None) -> dict:
    """``{(shard, row): (prediction, probabilities or None)}``; fails on a duplicate key."""
    table = Dataset.open(output, storage_options).read_table(verify=True)
    shards = table.column("shard").to_pylist()
    rows = table.column("row").to_pylist()
    preds = table.column("prediction").to_numpy()
    probs = None
    if "probabilities" in table.column_names:
        col = table.column("probabilities").combine_chunks()
        probs = col.flatten().to_numpy().reshape(len(col), col.type.list_size)
    found = {}
    for i, key in enumerate(zip(shards, rows)):
        assert key not in found, f"two predictions for input row {key}"
        found[key] = (int(preds[i]), None if probs is None else probs[i])
    return found


def check_predictions(output: str, dataset: str, model: str, storage_options: dict | None = None,
                      every: int = 1, split: str | None = None, rtol: float = 1e-4, atol: float = 1e-6) -> int:
    """Every input row (of ``split``) has exactly one prediction; every ``every``-th row's
    equals the model's on that row alone (probabilities too, where written, within
    ``rtol``/``atol``). Returns the rows compared."""
    predictions = read_predictions(output, storage_options)
    ds = Dataset.open(dataset, storage_options)
    expected = {(e.name, r) for e in ds.shards(split) for r in range(e.rows)}
    assert predictions.keys() == expected, (
        f"{len(expected - predictions.keys())} input rows without a prediction, "
        f"{len(predictions.keys() - expected)} predictions of no input row")
    loaded = load_model(model, storage_options)
    c = loaded.columns
    cols = Columns(c["feature"], c.get("label") or "", tuple(c["shape"]) if c.get("shape") else None, c.get("scale"))
    checked = 0
    with torch.inference_mode():
        for entry in ds.shards(split):
            x = feature_array(ds.read_shard(entry), cols.feature)
            for r in range(0, entry.rows, every):
                alone = torch.softmax(loaded.model(feature_tensor(x[r:r + 1], cols)).float(), -1)[0].numpy()
                prediction, probs = predictions[(entry.name, r)]
                assert prediction == int(alone.argmax()), f"row {r} of {entry.name}: {prediction} != {alone.argmax()}"
                if probs is not None:
                    np.testing.assert_allclose(probs, alone, rtol=rtol, atol=atol)
                checked += 1
    return checked


def leftovers(output: str, storage_options: dict | None = None) -> list[str]:
    """Files under ``output`` that its manifest does not name (temporaries, partial or stray shards)."""
    fs, root = url_to_fs(output, storage_options)
    root = fs._strip_protocol(root).rstrip("/")
    named = {e.name for e in Dataset.open(output, storage_options).shards()} | {"index.json"}
    return sorted(p[len(root) + 1:] for p in fs.find(root) if p[len(root) + 1:] not in named)
