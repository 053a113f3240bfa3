"""Input shards read ahead of the model, and one prediction shard written per input shard.

Reads go through the node's shard cache for remote datasets (``shardcache::``, verified
on fill) or straight from storage (verified against the manifest's hash), two shards in
flight (:class:`~storage.fetcher.ShardFetcher`), and the :class:`~storage.prefetch.Prefetcher`
keeps the next shard's rows ready while the model runs: on a GPU copied from pinned
buffers on a side stream, on a CPU decoded on another thread.

A prediction shard's name is a hash of (input shard content, model, options), so a re-run
finds finished shards by name; it is written atomically, so a killed run never leaves a
partial one. Each of its rows carries ``shard`` (the input shard's name in the dataset
manifest) and ``row`` (the row in that shard): the key that joins it back to its input.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa

from storage import atomic, codecs, formats, manifest as manifest_mod
from storage.cleanup import remove_unreferenced
from storage.dataset import Dataset
from storage.errors import ManifestError
from storage.hashing import digest_bytes
from storage.manifest import Manifest, ShardEntry
from storage.shard_writer import PART_PREFIX
from tasks.training.data import Columns, feature_array, image_input

FORMAT = "arrow"  # the default; --output-format parquet writes Parquet shards
PREDICTIONS_KIND = "predictions"  # the manifest's metadata ``kind`` of a prediction dataset
READS_IN_FLIGHT = 2


def prediction_name(entry: ShardEntry, model_hash: str, options: dict) -> str:
    body = json.dumps({"input": [entry.name, entry.hash], "model": model_hash, "options": options}, sort_keys=True)
    ext = options.get("output_format") or FORMAT
    return f"{entry.split}/{PART_PREFIX}{hashlib.sha256(body.encode()).hexdigest()[:20]}.{ext}"


def present_names(fs, root: str) -> set[str]:
    """Paths of every file under ``root``, relative to it."""
    try:
        found = fs.find(root)
    except (FileNotFoundError, OSError):
        return set()
    prefix = fs._strip_protocol(root).rstrip("/") + "/"
    return {p[len(prefix):] for p in found if p.startswith(prefix)}


@dataclass
class InputShard:
    """An input shard's feature rows (CPU tensor of the stored dtype) and where they go."""

    entry: ShardEntry
    name: str  # of its prediction shard
    x: Any
    held: Any = None  # the cache's hold on the shard's file while its rows are in use
    cache_hit: bool | None = None  # None: read straight from storage
    kept: pa.Table | None = None  # input columns carried into the predictions

    def release(self) -> None:
        if self.held is not None:
            self.held.release()
            self.held = None


def read_inputs(dataset: str, storage_options: dict, inputs: list[tuple[ShardEntry, str]], cols: Columns,
                device: Any = None, depth: int = 1, keep: list[str] = ()):
    """A :class:`~storage.prefetch.Prefetcher` of ``{"x": rows, "shard": InputShard}``, in
    ``inputs`` order; ``x`` (the column, the table columns encoded as in training, or the
    images decoded as for validation) is on ``device`` when it is a CUDA device. Release
    each shard once predicted."""
    from storage.cache import ShardCacheFileSystem
    from storage.fetcher import ShardFetcher
    from storage.loader import _with_cache
    from storage.prefetch import Prefetcher

    ds = Dataset.open(_with_cache(dataset, "auto"), storage_options)
    cached = isinstance(ds.fs, ShardCacheFileSystem)

    def read(item: tuple[ShardEntry, str]) -> InputShard:
        entry, name = item
        held = None
        if cached:
            held = ds.fs.open_table(ds.shard_path(entry), entry, ds.manifest.shard_format)
            table = held.table
        else:
            table = ds.read_shard(entry, verify=True)
        if cols.image is not None:
            x = image_input(table, cols.feature, cols.image)
        else:
            x = cols.table.encode_table(table) if cols.table else feature_array(table, cols.feature)
        return InputShard(entry, name, _tensor(x), held, None if held is None else held.local,
                          table.select(list(keep)) if keep else None)

    def shards() -> Iterator[dict[str, Any]]:
        fetcher = ShardFetcher(read, inputs, depth=READS_IN_FLIGHT, size=lambda item: item[0].bytes)
        try:
            for shard in fetcher:
                yield {"x": shard.x, "shard": shard}
        finally:
            fetcher.close()

    on_gpu = device is not None and getattr(device, "type", str(device)).startswith("cuda")
    return Prefetcher(shards(), device=device if on_gpu else None, depth=depth)


def _tensor(x: np.ndarray):
    import torch

    with warnings.catch_warnings():  # Arrow buffers are read-only; the model never writes its input
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(x))


