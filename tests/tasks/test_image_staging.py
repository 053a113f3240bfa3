"""Image folders: staged as encoded bytes (or decoded), trained with the built-in CNN sized
from the manifest; bad files named by path or skipped with a count; S3 through moto."""

from __future__ import annotations

import pyarrow as pa
import pytest

from storage.dataset import Dataset
from storage.errors import SourceError
from tasks.training import TrainConfig, prepare_training
from tasks.training.rank import RankJob, train_rank
from tests.conftest import infer_plain, stage_plain
from tests.images import COLOURS, local_writer as _local_writer, write_image_folder

def _train(dest: str, tmp_path, storage_options=None, epochs: int = 4):
    cfg = TrainConfig(dataset=dest, epochs=epochs, batch_size=8, checkpoint_dir=str(tmp_path / "ckpt"),
                      storage_options=storage_options or {})
    plan = prepare_training(cfg)
    return plan, train_rank(RankJob(cfg, plan.model_name, plan.model_args, plan.columns))


def test_image_folder_bad_file_named_then_skipped_and_cnn_trains(tmp_path):
    files = write_image_folder(_local_writer(tmp_path / "src"))
    dest = tmp_path / "ds"
    with pytest.raises(SourceError, match=r"1 image\(s\) in .* do not decode .*'cat/broken\.jpg'.*--skip-bad"):
        stage_plain(source=str(tmp_path / "src"), dest=str(dest), val_fraction=0.25, image_size=16)
    assert not dest.exists()  # nothing half-written

    result = stage_plain(source=str(tmp_path / "src"), dest=str(dest), val_fraction=0.25, image_size=16,
                         skip_bad=True)
    again = stage_plain(source=str(tmp_path / "src"), dest=str(dest), val_fraction=0.25, image_size=16,
                        skip_bad=True)
    assert again.up_to_date and again.manifest_hash == result.manifest_hash
    with pytest.raises(SourceError, match="cat/broken"):  # not "already staged": skipping was asked for before
        stage_plain(source=str(tmp_path / "src"), dest=str(dest), val_fraction=0.25, image_size=16)
    assert Dataset.open(str(dest)).manifest.content_hash() == result.manifest_hash  # the dataset is kept
    assert result.images == {"classes": ["cat", "dog"], "stored": "encoded", "size": 16, "skipped_bad": 1}
    assert result.rows == len(files) - 1
    assert result.bytes_out <= result.bytes_in  # encoded bytes kept, not re-encoded
    ds = Dataset.open(str(dest))
    meta = ds.manifest.metadata
    assert meta["kind"] == "images" and meta["num_classes"] == 2 and meta["shape"] == [3, 16, 16]
    assert meta["skipped_bad"] == {"count": 1, "paths": ["cat/broken.jpg"]}
    table = ds.read_table()
    assert table.schema.field("image").type == pa.binary()
    by_path = dict(zip(table.column("path").to_pylist(), table.column("image").to_pylist()))
    assert by_path["dog/003.png"] == files["dog/003.png"]  # the file's own bytes
    labels = dict(zip(table.column("path").to_pylist(), table.column("label").to_pylist()))
    assert labels["cat/001.png"] == 0 and labels["dog/002.jpg"] == 1
    first = ds.read_shard(ds.shards("train")[0]).column("label").to_pylist()
    assert set(first[: len(first) // 2]) == {0, 1}  # files staged in a seeded random order: classes mixed

    plan, trained = _train(str(dest), tmp_path)
    assert plan.model_name == "cnn"
    assert plan.model_args == {"num_classes": 2, "in_channels": 3, "image_size": 16}
    assert trained.history[-1]["val_acc"] >= 0.9
    assert _predicted_accuracy(trained.checkpoint, str(dest), tmp_path) >= 0.9  # swarm infer decodes as well


def _predicted_accuracy(checkpoint: str, dest: str, tmp_path) -> float:
    """``swarm infer``'s predictions of every row, against the labels (joined on shard and row)."""
    infer_plain(model=checkpoint, dataset=dest, output=str(tmp_path / "pred"))
    pred = Dataset.open(str(tmp_path / "pred")).read_table()
    ds = Dataset.open(dest)
    labels = {e.name: ds.read_shard(e).column("label").to_pylist() for e in ds.shards()}
    truth = [labels[s][r] for s, r in zip(pred.column("shard").to_pylist(), pred.column("row").to_pylist())]
    assert len(truth) == ds.manifest.rows
    return sum(p == t for p, t in zip(pred.column("prediction").to_pylist(), truth)) / len(truth)


def test_decoded_at_staging_trains(tmp_path):
    write_image_folder(_local_writer(tmp_path / "src"), broken=False)
    result = stage_plain(source=str(tmp_path / "src"), dest=str(tmp_path / "ds"), val_fraction=0.25, decode=12)
    assert result.images["stored"] == "decoded"
    ds = Dataset.open(str(tmp_path / "ds"))
    assert ds.schema.field("image").type == pa.list_(pa.uint8(), 3 * 12 * 12)
    plan, trained = _train(str(tmp_path / "ds"), tmp_path)
    assert plan.model_args["image_size"] == 12
    assert trained.history[-1]["val_acc"] >= 0.9
    assert _predicted_accuracy(trained.checkpoint, str(tmp_path / "ds"), tmp_path) >= 0.9


def test_image_folder_on_s3(s3, bucket, tmp_path):
    fs = s3.s3fs()
    files = write_image_folder(lambda rel, data: fs.pipe(f"{bucket}/raw/{rel}", data), per_class=8)
    opts = s3.storage_options
    with pytest.raises(SourceError, match=r"'cat/broken\.jpg'"):
        stage_plain(source=f"s3://{bucket}/raw", dest=f"s3://{bucket}/ds", image_size=16, storage_options=opts)
    assert not fs.exists(f"{bucket}/ds/index.json") and not fs.find(f"{bucket}/ds")
    result = stage_plain(source=f"s3://{bucket}/raw", dest=f"s3://{bucket}/ds", image_size=16, skip_bad=True,
                         val_fraction=0.25, storage_options=opts)
    assert result.rows == len(files) - 1 and result.images["skipped_bad"] == 1
    _, trained = _train(f"s3://{bucket}/ds", tmp_path, opts, epochs=2)
    assert len(trained.history) == 2


def test_path_label_table_and_glob(tmp_path):
    write_image_folder(_local_writer(tmp_path / "src"), per_class=4, broken=False)
    rows = [(f"{c}/{i:03d}.{'png' if i % 2 else 'jpg'}", c.upper()) for c in COLOURS for i in range(4)]
    (tmp_path / "src" / "list.csv").write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows))
    result = stage_plain(source=str(tmp_path / "src" / "list.csv"), dest=str(tmp_path / "a"), image_size=8)
    assert result.rows == 8 and result.images["classes"] == ["CAT", "DOG"]
    result = stage_plain(source=str(tmp_path / "src" / "*" / "*.png"), dest=str(tmp_path / "b"), image_size=8)
    assert result.rows == 4 and result.images["classes"] == ["cat", "dog"]


