"""Staging as plain functions (no Prefect, no Dask): layout, round trips, idempotence."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from storage.dataset import Dataset
from storage.errors import ConfigError, DestinationError, SourceError
from tasks.datasets import open_builtin
from tasks.staging import StageConfig, commit, group_tasks, plan_stage, split_mask, write_group
from tests.conftest import stage_plain
from tests.tables import rich_table


@pytest.mark.parametrize("codec", ["zstd", "lz4", "none"])
@pytest.mark.parametrize("shard_format", ["arrow", "parquet"])
def test_round_trip_rich_types_local(tmp_path, codec, shard_format):
    src = rich_table(300)
    for i in range(3):
        pq.write_table(src.slice(i * 100, 100), tmp_path / f"part{i}.parquet", row_group_size=40)
    result = stage_plain(source=str(tmp_path / "*.parquet"), dest=str(tmp_path / "out"), codec=codec,
                         shard_format=shard_format, shard_size=2000)
    assert result.rows == 300 and result.shards > 3
    back = Dataset.open(str(tmp_path / "out")).read_table(verify=True)
    assert back.equals(src), "row order and values must survive"


def test_round_trip_memory_filesystem():
    import fsspec

    fs = fsspec.filesystem("memory")
    src = rich_table(120)
    with fs.open("memory://src/data.parquet", "wb") as f:
        pq.write_table(src, f)
    stage_plain(source="memory://src", dest="memory://out/ds", shard_size=3000)
    assert Dataset.open("memory://out/ds").read_table(verify=True).equals(src)


@pytest.mark.parametrize("codec", ["zstd", "lz4", "none"])
def test_round_trip_s3(s3, bucket, codec):
    fs = s3.s3fs()
    src = rich_table(200)
    with fs.open(f"{bucket}/raw/a.parquet", "wb") as f:
        pq.write_table(src.slice(0, 120), f)
    with fs.open(f"{bucket}/raw/b.parquet", "wb") as f:
        pq.write_table(src.slice(120), f)
    opts = s3.storage_options
    result = stage_plain(source=f"s3://{bucket}/raw", dest=f"s3://{bucket}/ds", codec=codec, shard_size=4000,
                         storage_options=opts)
    assert result.rows == 200
    back = Dataset.open(f"s3://{bucket}/ds", opts).read_table(verify=True)
    assert back.equals(src)


def test_csv_jsonl_and_numpy_sources(tmp_path):
    table = pa.table({"id": list(range(30)), "name": [f"n{i}" for i in range(30)], "x": [i * 0.5 for i in range(30)]})
    pacsv.write_csv(table.slice(0, 10), tmp_path / "a.csv")
    (tmp_path / "b.jsonl").write_text(
        "".join(json.dumps({"id": i, "name": f"n{i}", "x": i * 0.5}) + "\n" for i in range(10, 30))
    )
    stage_plain(source=str(tmp_path), dest=str(tmp_path / "out"))
    back = Dataset.open(str(tmp_path / "out")).read_table()
    assert back.column("id").to_pylist() == list(range(30))
    assert back.column("name").to_pylist() == table.column("name").to_pylist()

    images = np.arange(40 * 3 * 4, dtype=np.float32).reshape(40, 3, 4)
    np.savez(tmp_path / "arrays.npz", image=images, label=np.arange(40))
    np.save(tmp_path / "plain.npy", images)
    stage_plain(source=str(tmp_path / "arrays.npz"), dest=str(tmp_path / "npz"))
    ds = Dataset.open(str(tmp_path / "npz"))
    got = np.stack(ds.read_table().column("image").to_numpy(zero_copy_only=False)).reshape(40, 3, 4)
    assert np.array_equal(got, images)
    stats = ds.manifest.metadata.pop("column_stats")  # per-column statistics of the train split (tasks.tables)
    assert ds.manifest.metadata == {"label": "label", "feature": "image", "shape": [3, 4]}
    assert stats == {"label": {"kind": "numeric", "count": 40, "mean": 19.5, "std": stats["label"]["std"], "min": 0.0,
                               "max": 39.0, "nulls": 0, "values": list(range(40))}}
    assert abs(stats["label"]["std"] - np.arange(40).std()) < 1e-9
    stage_plain(source=str(tmp_path / "plain.npy"), dest=str(tmp_path / "npy"), shard_size=100)
    col = Dataset.open(str(tmp_path / "npy")).read_table().column("data")
    assert np.array_equal(np.stack(col.to_numpy(zero_copy_only=False)).reshape(40, 3, 4), images)


def test_builtins_stage_exactly(tmp_path):
    result = stage_plain(source="synthetic-tokens?rows=3000&seq_len=16", dest=str(tmp_path / "t"), shard_size="20KB")
    assert result.shards > 5
    back = Dataset.open(str(tmp_path / "t")).read_table()
    assert back.equals(open_builtin("synthetic-tokens?rows=3000&seq_len=16").read(0, 3000))
    digits = stage_plain(source="digits", dest=str(tmp_path / "d"))
    assert digits.rows == 1797
    assert Dataset.open(str(tmp_path / "d")).manifest.metadata["num_classes"] == 10


def test_split_is_deterministic_and_complete(tmp_path):
    a = stage_plain(source="synthetic?rows=2000&size=4", dest=str(tmp_path / "a"), val_fraction=0.25, shard_size="10KB")
    b = stage_plain(n_groups=1, source="synthetic?rows=2000&size=4", dest=str(tmp_path / "b"), val_fraction=0.25,
                    shard_size="10KB")
    assert a.splits == b.splits and a.manifest_hash == b.manifest_hash, "layout must not depend on the task count"
    assert sum(a.splits.values()) == 2000 and 400 < a.splits["val"] < 600
    ds = Dataset.open(str(tmp_path / "a"))
    full = open_builtin("synthetic?rows=2000&size=4").read(0, 2000)
    mask = split_mask(np.arange(2000), 0, 0.25)
    assert ds.read_table("val").equals(full.filter(pa.array(mask)))
    assert ds.read_table("train").equals(full.filter(pa.array(~mask)))


def test_rerun_skips_and_changes_replace(tmp_path):
    dest = str(tmp_path / "ds")
    first = stage_plain(source="synthetic?rows=3000&size=4", dest=dest, shard_size="10KB")
    assert first.written_shards == first.shards
    again = stage_plain(source="synthetic?rows=3000&size=4", dest=dest, shard_size="10KB")
    assert again.up_to_date and again.written_shards == 0
    # A different codec: everything is new; the old shards go once the new manifest is in.
    third = stage_plain(source="synthetic?rows=3000&size=4", dest=dest, shard_size="10KB", codec="lz4")
    assert third.written_shards == third.shards
    files = sorted(p.relative_to(tmp_path / "ds").as_posix() for p in (tmp_path / "ds").rglob("part-*"))
    kept = {s.name for s in Dataset.open(dest).manifest.shards}
    assert kept <= set(files)  # previous generation may stay for readers of the old manifest
    fourth = stage_plain(source="synthetic?rows=3000&size=4", dest=dest, shard_size="10KB", codec="zstd")
    assert fourth.skipped_shards == fourth.shards, "shards of the previous generation are reused"


def test_rerun_after_partial_write_reuses_shards(tmp_path):
    """A crash after some shards were written: the re-run skips those and commits once."""
    dest = str(tmp_path / "ds")
    plan = plan_stage(StageConfig(source="synthetic?rows=3000&size=4", dest=dest, shard_size="10KB"))
    groups = group_tasks(plan, 4)
    write_group(groups[0])  # ... and then the process died: no manifest
    with pytest.raises(Exception, match="index.json is missing"):
        Dataset.open(dest)
    result = stage_plain(source="synthetic?rows=3000&size=4", dest=dest, shard_size="10KB")
    assert result.skipped_shards >= 1 and result.rows == 3000
    assert Dataset.open(dest).read_table().equals(open_builtin("synthetic?rows=3000&size=4").read(0, 3000))


def test_rerun_removes_the_temporary_of_a_manifest_write_that_was_killed(tmp_path):
    """A SIGKILL between writing the manifest's temporary and renaming it leaves that file:
    the next commit removes it, and never a user's own file at the root."""
    dest = tmp_path / "ds"
    plan = plan_stage(StageConfig(source="synthetic?rows=3000&size=4", dest=str(dest), shard_size="10KB"))
    write_group(group_tasks(plan, 1)[0])
    (dest / ".tmp-0123456789ab-index.json").write_text('{"half": ')  # the killed write
    (dest / "NOTES.txt").write_text("mine")
    stage_plain(source="synthetic?rows=3000&size=4", dest=str(dest), shard_size="10KB")
    assert sorted(p.name for p in dest.iterdir() if p.is_file()) == ["NOTES.txt", "index.json"]