def write_predictions(fs, root: str, shard: InputShard, logits: np.ndarray, probabilities: bool,
                      codec: str, cols: Columns | None = None, output_format: str = FORMAT) -> ShardEntry:
    """The prediction shard of ``shard``: its key columns, the prediction (a class id or name,
    or a regression's value in the target's units), confidence (and probabilities), and the
    kept input columns."""
    from tasks.inference.predict import softmax

    rows = len(logits)
    columns = {
        "shard": pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, dtype=np.int32)), pa.array([shard.entry.name])),
        "row": pa.array(np.arange(rows, dtype=np.int64)),
    }
    labels = cols.labels if cols is not None else None
    if labels is not None and labels.task == "regression":
        columns["prediction"] = pa.array(labels.decode(logits.reshape(rows, -1)[:, 0]), pa.float64())
    else:
        probs = softmax(logits.astype(np.float32))
        ids = probs.argmax(axis=1).astype(np.int64)
        columns["prediction"] = pa.array(labels.decode(ids)) if labels is not None and labels.named else pa.array(ids)
        columns["confidence"] = pa.array(probs.max(axis=1).astype(np.float32))
        if probabilities:
            columns["probabilities"] = pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), probs.shape[1])
    for name in shard.kept.column_names if shard.kept is not None else ():
        columns[name if name not in columns else f"input_{name}"] = shard.kept.column(name)
    return write_table(fs, root, shard.name, shard.entry.split, pa.table(columns), codec, output_format)


def write_table(fs, root: str, name: str, split: str, table: pa.Table, codec: str,
                output_format: str = FORMAT) -> ShardEntry:
    """Write ``table`` as shard ``name`` of an output dataset, atomically; its manifest entry."""
    data = formats.get(output_format).encode(table, codec, codecs.resolve(codec)[1])
    atomic.write_bytes(fs, f"{root}/{name}", data)
    return ShardEntry(name=name, split=split, rows=table.num_rows, bytes=len(data), hash=digest_bytes(data),
                      raw_bytes=table.nbytes)


def format_of(name: str) -> str:
    """A prediction shard's format, from its name's extension."""
    return "parquet" if name.endswith(".parquet") else FORMAT


def existing_entry(fs, root: str, name: str, split: str, known: dict[str, ShardEntry]) -> ShardEntry:
    """The entry of a prediction shard an earlier run wrote: from its manifest's entries
    (``known``, by name), else read from the shard itself (a run killed before its commit)."""
    if name in known:
        return known[name]
    data = fs.cat_file(f"{root}/{name}")
    table = formats.get(format_of(name)).decode(data)
    return ShardEntry(name=name, split=split, rows=table.num_rows, bytes=len(data), hash=digest_bytes(data),
                      raw_bytes=table.nbytes)


def schema_of(fs, root: str, entry: ShardEntry) -> pa.Schema:
    return formats.get(format_of(entry.name)).decode(fs.cat_file(f"{root}/{entry.name}")).schema


def contiguous_groups(items: list, n_groups: int, rows: Callable[[Any], int]) -> list[list]:
    """``items`` cut, in order, into at most ``n_groups`` runs of similar total ``rows``."""
    if not items:
        return []
    n_groups = max(1, min(n_groups, len(items)))
    target = sum(rows(i) for i in items) / n_groups
    groups: list[list] = [[]]
    acc = 0
    for item in items:
        if groups[-1] and acc >= target * len(groups) and len(groups) < n_groups:
            groups.append([])
        groups[-1].append(item)
        acc += rows(item)
    return groups


def commit_outputs(fs, root: str, pairs: list[tuple[ShardEntry, str]], written: list[ShardEntry], codec: str,
                   metadata: dict, source: dict, created: str, shard_format: str = FORMAT) -> Manifest:
    """The manifest of an output dataset with one shard per input (``pairs``: input entry,
    output shard name), written last and atomically; shards it does not name are removed.

    Output entries come from ``written`` (this run), the previous manifest, or the shard
    itself (a run killed before its commit); each must have as many rows as its input."""
    previous = manifest_mod.read_if_exists(fs, root)
    known = {e.name: e for e in previous.shards} if previous is not None else {}
    known.update({e.name: e for e in written})
    entries = []
    for source_entry, name in sorted(pairs, key=lambda p: (p[0].split, p[0].name)):
        entry = existing_entry(fs, root, name, source_entry.split, known)
        if entry.rows != source_entry.rows:
            raise ManifestError(f"output shard {name!r} has {entry.rows} rows for {source_entry.rows} input rows")
        entries.append(entry)
    codec_name, level = codecs.resolve(codec)
    manifest = Manifest(shard_format=shard_format, codec=codec_name, level=level, schema=schema_of(fs, root, entries[0]),
                        shards=entries, metadata=metadata, source=source, created=created)
    manifest_mod.write(fs, root, manifest)
    remove_unreferenced(fs, root, keep=[manifest, previous])
    return manifest