@pytest.mark.parametrize("fmt,message", [("auto", "holds no input files .*images"),
                                         ("images", "holds no image files in class folders")])
def test_empty_image_folder_is_refused(tmp_path, fmt, message):
    (tmp_path / "src" / "cat").mkdir(parents=True)
    (tmp_path / "src" / "dog").mkdir()
    with pytest.raises(SourceError, match=message):
        stage_plain(source=str(tmp_path / "src"), dest=str(tmp_path / "out"), format=fmt)
    assert not (tmp_path / "out").exists()


def test_loose_images_without_class_folders_are_refused(tmp_path):
    write_image_folder(lambda rel, data: (tmp_path / rel.replace("/", "-")).write_bytes(data), per_class=2,
                       broken=False)
    with pytest.raises(SourceError, match=r"4 image file\(s\) directly in .* but none in class folders"):
        stage_plain(source=str(tmp_path), dest=str(tmp_path / "out"), format="images")
    assert not (tmp_path / "out").exists()


def test_builtin_cnn_pools_large_images_first():
    import torch

    from tasks.models import build_model

    assert build_model("cnn", {"image_size": 32}).config.stem_pool == 1  # small images as before
    big = build_model("cnn", {"in_channels": 3, "image_size": 224, "num_classes": 5})
    assert big.config.stem_pool == 7
    assert big(torch.zeros(2, 3, 224, 224)).shape == (2, 5)
