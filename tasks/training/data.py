"""Training data: the feature/label columns of a staged dataset as per-rank batches.

Batches come from the streaming loader (:class:`storage.loader.StreamingDataset`) through
the prefetcher; which rows each rank reads, and in which order, is
:mod:`storage.order`'s: a pure function of (shard row counts, seed, epoch, world size,
rank, batch size, ...). Shards are shuffled, each rank reads a contiguous run of the
epoch's sequence with the same number of batches as every other rank (DDP needs equal
steps), and rows are shuffled within bounded blocks. Training takes full batches only
(``drop_last``); scoring reads every row of a split exactly once across ranks, in storage
order.
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
from tasks.models.sizing import shape_record
from tasks.tables.encoding import FEATURES, FeatureEncoding, LabelEncoding
from tasks.tables.select import feature_encoding, label_encoding, label_task


@dataclass(frozen=True)
class Columns:
    feature: str  # the model input's batch key: a dataset column, or FEATURES for assembled table columns
    label: str | None  # None: a causal LM's token column alone
    shape: tuple[int, ...] | None
    scale: float | None
    table: FeatureEncoding | None = None  # table columns assembled into the input (tasks.tables)
    labels: LabelEncoding | None = None  # labels to class ids or standardised targets
    image: dict[str, Any] | None = None  # image files: the manifest's ``image`` record (see tasks.images)

    @property
    def task(self) -> str:
        return self.labels.task if self.labels else "classify"

    @property
    def read(self) -> list[str]:
        """The dataset columns a batch needs."""
        inputs = self.table.names if self.table else [self.feature]
        return inputs + ([self.label] if self.label else [])

    def record(self) -> dict[str, Any]:
        """What a checkpoint records, for inference and serving to encode alike."""
        return {"feature": self.feature, "label": self.label, "shape": list(self.shape) if self.shape else None,
                "scale": self.scale, "features": self.table.to_json() if self.table else None,
                "labels": self.labels.to_json() if self.labels else None, "task": self.task,
                **({"image": self.image} if self.image else {})}

    @classmethod
    def from_record(cls, doc: dict[str, Any], label: str | None = "") -> "Columns":
        shape = doc.get("shape")
        return cls(doc.get("feature") or "input", doc.get("label") if label == "" else label,
                   tuple(shape) if shape else None, doc.get("scale"),
                   FeatureEncoding.from_json(doc["features"]) if doc.get("features") else None,
                   LabelEncoding.from_json(doc.get("labels")), doc.get("image"))


def resolve_columns(ds: Dataset, feature: str | None, label: str | None, feature_columns: list[str] | None = None,
                    task: str = "auto", normalize: str = "standard") -> Columns:
    """The input and label columns and their encodings, checked against the schema and the
    manifest's column statistics, with a clear error."""
    meta = ds.manifest.metadata
    schema = ds.schema
    label = label or meta.get("label") or "label"
    names = schema.names
    if label not in names:
        raise ConfigError(
            f"dataset {ds.url!r} has no label column {label!r} (columns: {', '.join(names)}); "
            "pass --label-column"
        )
    stats = meta.get("column_stats")
    where = f"dataset {ds.url!r}"
    task = label_task(schema, label, task, stats.get(label)) if stats is not None else "classify"
    labels = label_encoding(schema, stats, label, task, where)
    if labels is None and not pa.types.is_integer(schema.field(label).type):
        raise ConfigError(f"label column {label!r} of {ds.url!r} is {schema.field(label).type}; an integer class id is needed")
    patterns = list(feature_columns or [])
    if feature is None and len(patterns) == 1 and patterns[0] in names and _is_vector(schema.field(patterns[0]).type):
        feature, patterns = patterns[0], []  # one fixed-size list: the model input as it is
    feature = feature or (None if patterns else meta.get("feature"))
    if feature is None:
        others = [n for n in names if n != label]
        if patterns or not (len(others) == 1 and _is_vector(schema.field(others[0]).type)):
            table = feature_encoding(schema, stats, patterns, label, normalize, where)
            return Columns(FEATURES, label, (table.width,), None, table, labels)
        feature = others[0]
    if feature not in names:
        raise ConfigError(f"dataset {ds.url!r} has no feature column {feature!r} (columns: {', '.join(names)})")
    if meta.get("kind") == "images" and feature == meta.get("feature"):  # image files (tasks.images)
        return Columns(feature, label, tuple(meta["shape"]), None, None, labels, image=meta["image"])
    ftype = schema.field(feature).type
    numeric = pa.types.is_integer(ftype) or pa.types.is_floating(ftype)
    if pa.types.is_fixed_size_list(ftype):
        numeric = pa.types.is_integer(ftype.value_type) or pa.types.is_floating(ftype.value_type)
    if not numeric:
        raise ConfigError(
            f"feature column {feature!r} of {ds.url!r} is {ftype}; a number or a fixed-size list of numbers is needed"
        )
    shape = meta.get("shape") if feature == meta.get("feature") else None
    if shape is None and (schema.field(feature).metadata or {}).get(SHAPE_KEY):
        shape = json.loads(schema.field(feature).metadata[SHAPE_KEY])
    shape = shape_record(shape, ftype)  # recorded in every checkpoint: what Swarm trains, Swarm serves
    return Columns(feature, label, tuple(shape), meta.get("scale"), None, labels)


