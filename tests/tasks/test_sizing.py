"""Models sized from the data: built-ins and user factories get the dataset's sizes, one batch is
checked on the driver, and every checkpoint records its input shape (tasks.models.sizing)."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from storage.errors import ConfigError
from tasks.inference.inputs import InputSpec
from tasks.models.sizing import DataSize, model_arguments
from tasks.training import TrainConfig, prepare_training
from tasks.training.rank import RankJob, train_rank
from tests.conftest import stage_plain


def factory_with_sizes(in_features: int, num_classes: int, hidden: int = 8):
    return torch.nn.Sequential(torch.nn.Linear(in_features, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, num_classes))


def factory_without_sizes(**kwargs):
    return torch.nn.Linear(6, 3)


@pytest.fixture
def vector_dataset(tmp_path):
    """A table rewritten the old way: one fixed-size-list column (no shape metadata) and 3 classes."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 6)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5)
    table = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 6), "label": y,
                      "binary": (y > 0).astype(np.int64)})
    pq.write_table(table, tmp_path / "v.parquet")
    stage_plain(source=str(tmp_path / "v.parquet"), dest=str(tmp_path / "ds"), val_fraction=0.2)
    return str(tmp_path / "ds")


def test_user_factory_gets_the_data_sizes_it_names():
    size = DataSize((13,), "classify", 3)
    assert model_arguments("m:f", factory_with_sizes, size, {}) == {"in_features": 13, "num_classes": 3}
    assert model_arguments("m:f", factory_with_sizes, size, {"hidden": 4, "num_classes": 5})["num_classes"] == 5
    assert model_arguments("m:f", factory_without_sizes, size, {}) == {}
    assert model_arguments("mlp", None, DataSize((4,), "regression"), {}) == {"in_features": 4, "num_classes": 1}
    assert model_arguments("cnn", None, DataSize((3, 32, 32), "classify", 2), {}) == {
        "in_channels": 3, "image_size": 32, "num_classes": 2}


def test_fixed_size_list_model_records_its_shape_and_serves(vector_dataset, tmp_path):
    """Bug: a plain fixed-size list stored ``shape: null`` and serving refused the model."""
    cfg = TrainConfig(dataset=vector_dataset, epochs=1, feature_columns=["x"], batch_size=16, checkpoint_dir=str(tmp_path / "ck"),
                      model="tests.tasks.test_sizing:factory_with_sizes")
    plan = prepare_training(cfg)
    assert plan.model_args == {"in_features": 6, "num_classes": 3}
    result = train_rank(RankJob(cfg, plan.model_name, plan.model_args, plan.columns))
    from storage import checkpoint as ckpt

    _, meta = ckpt.load(result.checkpoint)
    assert meta["columns"]["shape"] == [6]
    spec = InputSpec.from_checkpoint(meta["model"]["name"], meta["model"]["args"], meta["columns"])
    assert spec.width == 6


def test_two_class_table_trains_a_two_class_head(tmp_path):
    """Bug: a 2-class table (no num_classes in its metadata) trained the MLP's default 10-class head."""
    rows = "\n".join(f"{i % 7},{(i * 3) % 5},{i % 2}" for i in range(40))
    (tmp_path / "t.csv").write_text("a,b,label\n" + rows + "\n")
    stage_plain(source=str(tmp_path / "t.csv"), dest=str(tmp_path / "ds"))
    plan = prepare_training(TrainConfig(dataset=str(tmp_path / "ds"), checkpoint_dir=str(tmp_path / "ck"), batch_size=8))
    assert plan.model_args == {"in_features": 2, "num_classes": 2}


def test_mismatch_is_one_line_naming_both_numbers(vector_dataset, tmp_path):
    def prepare(**kw):
        return prepare_training(TrainConfig(dataset=vector_dataset, checkpoint_dir=str(tmp_path / "never"),
                                            feature_columns=["x"], **kw))

    with pytest.raises(ConfigError, match="takes 13 input values per row, the data has 6") as info:
        prepare(model="mlp", model_args={"in_features": 13})
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="gives 2 outputs per row, but the labels .* have 3 classes"):
        prepare(model="mlp", model_args={"num_classes": 2})
    with pytest.raises(ConfigError, match="gives 3 outputs per row, but the labels .* have 2 classes"):
        prepare(model="tests.tasks.test_sizing:factory_without_sizes", label_column="binary")
    assert not (tmp_path / "never").exists()
