"""Arrow columns as numpy arrays without copies, and batches gathered from them.

A column becomes a numpy array of shape ``(rows, *shape)`` that points into the Arrow
buffers (a memory-mapped file, or the decoded shard) when its layout allows: primitive
numbers, and fixed-size lists of them (shape from the field's ``swarm.shape`` metadata,
e.g. ``[3, 32, 32]``, else ``(width,)``), with no nulls. Other columns (strings, binary,
variable-length lists) stay Arrow arrays; a per-column transform turns them into tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from storage.errors import ConfigError, SourceError
from storage.sources import SHAPE_KEY


@dataclass(frozen=True)
class ColumnSpec:
    name: str
    dtype: np.dtype | None  # None: kept as an Arrow array
    shape: tuple[int, ...]  # per row; () for scalars

    @property
    def numeric(self) -> bool:
        return self.dtype is not None

    @property
    def row_bytes(self) -> int:
        return int(self.dtype.itemsize * np.prod(self.shape, dtype=np.int64)) if self.numeric else 0


def column_specs(schema: pa.Schema, columns: list[str] | None, as_arrow: set[str] | frozenset = frozenset()
                 ) -> list[ColumnSpec]:
    """Each column's layout; those in ``as_arrow`` stay Arrow arrays (e.g. numbers with nulls)."""
    names = list(schema.names) if columns is None else list(columns)
    unknown = [c for c in names if c not in schema.names]
    if unknown:
        raise ConfigError(f"column(s) {', '.join(map(repr, unknown))} not in the dataset; it has: "
                          f"{', '.join(schema.names)}")
    if not names:
        raise ConfigError("columns must name at least one column")
    return [ColumnSpec(name, None, ()) if name in as_arrow else _spec(schema.field(name)) for name in names]


def _spec(field: pa.Field) -> ColumnSpec:
    typ = field.type
    if _is_number(typ):
        return ColumnSpec(field.name, np.dtype(typ.to_pandas_dtype()), ())
    if pa.types.is_fixed_size_list(typ) and _is_number(typ.value_type):
        shape: tuple[int, ...] = (typ.list_size,)
        declared = (field.metadata or {}).get(SHAPE_KEY)
        if declared:
            dims = tuple(int(d) for d in json.loads(declared))
            if int(np.prod(dims)) == typ.list_size:
                shape = dims
        return ColumnSpec(field.name, np.dtype(typ.value_type.to_pandas_dtype()), shape)
    return ColumnSpec(field.name, None, ())


def _is_number(typ: pa.DataType) -> bool:
    return (pa.types.is_integer(typ) or pa.types.is_floating(typ)) and not pa.types.is_float16(typ)


def chunk_arrays(batch: pa.RecordBatch, specs: list[ColumnSpec]) -> dict[str, object]:
    """One record batch as ``{column: numpy array or Arrow array}``, without copying numbers."""
    out: dict[str, object] = {}
    for spec in specs:
        arr = batch.column(spec.name)
        if not spec.numeric:
            out[spec.name] = arr
            continue
        if arr.null_count:
            raise SourceError(
                f"column {spec.name!r} has {arr.null_count} null values, which a tensor cannot hold; "
                f"give a transform for it (transforms={{{spec.name!r}: fn}}) or leave it out of columns"
            )
        if pa.types.is_fixed_size_list(arr.type):
            width = arr.type.list_size
            values = arr.values.slice(arr.offset * width, len(arr) * width)
            out[spec.name] = values.to_numpy(zero_copy_only=True).reshape((len(arr), *spec.shape))
        else:
            out[spec.name] = arr.to_numpy(zero_copy_only=True)
    return out


def empty_like_rows(specs: list[ColumnSpec], rows: int) -> dict[str, np.ndarray]:
    return {s.name: np.empty((rows, *s.shape), dtype=s.dtype) for s in specs if s.numeric}


def concat_rows(parts: list[tuple[dict, int, int]], specs: list[ColumnSpec],
                out: dict[str, np.ndarray] | None = None) -> dict[str, object]:
    """Rows ``[a, b)`` of each part, one after the other; a view when there is one part."""
    if len(parts) == 1 and out is None:
        arrays, a, b = parts[0]
        return {s.name: arrays[s.name][a:b] if s.numeric else arrays[s.name].slice(a, b - a) for s in specs}
    result: dict[str, object] = {}
    for spec in specs:
        if spec.numeric:
            pieces = [arrays[spec.name][a:b] for arrays, a, b in parts]
            target = out.get(spec.name) if out else None
            result[spec.name] = np.concatenate(pieces, out=target) if target is not None else np.concatenate(pieces)
        else:
            result[spec.name] = pa.concat_arrays([arrays[spec.name].slice(a, b - a) for arrays, a, b in parts])
    return result


def take_rows(arrays: dict, rows: np.ndarray, specs: list[ColumnSpec], out: dict[str, np.ndarray] | None = None,
              at: int = 0) -> dict[str, object]:
    """``arrays[rows]`` per column; numbers written into ``out[name][at:at + len(rows)]`` where given."""
    result: dict[str, object] = {}
    for spec in specs:
        if spec.numeric:
            target = out.get(spec.name) if out else None
            if target is None:
                target = np.empty((len(rows), *spec.shape), dtype=spec.dtype)
            elif at or len(target) != len(rows):
                target = target[at: at + len(rows)]
            # mode="clip": with the default "raise", numpy stages ``out`` through a temporary
            # (half the speed); rows are in range by construction.
            result[spec.name] = arrays[spec.name].take(rows, axis=0, out=target, mode="clip")
        else:
            result[spec.name] = arrays[spec.name].take(pa.array(rows))
    return result
