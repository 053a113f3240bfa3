"""Tables as users bring them, as plain functions: column statistics at staging, feature columns
encoded in the loader, string labels, regression, the RMSE gate, and bad input refused by name."""

import json

import numpy as np
import pyarrow as pa
import pytest
import typer
from typer.testing import CliRunner

from storage import checkpoint as ckpt
from storage.dataset import Dataset
from storage.errors import ConfigError
from tasks.optimize.config import OptimizeConfig
from tasks.optimize.pipeline import optimize, prepare_optimization
from tasks.splits import split_mask
from tasks.tables.encoding import FeatureColumn, FeatureEncoding, LabelEncoding
from tasks.tables.stats import MAX_CATEGORIES
from tasks.training import TrainConfig, TrainOptions, prepare_training
from tasks.training.rank import RankJob, train_rank
from tests.byod_tables import diabetes_table, wine_table, write
from tests.conftest import stage_plain


def _train(cfg: TrainConfig):
    plan = prepare_training(cfg)
    return plan, train_rank(RankJob(cfg, plan.model_name, plan.model_args, plan.columns))


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_wide_table_trains_without_model_arguments(fmt, tmp_path):
    source = write(wine_table(), tmp_path / "wine", fmt)
    stage_plain(source=source, dest=str(tmp_path / "ds"), val_fraction=0.25)
    stats = Dataset.open(str(tmp_path / "ds")).manifest.metadata["column_stats"]
    assert stats["label"] == {"kind": "categorical", "vocabulary": ["class_0", "class_1", "class_2"], "nulls": 0}
    assert stats["cellar"]["vocabulary"] == ["east", "north", "south"]
    assert stats["ash"]["nulls"] == 20 and stats["ash"]["kind"] == "numeric"
    assert stats["ash"]["count"] < 178 - 20 + 1, "moments over the train split only"

    cfg = TrainConfig(dataset=str(tmp_path / "ds"), checkpoint_dir=str(tmp_path / "ck"), epochs=12, batch_size=16)
    plan, result = _train(cfg)
    assert plan.model_args == {"in_features": 13 + 3, "num_classes": 3}  # 13 numbers (ash with nulls) + 3 cellars
    assert plan.columns.table.names[-1] == "cellar" and "label" not in plan.columns.table.names
    assert result.history[-1]["val_acc"] >= 0.85, result.history[-1]
    _, meta = ckpt.load(result.checkpoint)
    assert meta["columns"]["labels"]["classes"] == ["class_0", "class_1", "class_2"]
    assert meta["columns"]["shape"] == [16] and meta["columns"]["features"]["normalize"] == "standard"


def test_feature_columns_globs_and_normalize_none(tmp_path):
    stage_plain(source=write(wine_table(), tmp_path / "wine", "parquet"), dest=str(tmp_path / "ds"))
    cfg = TrainConfig(dataset=str(tmp_path / "ds"), checkpoint_dir=str(tmp_path / "ck"), batch_size=16,
                      feature_columns=["alcohol,*phenols", "color_*"], normalize="none")
    plan = prepare_training(cfg)
    assert plan.columns.table.names == ["alcohol", "total_phenols", "nonflavanoid_phenols", "color_intensity"]
    assert plan.model_args["in_features"] == 4
    x = plan.columns.table.encode_table(Dataset.open(str(tmp_path / "ds")).read_table().slice(0, 3))
    assert np.allclose(x[:, 0], wine_table().column("alcohol").to_numpy()[:3]), "none: values as they are"


def test_null_and_unknown_category_rule():
    enc = FeatureEncoding((FeatureColumn("a", "numeric", mean=2.0, std=4.0, nullable=True),
                           FeatureColumn("c", "categorical", vocabulary=("x", "y"), nullable=True)))
    x = enc.encode({"a": pa.array([None, 6.0, float("nan")]), "c": pa.array(["y", None, "zzz"])})
    assert x.tolist() == [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert np.array_equal(enc.encode_rows([{"a": 6, "c": "y"}, {"c": "x"}]), [[1, 0, 1], [0, 1, 0]])


def test_label_outside_the_model_classes_is_refused_by_name(tmp_path):
    """Bug: a label the model has no class for failed in torch on every retried attempt."""
    table = wine_table()
    val_rows = np.flatnonzero(split_mask(np.arange(table.num_rows), 0, 0.25))
    labels = table.column("label").to_pylist()
    labels[val_rows[0]] = "class_9"  # only in the validation split: not one of the trained classes
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels))
    stage_plain(source=write(table, tmp_path / "wine", "parquet"), dest=str(tmp_path / "ds"), val_fraction=0.25)
    cfg = TrainConfig(dataset=str(tmp_path / "ds"), checkpoint_dir=str(tmp_path / "ck"), epochs=1, batch_size=16)
    with pytest.raises(ConfigError, match="label 'class_9' of column 'label' is not one of the model's 3 classes"):
        _train(cfg)


