import json
import os

import fsspec
import pyarrow as pa
import pytest

from storage import manifest as manifest_mod
from storage.dataset import Dataset
from storage.errors import IntegrityError, ManifestError
from storage.hashing import digest_bytes, sealed_json
from storage.manifest import Manifest, ShardEntry


def _dataset(tmp_path, names=("train/part-000000-a.arrow",)):
    from storage import formats

    table = pa.table({"x": [1, 2, 3]})
    data = formats.get("arrow").encode(table, "zstd", 3)
    entries = []
    for name in names:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        entries.append(ShardEntry(name, "train", 3, len(data), digest_bytes(data), table.nbytes))
    m = Manifest("arrow", "zstd", 3, table.schema, entries)
    manifest_mod.write(fsspec.filesystem("file"), str(tmp_path), m)
    return m


def test_round_trip(tmp_path):
    m = _dataset(tmp_path)
    ds = Dataset.open(str(tmp_path))
    assert ds.manifest.shards == m.shards
    assert ds.read_table(verify=True).column("x").to_pylist() == [1, 2, 3]
    doc = json.loads((tmp_path / "index.json").read_text())
    assert doc["format"] == "swarm-dataset" and doc["version"] == 2 and doc["checksum"].startswith("sha256:")
    assert {"name", "rows", "bytes", "hash"} <= set(doc["shards"][0])


def _edit(tmp_path, fn):
    """Change the manifest as a crafted one would be: checksum recomputed."""
    path = tmp_path / "index.json"
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_bytes(sealed_json(doc))


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: d.update(version=99), "version 99; this build reads versions 1, 2"),
        (lambda d: d.update(format="webdataset"), "not a Swarm dataset manifest"),
        (lambda d: d.update(shard_format="orc"), "unknown shard format 'orc'"),
        (lambda d: d.update(codec="brotli"), "unknown codec 'brotli'"),
        (lambda d: d["shards"][0].update(name="../outside.arrow"), "leaves the dataset root"),
        (lambda d: d["shards"][0].update(name="/etc/passwd"), "not a relative path"),
        (lambda d: d["shards"][0].update(name="s3://other/x.arrow"), "not a relative path"),
        (lambda d: d["shards"][0].update(name="train/../../x"), "leaves the dataset root"),
        (lambda d: d.pop("shards"), "malformed"),
    ],
)
def test_reader_refuses(tmp_path, edit, message):
    _dataset(tmp_path)
    _edit(tmp_path, edit)
    with pytest.raises(ManifestError, match=message):
        Dataset.open(str(tmp_path))


def test_damage_is_detected_by_the_checksum(tmp_path):
    _dataset(tmp_path)
    path = tmp_path / "index.json"
    path.write_text(path.read_text().replace('"rows": 3', '"rows": 4', 1))
    with pytest.raises(IntegrityError, match="index.json is corrupt: its checksum does not match"):
        Dataset.open(str(tmp_path))
    doc = json.loads(path.read_text())
    doc.pop("checksum")
    path.write_text(json.dumps(doc))
    with pytest.raises(IntegrityError, match="'checksum' field is missing"):
        Dataset.open(str(tmp_path))
    doc.update(version=1)  # written before manifests carried checksums: still read
    path.write_text(json.dumps(doc))
    assert Dataset.open(str(tmp_path)).read_table().num_rows == 3


def test_not_json(tmp_path):
    (tmp_path / "index.json").write_text("{nope")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Dataset.open(str(tmp_path))


def test_missing_manifest_means_no_dataset(tmp_path):
    with pytest.raises(ManifestError, match="index.json is missing"):
        Dataset.open(str(tmp_path))


def test_symlink_out_of_root_is_refused(tmp_path):
    _dataset(tmp_path)
    outside = tmp_path.parent / f"{tmp_path.name}-secret.arrow"
    outside.write_bytes(b"secret")
    shard = tmp_path / "train/part-000000-a.arrow"
    shard.unlink()
    os.symlink(outside, shard)
    ds = Dataset.open(str(tmp_path))
    with pytest.raises(ManifestError, match="outside the dataset root"):
        ds.read_table()


def test_hash_verification(tmp_path):
    _dataset(tmp_path)
    shard = tmp_path / "train/part-000000-a.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    ds = Dataset.open(str(tmp_path))
    with pytest.raises(IntegrityError, match="corrupt"):
        ds.verify()


def test_manifest_write_is_atomic(tmp_path, monkeypatch):
    """A crash while writing the manifest leaves the previous one intact."""
    old = _dataset(tmp_path)
    import storage.atomic as atomic

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", boom)
    with pytest.raises(OSError):
        manifest_mod.write(fsspec.filesystem("file"), str(tmp_path), Manifest("arrow", "zstd", 3, old.schema, []))
    assert Dataset.open(str(tmp_path)).manifest.shards == old.shards
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []
