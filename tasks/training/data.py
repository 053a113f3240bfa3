"""Training data: the feature/label columns of a staged dataset as per-rank batches.

Sample order is a pure function of (seed, epoch, world size, rank): one global
permutation per epoch, cut into global batches of ``world_size * batch_size`` rows; rank
``r`` takes the ``r``-th slice of every global batch. So every rank has the same number
of batches, and W ranks with batch b see exactly the samples one rank with batch W*b
sees, which is what makes DDP equivalent to single-process training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from storage.dataset import Dataset
from storage.errors import ConfigError
from storage.sources import SHAPE_KEY


@dataclass(frozen=True)
class Columns:
    feature: str
    label: str
    shape: tuple[int, ...] | None
    scale: float | None


def resolve_columns(ds: Dataset, feature: str | None, label: str | None) -> Columns:
    """The input and label columns, checked against the schema, with a clear error."""
    meta = ds.manifest.metadata
    schema = ds.schema
    label = label or meta.get("label") or "label"
    names = schema.names
    if label not in names:
        raise ConfigError(
            f"dataset {ds.url!r} has no label column {label!r} (columns: {', '.join(names)}); "
            "pass --label-column"
        )
    if not (pa.types.is_integer(schema.field(label).type)):
        raise ConfigError(f"label column {label!r} of {ds.url!r} is {schema.field(label).type}; an integer class id is needed")
    feature = feature or meta.get("feature")
    if feature is None:
        others = [n for n in names if n != label]
        if len(others) != 1:
            raise ConfigError(
                f"dataset {ds.url!r} does not say which column is the input (columns: {', '.join(names)}); "
                "pass --feature-column"
            )
        feature = others[0]
    if feature not in names:
        raise ConfigError(f"dataset {ds.url!r} has no feature column {feature!r} (columns: {', '.join(names)})")
    ftype = schema.field(feature).type
    numeric = pa.types.is_integer(ftype) or pa.types.is_floating(ftype)
    if pa.types.is_fixed_size_list(ftype):
        numeric = pa.types.is_integer(ftype.value_type) or pa.types.is_floating(ftype.value_type)
    if not numeric:
        raise ConfigError(
            f"feature column {feature!r} of {ds.url!r} is {ftype}; a number or a fixed-size list of numbers is needed"
        )
    shape = meta.get("shape")
    if shape is None and (schema.field(feature).metadata or {}).get(SHAPE_KEY):
        shape = json.loads(schema.field(feature).metadata[SHAPE_KEY])
    return Columns(feature, label, tuple(shape) if shape else None, meta.get("scale"))


def to_arrays(table: pa.Table, cols: Columns) -> tuple[np.ndarray, np.ndarray]:
    """Feature matrix (rows, ...) and labels as NumPy, zero-copy where the layout allows."""
    column = table.column(cols.feature).combine_chunks()
    if pa.types.is_fixed_size_list(column.type):
        width = column.type.list_size
        values = column.flatten().to_numpy(zero_copy_only=False)
        x = values.reshape(len(column), width)
    else:
        x = column.to_numpy(zero_copy_only=False).reshape(len(column), 1)
    y = table.column(cols.label).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    return x, y


def feature_tensor(x: np.ndarray, cols: Columns):
    """The model input: float32 (scaled when the dataset says so), tokens stay integers."""
    import warnings

    import torch

    with warnings.catch_warnings():  # Arrow buffers are read-only; the tensors are never written
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(np.ascontiguousarray(x))
    if cols.scale is not None:
        return t.float().mul_(float(cols.scale))
    return t if not t.is_floating_point() else t.float()


class RankBatches:
    """Per-rank batches of an in-memory split, in the order described above."""

    def __init__(self, x, y, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True):
        if len(y) < batch_size * world_size:
            raise ConfigError(
                f"the split has {len(y)} rows, fewer than one global batch "
                f"({world_size} ranks x batch {batch_size}); lower --batch-size or --world-size"
            )
        self.x, self.y = x, y
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle

    def __len__(self) -> int:
        return len(self.y) // (self.batch_size * self.world_size)

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.y))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.y))

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[Any, Any]]:
        import torch

        perm = self.order(epoch)
        g = self.batch_size * self.world_size
        for i in range(start_batch, len(self)):
            rows = perm[i * g + self.rank * self.batch_size: i * g + (self.rank + 1) * self.batch_size]
            yield self.x[rows], self.y[rows]


def load_split(url: str, split: str | None, cols: Columns, storage_options: dict | None = None):
    ds = Dataset.open(url, storage_options)
    table = ds.read_table(split)
    return to_arrays(table, cols)
