"""Encoding tables into content-addressed shard files.

A shard's name carries its content hash (``train/part-000003-9f2c….arrow``), so shards
are immutable: a re-run that produces the same bytes finds the file already there and
skips the write, and a new dataset version never overwrites a file the previous
manifest still names. The manifest, written last, is the only thing that switches.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from storage import atomic, formats
from storage.hashing import digest_bytes, digest_file, short
from storage.manifest import ShardEntry

PART_PREFIX = "part-"


@dataclass(frozen=True)
class ShardSpec:
    shard_format: str = formats.DEFAULT_FORMAT
    codec: str = "zstd"
    level: int | None = 3


@dataclass(frozen=True)
class WrittenShard:
    entry: ShardEntry
    skipped: bool


def shard_name(split: str, index: int, digest: str, shard_format: str) -> str:
    return f"{split}/{PART_PREFIX}{index:06d}-{short(digest)}{formats.get(shard_format).suffix}"


def write_shard(fs, root: str, split: str, index: int, table: pa.Table, spec: ShardSpec) -> WrittenShard:
    """Encode ``table`` and store it under ``root`` unless identical bytes are there already."""
    fmt = formats.get(spec.shard_format)
    data = fmt.encode(table.combine_chunks(), spec.codec, spec.level)
    digest = digest_bytes(data)
    name = shard_name(split, index, digest, spec.shard_format)
    path = f"{root.rstrip('/')}/{name}"
    entry = ShardEntry(name=name, split=split, rows=table.num_rows, bytes=len(data), hash=digest, raw_bytes=table.nbytes)
    if _already_there(fs, path, entry):
        return WrittenShard(entry, skipped=True)
    atomic.write_bytes(fs, path, data)
    return WrittenShard(entry, skipped=False)


def _already_there(fs, path: str, entry: ShardEntry) -> bool:
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return False
    if int(info.get("size") or -1) != entry.bytes:
        return False
    return digest_file(fs, path) == entry.hash
