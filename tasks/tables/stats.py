"""Per-column statistics of a table's train split, computed while staging and kept in the manifest.

Each write task summarises the train rows it stages (:func:`partial`), the driver merges
the summaries (:func:`merge`) and :func:`finish` turns them into the manifest's
``column_stats``: per scalar column its kind and what training, inference and serving
need to encode it exactly alike —

* ``numeric`` (integers, floats, booleans): ``mean``, ``std`` (population), ``min``,
  ``max``, and for integers with at most :data:`MAX_CATEGORIES` distinct values their
  sorted ``values`` (a label's classes);
* ``categorical`` (strings, dictionaries of strings) with at most :data:`MAX_CATEGORIES`
  distinct values: the sorted ``vocabulary``;
* ``string``: more distinct strings than that (an id, free text): not encodable.

Every entry also counts ``nulls`` over all rows of every split (the loader reads a column
that has any as Arrow, so the documented null rule applies). Written with pyarrow.compute
rather than a library: the statistics are mergeable sums over shards staged on different
workers, which pandas' or scikit-learn's one-table fits are not.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: Most distinct values a string column (or an integer label) may have to be encoded as categories.
MAX_CATEGORIES = 1000


def column_kind(typ: pa.DataType) -> str | None:
    """``numeric``, ``categorical`` or None (a column that is not a scalar feature)."""
    if pa.types.is_dictionary(typ):
        return column_kind(typ.value_type) and "categorical"
    if pa.types.is_boolean(typ) or pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_decimal(typ):
        return "numeric"
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return "categorical"
    return None


def as_strings(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A string or dictionary column as plain strings."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    return arr.cast(pa.string()) if not pa.types.is_string(arr.type) else arr


def as_floats(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr.cast(pa.float64())


def partial(table: pa.Table, train: np.ndarray) -> dict[str, Any]:
    """The mergeable summary of ``table``'s scalar columns; moments over rows where ``train``."""
    out: dict[str, Any] = {}
    mask = pa.array(train)
    for field in table.schema:
        kind = column_kind(field.type)
        if kind is None:
            continue
        column = table.column(field.name)
        entry: dict[str, Any] = {"kind": kind, "nulls": column.null_count}
        rows = column.filter(mask) if not train.all() else column
        if kind == "numeric":
            x = as_floats(rows).to_numpy(zero_copy_only=False)
            x = x[~np.isnan(x)]
            entry.update(count=int(x.size), sum=float(x.sum()), sumsq=float(np.square(x).sum()),
                         min=float(x.min()) if x.size else None, max=float(x.max()) if x.size else None)
            if pa.types.is_integer(field.type) or pa.types.is_boolean(field.type):
                entry["integer"] = True
                entry["distinct"] = _distinct(pc.unique(rows.cast(pa.int64())).drop_null().to_pylist())
        else:
            entry["distinct"] = _distinct(pc.unique(as_strings(rows)).drop_null().to_pylist())
        out[field.name] = entry
    return out


def _distinct(values: list) -> list | None:
    """Distinct values, or None once there are more than the cap (no longer enumerable)."""
    return sorted(values) if len(values) <= MAX_CATEGORIES else None


def merge(parts: list[dict[str, Any] | None]) -> dict[str, Any]:
    """The summary of all ``parts`` together."""
    total: dict[str, Any] = {}
    for part in parts:
        for name, entry in (part or {}).items():
            have = total.get(name)
            if have is None:
                total[name] = dict(entry)
                continue
            have["nulls"] += entry["nulls"]
            if have["kind"] == "numeric":
                for key in ("count", "sum", "sumsq"):
                    have[key] += entry[key]
                have["min"] = _pick(min, have["min"], entry["min"])
                have["max"] = _pick(max, have["max"], entry["max"])
            if "distinct" in have:
                a, b = have["distinct"], entry.get("distinct")
                have["distinct"] = None if a is None or b is None else _distinct(sorted(set(a) | set(b)))
    return total


def _pick(fn, a, b):
    return b if a is None else a if b is None else fn(a, b)


def finish(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The manifest's ``column_stats`` from a merged summary."""
    stats: dict[str, dict[str, Any]] = {}
    for name, entry in summary.items():
        if entry["kind"] == "numeric":
            n = entry["count"]
            mean = entry["sum"] / n if n else 0.0
            var = max(0.0, entry["sumsq"] / n - mean * mean) if n else 0.0
            out = {"kind": "numeric", "count": n, "mean": mean, "std": math.sqrt(var), "min": entry["min"],
                   "max": entry["max"], "nulls": entry["nulls"]}
            if entry.get("integer") and entry.get("distinct") is not None:
                out["values"] = entry["distinct"]
        elif entry.get("distinct") is None:
            out = {"kind": "string", "nulls": entry["nulls"], "distinct": f"more than {MAX_CATEGORIES}"}
        else:
            out = {"kind": "categorical", "vocabulary": entry["distinct"], "nulls": entry["nulls"]}
        stats[name] = out
    return stats
