"""Source files for staging: listing, inspection and reading, any fsspec URL.

A source is a file, a folder (searched recursively), or a glob, of Parquet, CSV, JSON
Lines or NumPy files, or of plain text files (``.txt``, ``.md``, ``.py``: one row, column
``text``, per file; chosen by ``format="text"``, or in ``auto`` where no data files match). Inspection reads schemas and row counts up front, so every bad
input is refused before anything is written. Reading is split into *units* (Parquet row
groups, NumPy row ranges, whole CSV/JSONL files) that staging groups into coarse tasks.

NumPy: a ``.npz`` file's arrays are its columns (``np.savez(f, image=x, label=y)``);
a ``.npy`` file is one column named ``data``. Arrays with more than one dimension become
fixed-size lists with their per-row shape in the field metadata (``swarm.shape``).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from storage.errors import ConfigError, SourceError
from storage.urls import is_local, url_to_fs

SOURCE_FORMATS = ("auto", "parquet", "csv", "jsonl", "npy", "text", "images")  # images: storage.image_sources
EXTENSIONS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".npy": "npy",
    ".npz": "npy",
}
TEXT_FILE_EXTENSIONS = (".txt", ".md", ".py")
TEXT_COLUMN = "text"
TEXT_FORMATS = ("csv", "jsonl")
SHAPE_KEY = b"swarm.shape"
NPY_COLUMN = "data"


@dataclass(frozen=True)
class SourceFile:
    url: str
    format: str
    size: int
    version: str  # mtime or ETag: what changes when the content does


@dataclass(frozen=True)
class SourceUnit:
    """A piece of a source that one task reads: a file, or a row range inside it."""

    url: str
    format: str
    start: int = 0
    stop: int | None = None
    rows: int = 0
    raw_bytes: int = 0


@dataclass
class InspectedFile:
    file: SourceFile
    schema: pa.Schema
    rows: int
    units: list[SourceUnit] = field(default_factory=list)


def _format_of(path: str, fmt: str) -> str | None:
    if fmt != "auto":
        return fmt
    lower = path.lower()
    for ext, name in EXTENSIONS.items():
        if lower.endswith(ext):
            return name
    return None


def list_files(url: str, fmt: str = "auto", storage_options: dict | None = None) -> list[SourceFile]:
    """The files a source URL names, sorted, each with its format."""
    if fmt not in SOURCE_FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; allowed: {', '.join(SOURCE_FORMATS)}")
    fs, path = url_to_fs(url, storage_options)
    try:
        if any(ch in path for ch in "*?["):
            infos = fs.glob(path, detail=True)
            infos = {p: i for p, i in infos.items() if i.get("type") != "directory"}
        elif fs.isdir(path):
            infos = fs.find(path, detail=True)
        elif fs.exists(path):
            infos = {path: fs.info(path)}
        else:
            raise SourceError(f"source {url!r} does not exist")
    except SourceError:
        raise
    except (FileNotFoundError, PermissionError, OSError) as exc:
        raise SourceError(f"cannot list source {url!r}: {exc}") from None
    files, texts = [], []
    for p in sorted(infos):
        name = p.rsplit("/", 1)[-1]
        if name.startswith(".") or (name.startswith("_") and not name.lower().endswith(TEXT_FILE_EXTENSIONS)):
            continue  # hidden files, _SUCCESS markers, our own temporaries (but _private.py, __init__.py count)
        file_fmt = _format_of(p, fmt)
        if file_fmt is None and not p.lower().endswith(TEXT_FILE_EXTENSIONS):
            continue
        info = infos[p]
        version = str(info.get("ETag") or info.get("mtime") or info.get("LastModified") or info.get("created") or "")
        found = SourceFile(fs.unstrip_protocol(p), file_fmt or "text", int(info.get("size") or 0), version)
        (files if file_fmt else texts).append(found)
    files = files or texts  # text files count in ``auto`` only where no data files match
    if not files:
        wanted = (", ".join(sorted(EXTENSIONS) + list(TEXT_FILE_EXTENSIONS)) + ", or images (.jpg, .jpeg, .png, .webp) "
                  "in one folder per class") if fmt == "auto" else f"{fmt} files"
        raise SourceError(f"source {url!r} holds no input files (looked for {wanted})")
    return files


def fingerprint(files: list[SourceFile]) -> str:
    body = json.dumps([[f.url, f.size, f.version, f.format] for f in files])
    return "sha256:" + hashlib.sha256(body.encode()).hexdigest()


# --------------------------------------------------------------------------- inspection


def inspect(file: SourceFile, unit_bytes: int, storage_options: dict | None = None) -> InspectedFile:
    """Read a file's schema and row count, and cut it into units of about ``unit_bytes``."""
    fs, path = url_to_fs(file.url, storage_options)
    try:
        if file.format == "parquet":
            return _inspect_parquet(fs, path, file)
        if file.format == "npy":
            return _inspect_numpy(fs, path, file, unit_bytes)
        if file.format == "text":  # one document per file: nothing to read before staging
            unit = SourceUnit(file.url, "text", 0, None, 1, max(1, file.size))
            return InspectedFile(file, TEXT_SCHEMA, 1, [unit])
        table = _read_text(fs, path, file.url, file.format, schema=None)
        unit = SourceUnit(file.url, file.format, 0, None, table.num_rows, table.nbytes)
        return InspectedFile(file, table.schema, table.num_rows, [unit])
    except SourceError:
        raise
    except FileNotFoundError:
        raise SourceError(f"source file {file.url!r} disappeared while staging") from None
    except (pa.ArrowException, ValueError, OSError, EOFError) as exc:
        raise SourceError(f"{file.url!r} is not a valid {_FORMAT_NAMES[file.format]} file: {_short(exc)}") from None