def test_regression_reports_rmse_and_r2_and_optimize_gates_on_rmse(tmp_path):
    stage_plain(source=write(diabetes_table(), tmp_path / "diabetes", "parquet"), dest=str(tmp_path / "ds"),
                val_fraction=0.2)
    cfg = TrainConfig(dataset=str(tmp_path / "ds"), checkpoint_dir=str(tmp_path / "ck"), epochs=5, batch_size=32,
                      label_column="target")
    plan, result = _train(cfg)
    assert plan.task == "regression" and plan.model_args == {"in_features": 10, "num_classes": 1}
    last = result.history[-1]
    assert {"val_rmse", "val_mae", "val_r2"} <= set(last) and "val_acc" not in last
    assert last["val_r2"] > 0.2 and 30 < last["val_rmse"] < 75, last  # the target's std is ~77

    common = dict(checkpoint=result.checkpoint, eval_dataset=str(tmp_path / "ds"))
    opt = OptimizeConfig(output=str(tmp_path / "int8"), quantize="int8-weight-only", **common)
    done = optimize(opt, prepare_optimization(opt))
    assert done.passed and done.before["rmse"] == pytest.approx(last["val_rmse"], rel=1e-3)
    assert done.before["accuracy"] is None and abs(done.rmse_increase) < 0.05
    opt = OptimizeConfig(output=str(tmp_path / "pruned"), prune=0.95, max_rmse_increase=0.01, **common)
    refused = optimize(opt, prepare_optimization(opt))
    assert not refused.passed and "RMSE rose" in refused.gate_message()
    assert not (tmp_path / "pruned").exists()


def test_bad_table_input_is_refused_before_anything_is_written(tmp_path):
    rows = MAX_CATEGORIES + 200
    table = pa.table({"x": np.arange(rows, dtype=np.int64), "name": [f"n{i}" for i in range(rows)],
                      "label": ["a" if i % 2 else "b" for i in range(rows)], "one": ["same"] * rows,
                      "y": np.linspace(0, 1, rows)})
    stage_plain(source=write(table, tmp_path / "t", "parquet"), dest=str(tmp_path / "ds"))

    def prepare(**kw):
        return prepare_training(TrainConfig(dataset=str(tmp_path / "ds"), checkpoint_dir=str(tmp_path / "never"), **kw))

    with pytest.raises(ConfigError, match=r"feature column 'nope\*' matches no column .* \(columns: x, name, label"):
        prepare(feature_columns=["x", "nope*"])
    with pytest.raises(ConfigError, match=f"'name' .* more than {MAX_CATEGORIES} distinct strings, over the cap"):
        prepare(feature_columns=["x,name"])
    assert prepare().columns.table.names == ["x", "one", "y"], "default: an over-the-cap string column is left out"
    with pytest.raises(ConfigError, match="label column 'one' .* holds one class \\('same'\\)"):
        prepare(label_column="one")
    with pytest.raises(ConfigError, match="--task regression needs a numeric label; column 'label' is string"):
        prepare(task="regression")
    with pytest.raises(ConfigError, match="label column 'y' is double; classes need integers or strings"):
        prepare(label_column="y", task="classification")
    with pytest.raises(ConfigError, match="'x' holds integers with more than 1000 distinct values .* Pass --task"):
        prepare(label_column="x", feature_columns=["y"])
    assert not (tmp_path / "never").exists()


def test_feature_columns_option_takes_commas_and_repeats():
    """Bug: a comma-separated list was read as one name, and a repeated flag kept only the last."""
    from flows.options import Section, config_command

    app, seen = typer.Typer(), []

    @config_command(app, "train", [Section.of("options", TrainOptions, include=("feature_columns",))])
    def train(options: dict) -> None:
        seen.append(TrainOptions(**options))

    @app.callback()
    def root() -> None:
        """Only so the command is named."""

    result = CliRunner().invoke(app, ["train", "--feature-columns", "alcohol, ash", "--feature-columns", "hue"])
    assert result.exit_code == 0, result.output
    assert seen[-1].feature_columns == ["alcohol", "ash", "hue"]
    assert json.loads(TrainOptions(feature_columns="a,b").model_dump_json())["feature_columns"] == ["a", "b"]


def test_label_encoding_round_trip():
    enc = LabelEncoding("label", "classify", ("no", "yes"))
    assert enc.encode(pa.array(["yes", "no"])).tolist() == [1, 0] and enc.decode(np.array([1, 0])) == ["yes", "no"]
    assert LabelEncoding.from_json(json.loads(json.dumps(enc.to_json()))) == enc
    reg = LabelEncoding("t", "regression", mean=10.0, std=2.0)
    assert reg.decode(reg.encode(pa.array([12.0, 8.0]))) == [12.0, 8.0]