def _is_vector(ftype: pa.DataType) -> bool:
    return pa.types.is_fixed_size_list(ftype) or pa.types.is_list(ftype)


def feature_array(table: pa.Table, feature: str) -> np.ndarray:
    """The feature column as a NumPy matrix (rows, width), zero-copy where the layout allows."""
    column = table.column(feature).combine_chunks()
    if pa.types.is_fixed_size_list(column.type):
        values = column.flatten().to_numpy(zero_copy_only=False)
        return values.reshape(len(column), column.type.list_size)
    return column.to_numpy(zero_copy_only=False).reshape(len(column), 1)


def image_input(table: pa.Table, feature: str, image: dict[str, Any]) -> np.ndarray:
    """An image column as model input, float32 (rows, 3, size, size): the files decoded, or the
    pixels staged, then normalised as for validation (the manifest's or checkpoint's ``image``)."""
    from storage.images import ImageTransform

    transform = ImageTransform.from_metadata(image, train=False)
    if image["stored"] == "encoded":
        return transform(table.column(feature).combine_chunks())
    size = int(image["size"])
    return transform(feature_array(table, feature).reshape(table.num_rows, 3, size, size))


def to_arrays(table: pa.Table, cols: Columns) -> tuple[np.ndarray, np.ndarray]:
    """Feature matrix (rows, ...) and labels (class ids or standardised targets) as NumPy,
    zero-copy where the layout allows (images decoded and normalised as for validation)."""
    if cols.image is not None:
        x = image_input(table, cols.feature, cols.image)
    else:
        x = cols.table.encode_table(table) if cols.table else feature_array(table, cols.feature)
    if cols.labels is not None:
        return x, cols.labels.encode(table.column(cols.label))
    return x, table.column(cols.label).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


def batch_encoder(cols: Columns):
    """The loader's batch transform for table columns: the assembled input and the encoded labels."""
    table, labels, label = cols.table, cols.labels, cols.label

    def transform(arrays: dict[str, Any]) -> dict[str, Any]:
        out = {FEATURES: table.encode(arrays)}
        if label:
            out[label] = labels.encode(arrays[label]) if labels else arrays[label]
        return out

    return transform


def feature_tensor(x: np.ndarray, cols: Columns):
    """The model input: float32 (scaled when the dataset says so), tokens stay integers."""
    import warnings

    import torch

    with warnings.catch_warnings():  # Arrow buffers are read-only; the tensors are never written
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(np.ascontiguousarray(x))
    return scale_features(t, cols)


def scale_features(t, cols: Columns):
    """A tensor of stored feature values as the model takes it, on the tensor's device:
    float32 (scaled when the dataset says so); integer tokens stay integers."""
    import torch

    if cols.scale is not None:  # a copy: ``t`` may share a read-only Arrow buffer
        return t.to(torch.float32, copy=True).mul_(float(cols.scale))
    return t if not t.is_floating_point() else t.float()


def column_transform(cols: Columns):
    """The feature column's batches as model input: float32 (scaled when the dataset says so);
    integer tokens stay integers."""
    scale = cols.scale

    def transform(values: np.ndarray) -> np.ndarray:
        if scale is not None:
            return values.astype(np.float32) * np.float32(scale)
        if values.dtype.kind == "f" and values.dtype != np.float32:
            return values.astype(np.float32)
        if values.dtype.kind == "u" and values.dtype.itemsize > 1:  # token ids: torch has few uint16/32 ops
            return values.astype(np.int64)
        return values

    return transform


def feature_transform(cols: Columns, split: str, seed: int = 0):
    """The host transform of a split's feature column: images decoded with the split's
    transforms (random crop and flip for ``train``), else :func:`column_transform`."""
    if cols.image is None:
        return column_transform(cols)
    from storage.images import ImageTransform

    return ImageTransform.from_metadata(cols.image, train=split == "train", seed=seed)


def _loader(cfg, cols: Columns, split: str, rank: int, world_size: int, device, batch_size: int, shuffle: bool,
            drop_last: bool, gather: str = "host"):
    """The split through the prefetcher: batches gathered on the host (then copied), or, with
    ``gather`` device/auto, each shuffle window copied to the device once and the batches
    gathered (and scaled) there."""
    from storage.loader import StreamingDataset
    from storage.prefetch import Prefetcher

    cuda = getattr(device, "type", "cpu") == "cuda"
    encode_labels = None if cols.labels is None or cols.labels.identity else cols.labels.encode
    if cols.table is not None or encode_labels is not None or cols.image is not None:
        gather = "host"  # the encodings run on the host's batches; images are decoded there
    on_device = gather == "device" or (gather == "auto" and cuda)
    if cols.table is not None:
        transforms, batch_transform = {}, batch_encoder(cols)
    else:
        transforms = {} if on_device else {cols.feature: feature_transform(cols, split, cfg.seed)}
        if encode_labels is not None:
            transforms[cols.label] = encode_labels
        batch_transform = None
    ds = StreamingDataset(
        cfg.dataset, split=split, batch_size=batch_size, seed=cfg.seed, shuffle=shuffle, drop_last=drop_last,
        columns=cols.read, transforms=transforms, batch_transform=batch_transform,
        arrow_columns=cols.table.arrow_columns if cols.table else None,
        rank=rank, world_size=world_size, storage_options=cfg.storage_options,
    )
    loader = Prefetcher(ds, device=device if cuda or on_device else None, depth=2, gather=gather,
                        device_transforms={cols.feature: lambda t: scale_features(t, cols)})
    if on_device and loader.gather == "host":  # auto chose the host: the stored values need the host transform
        ds.transforms = {cols.feature: column_transform(cols)}
    return loader


def train_loader(cfg, cols: Columns, rank: int, world_size: int, device):
    """The train split through the streaming loader and prefetcher, partitioned by rank.

    Full batches only (``drop_last``): every rank takes the same number of equal steps,
    so DDP's gradient average is the average over the global batch.
    """
    return _loader(cfg, cols, "train", rank, world_size, device, cfg.batch_size, True, True,
                   getattr(cfg, "device_batches", "host"))


def split_loader(cfg, cols: Columns, split: str, rank: int, world_size: int, device, max_batch: int = 1024):
    """A split for scoring: in storage order, every row exactly once across ranks; None if absent."""
    ds = Dataset.open(cfg.dataset, cfg.storage_options)
    rows = sum(s.rows for s in ds.shards(split)) if split in ds.manifest.splits else 0
    if rows < world_size:
        return None
    return _loader(cfg, cols, split, rank, world_size, device, max(1, min(max_batch, rows // world_size)), False, False)


def load_split(url: str, split: str | None, cols: Columns, storage_options: dict | None = None):
    """A whole split in memory as ``(features, labels)`` NumPy arrays (for evaluation)."""
    ds = Dataset.open(url, storage_options)
    return to_arrays(ds.read_table(split), cols)