# ------------------------------------------------------------------ bad input, nothing written


def _write_bad_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "fake.parquet").write_text("id,name\n1,a\n")
    (tmp_path / "ragged.csv").write_text("a,b,c\n1,2,3\n4,5,6,7\n")
    (tmp_path / "header_only.csv").write_text("a,b\n")
    conflict = tmp_path / "conflict"
    conflict.mkdir()
    pq.write_table(pa.table({"a": [1, 2], "b": ["x", "y"]}), conflict / "1.parquet")
    pq.write_table(pa.table({"a": ["p", "q"], "b": ["x", "y"]}), conflict / "2.parquet")
    cols = tmp_path / "columns"
    cols.mkdir()
    pq.write_table(pa.table({"a": [1]}), cols / "1.parquet")
    pq.write_table(pa.table({"z": [1]}), cols / "2.parquet")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "a_file").write_text("not a folder")


BAD = [
    (dict(source="{t}/missing.csv"), SourceError, "does not exist"),
    (dict(source="{t}/empty"), SourceError, "holds no input files"),
    (dict(source="{t}/fake.parquet"), SourceError, "is not a valid Parquet file"),
    (dict(source="{t}/ragged.csv"), SourceError, "ragged CSV"),
    (dict(source="{t}/header_only.csv"), SourceError, "zero rows"),
    (dict(source="{t}/conflict"), SourceError, "column 'a' is int64 in .* but string"),
    (dict(source="{t}/columns"), SourceError, "lacks columns \\['a'\\] and adds \\['z'\\]"),
    (dict(source="{t}/objects.npy"), SourceError, "dtype object"),
    (dict(source="nosuchset"), ConfigError, "unknown built-in dataset 'nosuchset'"),
    (dict(source="synthetic?rows=0"), ConfigError, "rows=0 is out of range"),
    (dict(source="synthetic?colour=red"), ConfigError, "unknown parameter"),
    (dict(source="digits", dest="{t}/a_file"), DestinationError, "is an existing file"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD)
def test_bad_input_writes_nothing(tmp_path, kwargs, error, message):
    _write_bad_sources(tmp_path)
    kwargs = {k: v.format(t=tmp_path) for k, v in kwargs.items()}
    kwargs.setdefault("dest", str(tmp_path / "out"))
    with pytest.raises(error, match=message):
        stage_plain(**kwargs)
    assert not (tmp_path / "out").exists()


def test_missing_bucket(s3):
    with pytest.raises(DestinationError, match="bucket 'no-such-bucket' does not exist"):
        stage_plain(source="digits", dest="s3://no-such-bucket/ds", storage_options=s3.storage_options)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(codec="brotli"), "codec"),
        (dict(level=99), "level 99 is out of range for codec 'zstd'"),
        (dict(codec="none", level=3), "takes no level"),
        (dict(shard_size=0), "greater than 0"),
        (dict(shard_size=-5), "greater than 0"),
        (dict(shard_size="lots"), "could not parse"),
        (dict(format="xml"), "format"),
        (dict(val_fraction=1.5), "val_fraction"),
        (dict(storage_options={"aws_secret_access_key": "x"}), "looks like a credential"),
    ],
)
def test_bad_parameters(kwargs, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        StageConfig(source="digits", dest="/tmp/x", **kwargs)