_FORMAT_NAMES = {"parquet": "Parquet", "csv": "CSV", "jsonl": "JSON Lines", "npy": "NumPy", "text": "text"}
TEXT_SCHEMA = pa.schema([pa.field(TEXT_COLUMN, pa.string())])


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:300]


def _inspect_parquet(fs, path: str, file: SourceFile) -> InspectedFile:
    with fs.open(path, "rb") as f:
        meta = pq.ParquetFile(f).metadata
        schema = pq.ParquetFile(f).schema_arrow
    groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
    units = [
        SourceUnit(file.url, "parquet", i, i + 1, g.num_rows, _decoded_bytes(g, schema))
        for i, g in enumerate(groups)
        if g.num_rows > 0
    ]
    return InspectedFile(file, schema, meta.num_rows, units)


def _decoded_bytes(row_group, schema: pa.Schema) -> int:
    """A row group's size once decoded into Arrow: exact for fixed-width columns.

    Parquet's own sizes are of *encoded* pages; dictionary and RLE encodings shrink
    fixed-width data (token ids, pixels) several-fold, which would make shards several
    times larger than their target. Other columns count their encoded size.
    """
    encoded: dict[str, int] = {}
    for i in range(row_group.num_columns):
        column = row_group.column(i)
        top = column.path_in_schema.split(".", 1)[0]
        encoded[top] = encoded.get(top, 0) + column.total_uncompressed_size
    total = 0
    for fld in schema:
        width = _fixed_width(fld.type)
        total += row_group.num_rows * width if width else encoded.get(fld.name, 0)
    return total or row_group.total_byte_size


