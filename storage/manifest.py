"""The dataset manifest, ``index.json``: what a dataset is.

A dataset without a manifest does not exist. The manifest is written last and
atomically, after every shard it names; it describes itself (``format``, ``version``),
its schema, and per shard the relative name, split, rows, bytes and content hash.
Since version 2 it carries the digest of its own content (``checksum``), so a damaged
manifest is refused by name instead of read as a different dataset. Loading refuses
unknown formats and versions and any shard name that leaves the root.
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from storage import atomic, codecs, formats
from storage.errors import ManifestError, SwarmError
from storage.hashing import check_sealed, sealed_json
from storage.urls import safe_relative

log = logging.getLogger(__name__)

MANIFEST_NAME = "index.json"
FORMAT_ID = "swarm-dataset"
VERSION = 2
SUPPORTED_VERSIONS = (1, 2)  # 1: without a checksum
_RESTAGE = "stage the dataset again (swarm stage …) to rewrite it"


@dataclass(frozen=True)
class ShardEntry:
    name: str
    split: str
    rows: int
    bytes: int
    hash: str
    raw_bytes: int = 0


@dataclass
class Manifest:
    shard_format: str
    codec: str
    level: int | None
    schema: pa.Schema
    shards: list[ShardEntry]
    metadata: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    created: str = ""

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def splits(self) -> list[str]:
        return sorted({s.split for s in self.shards})

    def shards_for(self, split: str | None) -> list[ShardEntry]:
        if split is None:
            return list(self.shards)
        if split not in self.splits:
            raise ManifestError(
                f"split {split!r} is not in this dataset; it has: {', '.join(self.splits) or 'none'}"
            )
        return [s for s in self.shards if s.split == split]

    def content_hash(self) -> str:
        """A digest of what the dataset holds (shard hashes and schema), not of when."""
        from storage.hashing import digest_bytes

        body = json.dumps(
            [[s.name, s.split, s.hash] for s in self.shards] + [_schema_b64(self.schema)],
            separators=(",", ":"),
        )
        return digest_bytes(body.encode())

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT_ID,
            "version": VERSION,
            "shard_format": self.shard_format,
            "codec": self.codec,
            "level": self.level,
            "rows": self.rows,
            "bytes": self.bytes,
            "schema": {
                "fields": [
                    {"name": f.name, "type": str(f.type), "nullable": f.nullable}
                    for f in self.schema
                ],
                "arrow": _schema_b64(self.schema),
            },
            "metadata": self.metadata,
            "source": self.source,
            "created": self.created,
            "shards": [asdict(s) for s in self.shards],
        }
        return sealed_json(doc)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = MANIFEST_NAME) -> "Manifest":
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ManifestError(f"{where} is not valid JSON: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_ID:
            raise ManifestError(
                f"{where} is not a Swarm dataset manifest (expected format {FORMAT_ID!r}, "
                f"got {doc.get('format') if isinstance(doc, dict) else type(doc).__name__!r})"
            )
        version = doc.get("version")
        if version not in SUPPORTED_VERSIONS:
            raise ManifestError(
                f"{where} has version {version!r}; this build reads versions "
                f"{', '.join(map(str, SUPPORTED_VERSIONS))}"
            )
        check_sealed(doc, where, required=version >= 2, fix=_RESTAGE)
        try:
            shard_format = doc["shard_format"]
            if shard_format not in formats.FORMATS:
                raise ManifestError(
                    f"{where}: unknown shard format {shard_format!r}; "
                    f"allowed: {', '.join(formats.FORMATS)}"
                )
            codec = doc["codec"]
            if codec not in codecs.CODECS:
                raise ManifestError(
                    f"{where}: unknown codec {codec!r}; allowed: {', '.join(codecs.CODECS)}"
                )
            schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(doc["schema"]["arrow"])))
            shards = [_shard_entry(raw, where) for raw in doc["shards"]]
        except SwarmError:
            raise
        except (KeyError, TypeError, ValueError, pa.ArrowInvalid) as exc:
            raise ManifestError(f"{where} is malformed: {type(exc).__name__}: {exc}") from None
        names = [s.name for s in shards]
        if len(set(names)) != len(names):
            raise ManifestError(f"{where} names a shard more than once")
        return cls(
            shard_format=shard_format,
            codec=codec,
            level=doc.get("level"),
            schema=schema,
            shards=shards,
            metadata=dict(doc.get("metadata") or {}),
            source=dict(doc.get("source") or {}),
            created=str(doc.get("created", "")),
        )


def _shard_entry(raw: dict, where: str) -> ShardEntry:
    name = safe_relative(raw["name"], what=f"{where}: shard name")
    entry = ShardEntry(
        name=name,
        split=str(raw["split"]),
        rows=int(raw["rows"]),
        bytes=int(raw["bytes"]),
        hash=str(raw["hash"]),
        raw_bytes=int(raw.get("raw_bytes", 0)),
    )
    if entry.rows < 0 or entry.bytes < 0 or ":" not in entry.hash:
        raise ManifestError(f"{where}: shard {name!r} has invalid rows, bytes or hash")
    return entry


def _schema_b64(schema: pa.Schema) -> str:
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def write(fs, root: str, manifest: Manifest) -> None:
    """Commit a dataset: atomically replace ``root/index.json``."""
    atomic.write_bytes(fs, _path(root), manifest.to_json())


def read(fs, root: str) -> Manifest:
    path = _path(root)
    try:
        text = fs.cat_file(path)
    except FileNotFoundError:
        raise ManifestError(
            f"no dataset at {root!r}: {MANIFEST_NAME} is missing (stage one with `swarm stage`)"
        ) from None
    return Manifest.from_json(text, where=path)


def read_if_exists(fs, root: str) -> Manifest | None:
    """The manifest at ``root``, or None where there is none or it cannot be used (a writer
    about to replace it, staging again for one, needs nothing from a damaged manifest)."""
    path = _path(root)
    try:
        text = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        return Manifest.from_json(text, where=path)
    except SwarmError as exc:
        log.warning("ignoring the manifest %r: %s", path, exc)
        return None


def _path(root: str) -> str:
    return f"{root.rstrip('/')}/{MANIFEST_NAME}"
