"""A table as users bring it, through `swarm` on the session's Dask cluster and Prefect API:
stage, train with no model arguments, infer with kept columns that join back, serve named rows;
and the storage and label mistakes users make, as one-line errors (exit 2) without retries."""

import httpx
import numpy as np
import pyarrow as pa

from storage.dataset import Dataset
from tasks.inference.config import ServeConfig
from tasks.inference.server import BackgroundServer
from tasks.splits import split_mask
from tests.byod_tables import breast_cancer_table, diabetes_table, wine_table, write
from tests.conftest import run_cli, stage_plain


def _one_line_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-2000:])
    text = " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr and "internal error" not in text
    for needle in needles:
        assert needle in text, text


def test_stage_train_infer_keep_columns_and_serve_named_rows(dask_cluster, tmp_path):
    source = write(wine_table(), tmp_path / "wine", "csv")
    data, ck, pred = str(tmp_path / "ds"), str(tmp_path / "ck"), str(tmp_path / "pred")
    proc = run_cli("stage", source, data, "--val-fraction", "0.25")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("train", data, "--epochs", "12", "--batch-size", "16", "--checkpoint-dir", ck)
    assert proc.returncode == 0, proc.stderr
    assert "validation accuracy" in proc.stdout and "'num_classes': 3" in proc.stdout

    proc = run_cli("infer", ck, data, pred, "--keep-columns", "label,cellar", "--output-format", "parquet")
    assert proc.returncode == 0, proc.stderr
    predictions = Dataset.open(pred)
    assert predictions.manifest.shard_format == "parquet"
    table = predictions.read_table()
    assert {"shard", "row", "prediction", "confidence", "label", "cellar"} <= set(table.column_names)
    agree = np.mean(np.array(table.column("prediction").to_pylist()) == np.array(table.column("label").to_pylist()))
    assert agree >= 0.9, agree  # class names, joined back to the labels they predict

    rows = wine_table().slice(0, 4).to_pylist()
    with BackgroundServer(ServeConfig(model=ck, port=0, in_process=True)) as server:
        named = [{k: v for k, v in r.items() if k != "label"} for r in rows]
        answer = httpx.post(f"{server.url}/predict", json={"inputs": named}).json()
        assert answer["predictions"] == ["class_0"] * 4, answer
        health = httpx.get(f"{server.url}/health").json()
        ordered = [[r[name] for name in health["input"]["features"]] for r in rows]
        again = httpx.post(f"{server.url}/predict", json={"inputs": ordered, "probabilities": True}).json()
        assert again["predictions"] == answer["predictions"] and len(again["probabilities"][0]) == 3
        bad = httpx.post(f"{server.url}/predict", json={"inputs": [{"alcohol": "lots"}]})
        assert bad.status_code == 400 and "alcohol" in bad.json()["error"]


def test_label_outside_the_classes_fails_once_without_retries(dask_cluster, tmp_path):
    table = wine_table()
    labels = table.column("label").to_pylist()
    labels[int(np.flatnonzero(split_mask(np.arange(table.num_rows), 0, 0.25))[0])] = "class_9"
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels))
    stage_plain(source=write(table, tmp_path / "wine", "parquet"), dest=str(tmp_path / "ds"), val_fraction=0.25)
    proc = run_cli("train", str(tmp_path / "ds"), "--epochs", "1", "--batch-size", "16",
                   "--checkpoint-dir", str(tmp_path / "ck"))
    _one_line_error(proc, "label 'class_9' of column 'label' is not one of the model's 3 classes")
    assert "retrying" not in proc.stdout + proc.stderr


def test_unreachable_endpoint_and_missing_bucket(dask_cluster, s3, bucket, tmp_path):
    missing = f"s3://no-such-{bucket}/wine"
    proc = run_cli("train", missing, "--storage-option", f"endpoint_url={s3.storage_options['endpoint_url']}")
    _one_line_error(proc, missing)
    proc = run_cli("stage", "digits", missing, "--storage-option", f"endpoint_url={s3.storage_options['endpoint_url']}")
    _one_line_error(proc, f"bucket 'no-such-{bucket}' does not exist")
    proc = run_cli("train", f"s3://{bucket}/wine", "--storage-option", "endpoint_url=http://127.0.0.1:9")
    _one_line_error(proc, f"cannot reach the storage of 's3://{bucket}/wine'", "endpoint_url")


def test_lifecycle_on_a_two_class_table_trains_a_two_class_head(dask_cluster, tmp_path):
    """Bug: `swarm lifecycle` on a 2-class table silently trained the MLP's default 10-class head."""
    from flows.lifecycle import DataParams, lifecycle
    from tasks.training import TrainOptions

    source = write(breast_cancer_table(), tmp_path / "cancer", "parquet")
    result = lifecycle(data=DataParams(source=source), training=TrainOptions(epochs=5, batch_size=32),
                       output=str(tmp_path / "out"))
    assert result.trained.model_args == {"in_features": 30, "num_classes": 2}
    assert result.trained.val_acc >= 0.9
    assert result.predicted.rows == 569


def test_regression_reports_rmse_and_optimize_gates_on_it(dask_cluster, tmp_path):
    data, ck = str(tmp_path / "ds"), str(tmp_path / "ck")
    stage_plain(source=write(diabetes_table(), tmp_path / "diabetes", "csv"), dest=data, val_fraction=0.2)
    proc = run_cli("train", data, "--label-column", "target", "--epochs", "5", "--batch-size", "32",
                   "--checkpoint-dir", ck, "--task", "regression")  # CSV wrote the float target as integers
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "validation RMSE / MAE" in text and "validation R²" in text and "'num_classes': 1" in text
    proc = run_cli("optimize", ck, "--eval", data, "--output", str(tmp_path / "pruned"), "--prune", "0.95",
                   "--max-rmse-increase", "0.01")
    _one_line_error(proc, "quality gate: RMSE rose", "--max-rmse-increase")
    assert not (tmp_path / "pruned").exists()
