"""Shard file formats: an encoder/decoder pair per format, tested on bytes alone.

Measured on this machine (pyarrow 26, 2 cores; `benchmarks/stage_bench.py` and the
notes in BENCHMARKS.md):

=============  ===========  ===========  =============================================
data           Arrow IPC    Parquet      note
=============  ===========  ===========  =============================================
tokens int32   0.32 size    0.31 size    IPC encodes 1.5x, decodes 2x faster
image uint8    0.80 size    0.80 size    Parquet encodes 12x, decodes 9x slower
               617 MB/s enc  50 MB/s enc  (per-value list levels on fixed-size lists)
small floats   0.22 size    0.15 size    Parquet's dictionary pages win on size
=============  ===========  ===========  =============================================

Arrow IPC (the random-access *file* variant) is the default: it is the fastest to write
and to decode, round-trips every Arrow type exactly, and an uncompressed IPC file can be
memory-mapped for zero-copy reads (the decoded cache tier). Parquet stays available for
tables of low-entropy columns where its encodings make files markedly smaller and for
interchange with other tools.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from storage.codecs import arrow_codec
from storage.errors import ConfigError

# Encoders return a memoryview of the Arrow buffer, not a copy as ``bytes``: a shard is
# hashed and written straight from Arrow's memory pool. (Dask workers run with a low
# MALLOC_TRIM_THRESHOLD_, so every large ``bytes`` is a fresh, page-faulted mapping; the
# copy cost workers about a tenth of their CPU when staging images.)

#: Rows are grouped into record batches / row groups of about this many decoded bytes,
#: so readers can stream a shard in pieces without holding the whole of it twice.
BATCH_BYTES = 4 << 20


def rows_per_batch(table: pa.Table) -> int:
    if table.num_rows == 0:
        return 1
    per_row = max(1, table.nbytes // table.num_rows)
    return max(1, min(table.num_rows, BATCH_BYTES // per_row))


def _encode_arrow(table: pa.Table, codec: str, level: int | None) -> memoryview:
    options = ipc.IpcWriteOptions(compression=arrow_codec(codec, level))
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema, options=options) as writer:
        writer.write_table(table, max_chunksize=rows_per_batch(table))
    return memoryview(sink.getvalue())


def _decode_arrow(source) -> pa.Table:
    return ipc.open_file(_as_input(source)).read_all()


def _encode_parquet(table: pa.Table, codec: str, level: int | None) -> memoryview:
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        compression=codec if codec != "none" else "none",
        compression_level=level,
        row_group_size=rows_per_batch(table),
        store_schema=True,
    )
    return memoryview(sink.getvalue())


def _decode_parquet(source) -> pa.Table:
    return pq.read_table(_as_input(source))


def _as_input(source):
    if isinstance(source, (bytes, bytearray, memoryview)):
        return pa.BufferReader(source)
    return source


@dataclass(frozen=True)
class ShardFormat:
    name: str
    suffix: str
    encode: Callable[[pa.Table, str, int | None], memoryview]
    decode: Callable[[object], pa.Table]


FORMATS: dict[str, ShardFormat] = {
    "arrow": ShardFormat("arrow", ".arrow", _encode_arrow, _decode_arrow),
    "parquet": ShardFormat("parquet", ".parquet", _encode_parquet, _decode_parquet),
}
DEFAULT_FORMAT = "arrow"


def register(fmt: ShardFormat, clobber: bool = False) -> None:
    if fmt.name in FORMATS and not clobber:
        raise ValueError(f"shard format {fmt.name!r} is already registered")
    FORMATS[fmt.name] = fmt


def get(name: str) -> ShardFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ConfigError(
            f"unknown shard format {name!r}; allowed: {', '.join(FORMATS)}"
        ) from None
