"""Reading a staged dataset: manifest plus shards, each checked against its recorded hash."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa

from storage import formats, manifest as manifest_mod
from storage.errors import IntegrityError, ManifestError, StorageUnreachable
from storage.hashing import digest_bytes
from storage.manifest import Manifest, ShardEntry
from storage.reach import missing_bucket, reaching
from storage.urls import is_local, protocol_of, url_to_fs


@dataclass
class Dataset:
    """A staged dataset opened from its root URL."""

    url: str
    fs: Any
    root: str
    manifest: Manifest

    @classmethod
    def open(cls, url: str, storage_options: dict[str, Any] | None = None) -> "Dataset":
        fs, root = url_to_fs(url, storage_options)
        root = root.rstrip("/")
        with reaching(url):
            try:
                manifest = manifest_mod.read(fs, root)
            except ManifestError:
                missing = missing_bucket(fs, root, url)
                if missing:
                    raise StorageUnreachable(missing) from None
                raise
        return cls(url=url, fs=fs, root=root, manifest=manifest)

    @property
    def schema(self) -> pa.Schema:
        return self.manifest.schema

    def shards(self, split: str | None = None) -> list[ShardEntry]:
        return self.manifest.shards_for(split)

    def shard_path(self, entry: ShardEntry) -> str:
        return path_inside(self.fs, self.root, entry.name)

    def read_shard_bytes(self, entry: ShardEntry, verify: bool = True) -> bytes:
        path = self.shard_path(entry)
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            raise ManifestError(f"shard {entry.name!r} named in the manifest is missing at {path!r}") from None
        if verify:
            check_bytes(data, entry, where=path)
        return data

    def read_shard(self, entry: ShardEntry, verify: bool = True) -> pa.Table:
        data = self.read_shard_bytes(entry, verify=verify)
        table = formats.get(self.manifest.shard_format).decode(data)
        check_rows(table, entry, where=f"{self.root}/{entry.name}")
        return table

    def iter_tables(self, split: str | None = None, verify: bool = True) -> Iterator[pa.Table]:
        for entry in self.shards(split):
            yield self.read_shard(entry, verify=verify)

    def read_table(self, split: str | None = None, verify: bool = True) -> pa.Table:
        tables = list(self.iter_tables(split, verify=verify))
        if not tables:
            return self.schema.empty_table()
        return pa.concat_tables(tables)

    def verify(self) -> None:
        """Check every shard against its recorded size and hash."""
        for entry in self.shards():
            self.read_shard_bytes(entry, verify=True)


def path_inside(fs, root: str, name: str) -> str:
    """``root/name``; on local disk (under a shard cache too), refused where a symlink leads
    it out of the dataset root. ``name`` is already a safe relative name (see the manifest)."""
    path = f"{root}/{name}"
    local = fs.fs if protocol_of(fs) == "shardcache" else fs
    if is_local(local):
        real_root = os.path.realpath(root)
        real = os.path.realpath(path)
        if os.path.commonpath([real_root, real]) != real_root:
            raise ManifestError(f"shard {name!r} resolves to {real!r}, outside the dataset root {real_root!r}")
    return path


def check_bytes(data: bytes, entry: ShardEntry, where: str) -> None:
    if len(data) != entry.bytes:
        raise IntegrityError(
            f"shard {where!r} has {len(data)} bytes, the manifest says {entry.bytes}"
        )
    got = digest_bytes(data)
    if got != entry.hash:
        raise IntegrityError(f"shard {where!r} is corrupt: hash {got} != manifest {entry.hash}")


def check_rows(table: pa.Table, entry: ShardEntry, where: str) -> None:
    if table.num_rows != entry.rows:
        raise IntegrityError(f"shard {where!r} holds {table.num_rows} rows, the manifest says {entry.rows}")