def _fixed_width(data_type: pa.DataType) -> int | None:
    """Bytes per row of a fixed-width Arrow type, else None."""
    if pa.types.is_fixed_size_list(data_type):
        inner = _fixed_width(data_type.value_type)
        return inner * data_type.list_size if inner else None
    if pa.types.is_struct(data_type):
        widths = [_fixed_width(data_type.field(i).type) for i in range(data_type.num_fields)]
        return sum(widths) if all(widths) else None
    if pa.types.is_dictionary(data_type):
        return None
    try:
        return max(1, data_type.bit_width // 8)
    except ValueError:
        return None


def _npy_header(f) -> tuple[tuple, bool, np.dtype, int]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    return shape, fortran, dtype, f.tell()


def _inspect_numpy(fs, path: str, file: SourceFile, unit_bytes: int) -> InspectedFile:
    if path.lower().endswith(".npz"):
        table = _read_npz(fs, path, file.url)
        unit = SourceUnit(file.url, "npy", 0, None, table.num_rows, table.nbytes)
        return InspectedFile(file, table.schema, table.num_rows, [unit])
    with fs.open(path, "rb") as f:
        shape, fortran, dtype, _ = _npy_header(f)
    _check_dtype(dtype, file.url)
    if not shape:
        raise SourceError(f"{file.url!r} holds a scalar, not rows of data")
    rows = shape[0]
    row_bytes = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
    schema = pa.schema([_numpy_field(NPY_COLUMN, dtype, shape[1:])])
    step = rows if fortran else max(1, unit_bytes // row_bytes)
    units = [
        SourceUnit(file.url, "npy", s, min(rows, s + step), min(rows, s + step) - s, (min(rows, s + step) - s) * row_bytes)
        for s in range(0, rows, step)
    ]
    return InspectedFile(file, schema, rows, units)


def _check_dtype(dtype: np.dtype, url: str) -> None:
    if dtype.hasobject or dtype.kind in "cV":
        raise SourceError(
            f"{url!r} has NumPy dtype {dtype}; allowed: bool, integer, float, str, bytes and datetime64 "
            "(object arrays would need pickle, which is refused)"
        )


def _numpy_field(name: str, dtype: np.dtype, row_shape: tuple) -> pa.Field:
    value_type = pa.from_numpy_dtype(dtype)
    if not row_shape:
        return pa.field(name, value_type)
    width = int(np.prod(row_shape))
    return pa.field(name, pa.list_(value_type, width), metadata={SHAPE_KEY: json.dumps(list(row_shape)).encode()})


def numpy_table(arrays: dict[str, np.ndarray], url: str = "<arrays>") -> pa.Table:
    """Columns from NumPy arrays that share their first dimension."""
    lengths = {k: (a.shape[0] if a.ndim else None) for k, a in arrays.items()}
    if any(v is None for v in lengths.values()):
        raise SourceError(f"{url!r}: arrays must have a row dimension (got shapes {[a.shape for a in arrays.values()]})")
    if len(set(lengths.values())) > 1:
        raise SourceError(f"{url!r}: arrays have different row counts {lengths}; columns must be equally long")
    columns, fields = [], []
    for name, arr in arrays.items():
        _check_dtype(arr.dtype, url)
        fld = _numpy_field(name, arr.dtype, arr.shape[1:])
        flat = np.ascontiguousarray(arr).reshape(-1)
        values = pa.array(flat, type=pa.from_numpy_dtype(arr.dtype))
        col = values if arr.ndim == 1 else pa.FixedSizeListArray.from_arrays(values, fld.type.list_size)
        columns.append(col)
        fields.append(fld)
    return pa.Table.from_arrays(columns, schema=pa.schema(fields))


def _read_npz(fs, path: str, url: str) -> pa.Table:
    with fs.open(path, "rb") as f:
        with np.load(f, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    if not arrays:
        raise SourceError(f"{url!r} holds no arrays")
    return numpy_table(arrays, url)


def _read_text(fs, path: str, url: str, fmt: str, schema: pa.Schema | None) -> pa.Table:
    with fs.open(path, "rb") as f:
        if fmt == "csv":
            convert = pacsv.ConvertOptions(column_types=schema) if schema is not None else None
            try:
                return pacsv.read_csv(f, convert_options=convert)
            except pa.ArrowInvalid as exc:
                msg = _short(exc)
                if "Expected" in msg and "columns" in msg:
                    raise SourceError(f"{url!r} is a ragged CSV (rows with differing numbers of fields): {msg}") from None
                raise
        parse = pajson.ParseOptions(explicit_schema=schema) if schema is not None else None
        return pajson.read_json(f, parse_options=parse)


# --------------------------------------------------------------------------- schemas


def unify(inspected: list[InspectedFile]) -> pa.Schema:
    """One schema for all files, or a :class:`SourceError` naming the conflict."""
    first = inspected[0]
    names = set(first.schema.names)
    for other in inspected[1:]:
        if set(other.schema.names) != names:
            missing = sorted(names - set(other.schema.names))
            extra = sorted(set(other.schema.names) - names)
            raise SourceError(
                f"source files have conflicting schemas: {other.file.url!r} "
                f"lacks columns {missing} and adds {extra} compared with {first.file.url!r}"
            )
    permissive = any(i.file.format in TEXT_FORMATS for i in inspected)
    schemas = [i.schema for i in inspected]
    try:
        unified = pa.unify_schemas(schemas, promote_options="permissive" if permissive else "default")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        unified = None
    if unified is None or (permissive and _lossy(unified, schemas)):
        for other in inspected[1:]:
            for fld in first.schema:
                t2 = other.schema.field(fld.name).type
                if t2 != fld.type:
                    raise SourceError(
                        f"source files have conflicting schemas: column {fld.name!r} is {fld.type} "
                        f"in {first.file.url!r} but {t2} in {other.file.url!r}"
                    )
        raise SourceError("source files have conflicting schemas")
    return pa.schema([unified.field(n) for n in first.schema.names], metadata=first.schema.metadata)


def _lossy(unified: pa.Schema, schemas: list[pa.Schema]) -> bool:
    """Whether permissive promotion turned a number or a timestamp into text."""
    for fld in unified:
        if pa.types.is_string(fld.type) or pa.types.is_large_string(fld.type):
            kinds = {str(s.field(fld.name).type) for s in schemas} - {"null"}
            if kinds - {"string", "large_string"}:
                return True
    return False


# --------------------------------------------------------------------------- reading


def read_unit(unit: SourceUnit, schema: pa.Schema, storage_options: dict | None = None) -> pa.Table:
    """Read one unit and conform it to the unified schema."""
    fs, path = url_to_fs(unit.url, storage_options)
    try:
        if unit.format == "parquet":
            with _open_for_arrow(fs, path) as f:
                table = pq.ParquetFile(f).read_row_groups(list(range(unit.start, unit.stop)))
        elif unit.format == "npy":
            table = _read_npz(fs, path, unit.url) if path.lower().endswith(".npz") else _read_npy_rows(fs, path, unit)
        elif unit.format == "text":
            table = _read_text_file(fs, path, unit.url)
        else:
            table = _read_text(fs, path, unit.url, unit.format, schema)
    except SourceError:
        raise
    except FileNotFoundError:
        raise SourceError(f"source file {unit.url!r} disappeared while staging") from None
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise SourceError(f"cannot read {unit.url!r}: {_short(exc)}") from None
    table = table.select(schema.names)
    if table.schema != schema:
        table = table.cast(schema)
    return table


def _read_text_file(fs, path: str, url: str) -> pa.Table:
    data = fs.cat_file(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{url!r} is not UTF-8 text ({exc.reason} at byte {exc.start}); convert it to UTF-8") from None
    return pa.table({TEXT_COLUMN: pa.array([text], pa.string())})


def _open_for_arrow(fs, path: str):
    """A file Arrow reads without Python in the loop: native for local files, fsspec's otherwise.

    Through a Python file object every read is a new ``bytes`` (in a Dask worker, a fresh
    page-faulted mapping each time) that Arrow then copies; natively it reads into its own
    pool. Worth about a tenth of a worker's CPU when staging Parquet images.
    """
    if is_local(fs):
        return pa.OSFile(path)
    return fs.open(path, "rb")


def _read_npy_rows(fs, path: str, unit: SourceUnit) -> pa.Table:
    with fs.open(path, "rb") as f:
        shape, fortran, dtype, offset = _npy_header(f)
        if fortran:
            f.seek(offset)
            arr = np.asfortranarray(np.frombuffer(f.read(), dtype=dtype).reshape(shape[::-1]).T)
            arr = np.ascontiguousarray(arr)
        else:
            row_items = int(np.prod(shape[1:], dtype=np.int64))
            row_bytes = row_items * dtype.itemsize
            f.seek(offset + unit.start * row_bytes)
            count = unit.stop - unit.start
            buf = f.read(count * row_bytes)
            if len(buf) != count * row_bytes:
                raise SourceError(f"{unit.url!r} is truncated: expected {count * row_bytes} bytes at row {unit.start}")
            arr = np.frombuffer(buf, dtype=dtype).reshape((count, *shape[1:]))
    return numpy_table({NPY_COLUMN: arr}, unit.url)


def unit_groups(units: list[SourceUnit], n_groups: int) -> list[list[SourceUnit]]:
    """Split units, in order, into at most ``n_groups`` contiguous runs of similar bytes."""
    if not units:
        return []
    n_groups = max(1, min(n_groups, len(units)))
    total = sum(max(1, u.raw_bytes) for u in units)
    target = math.ceil(total / n_groups)
    groups: list[list[SourceUnit]] = [[]]
    acc = 0
    for i, u in enumerate(units):
        remaining_units = len(units) - i
        remaining_groups = n_groups - len(groups)
        if groups[-1] and (acc >= target or remaining_units <= remaining_groups):
            groups.append([])
            acc = 0
        groups[-1].append(u)
        acc += max(1, u.raw_bytes)
    return groups

