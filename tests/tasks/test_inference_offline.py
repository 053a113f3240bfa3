"""Offline batch inference as plain functions: plan, predict groups, commit (no Prefect, no Dask)."""

import dask
import pytest
import torch
from pydantic import ValidationError

from storage.dataset import Dataset
from storage.errors import ConfigError, DestinationError, ManifestError
from tasks.inference.memory import activation_bytes_per_row
from tasks.inference.offline import (
    InferConfig,
    commit_inference,
    group_inputs,
    inference_device,
    plan_inference,
    predict_group,
)
from tasks.models.loading import load_model
from tests.conftest import infer_plain, stage_plain
from tests.predictions import check_predictions, leftovers


def test_every_row_once_and_equal_to_the_model_on_each_row_alone(digits_checkpoint, digits_dataset, tmp_path):
    out = str(tmp_path / "pred")
    # Small sizes so that each shard runs as many batches of several sizes.
    result = infer_plain(model=digits_checkpoint, dataset=digits_dataset, output=out, probabilities=True,
                         initial_batch_size=4, max_batch_size=64)
    assert result.rows == 1797 and result.shards == 2 and result.predicted_shards == 2
    assert check_predictions(out, digits_dataset, digits_checkpoint) == 1797
    assert leftovers(out) == []
    manifest = Dataset.open(out).manifest
    assert manifest.metadata["kind"] == "predictions" and manifest.metadata["key"] == ["shard", "row"]
    assert set(manifest.splits) == {"train", "val"}
    for sizes in result.batch_sizes:  # the adaptive batch size is reported per group
        assert 4 <= sizes["size"] <= 64 and sizes["tried"] and sizes["device"] == "cpu"
    assert result.devices == ["cpu"]


def test_rerun_skips_finished_shards_and_redoes_only_missing_ones(digits_checkpoint, digits_dataset, tmp_path):
    out = tmp_path / "pred"
    first = infer_plain(model=digits_checkpoint, dataset=digits_dataset, output=str(out))
    again = infer_plain(model=digits_checkpoint, dataset=digits_dataset, output=str(out))
    assert (again.predicted_shards, again.skipped_shards) == (0, 2)
    assert again.manifest_hash == first.manifest_hash

    val_shard = next(e.name for e in Dataset.open(str(out)).shards("val"))
    (out / val_shard).unlink()
    stray = out / "train" / ".tmp-0123456789ab-part-x.arrow"  # what a killed local write leaves
    stray.write_bytes(b"partial")
    third = infer_plain(model=digits_checkpoint, dataset=digits_dataset, output=str(out))
    assert (third.predicted_shards, third.skipped_shards) == (1, 1)
    assert third.manifest_hash == first.manifest_hash
    assert leftovers(str(out)) == [] and not stray.exists()

    other = infer_plain(model=digits_checkpoint, dataset=digits_dataset, output=str(out), probabilities=True)
    assert other.predicted_shards == 2, "other options, other prediction shards"
    assert check_predictions(str(out), digits_dataset, digits_checkpoint, every=7) > 0


def test_int8_model_artifact(digits_checkpoint, digits_dataset, tmp_path):
    """An optimized artifact predicts like a checkpoint. int8-weight-only gives each row the
    same output in any batch; int8-dynamic quantizes each batch's activations with one
    scale, so its outputs depend slightly on the batch (not tested for equality here)."""
    from tasks.optimize import OptimizeConfig, optimize, prepare_optimization

    cfg = OptimizeConfig(checkpoint=digits_checkpoint, eval_dataset=digits_dataset, output=str(tmp_path / "int8"),
                         quantize="int8-weight-only")
    artifact = optimize(cfg, prepare_optimization(cfg)).output
    out = str(tmp_path / "pred")
    result = infer_plain(model=artifact, dataset=digits_dataset, output=out, split="val", probabilities=True)
    val_rows = sum(e.rows for e in Dataset.open(digits_dataset).shards("val"))
    assert result.rows == val_rows and result.shards == 1
    assert check_predictions(out, digits_dataset, artifact, split="val") == val_rows


def test_memory_cap_backs_off_and_reports_the_sizes(digits_checkpoint, digits_dataset, tmp_path):
    loaded = load_model(digits_checkpoint)
    per_row = activation_bytes_per_row(loaded.model, torch.zeros(1, 64))
    fits = 100  # rows whose activations fit the cap
    out = str(tmp_path / "pred")
    result = infer_plain(n_groups=1, model=digits_checkpoint, dataset=digits_dataset, output=out,
                         memory_cap_mb=fits * per_row / 2**20, initial_batch_size=64, max_batch_size=1024)
    [sizes] = result.batch_sizes
    assert sizes["out_of_memory_at"] == [128]
    assert sizes["size"] <= fits and sizes["memory_ceiling"] == 64
    assert check_predictions(out, digits_dataset, digits_checkpoint, every=5) > 0

    with pytest.raises(ConfigError, match="below one row's activations"):
        infer_plain(model=digits_checkpoint, dataset=digits_dataset, output=str(tmp_path / "p2"),
                    memory_cap_mb=per_row / 2 / 2**20)


@pytest.fixture
def node_cache(tmp_path, monkeypatch):
    """This node's shard cache in a fresh folder (fsspec keeps filesystem instances: drop them)."""
    from storage.cache import ShardCacheFileSystem

    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path / "cache"))
    ShardCacheFileSystem.clear_instance_cache()
    yield tmp_path / "cache"
    ShardCacheFileSystem.clear_instance_cache()


def test_remote_dataset_reads_through_the_shard_cache(s3, bucket, digits_checkpoint, node_cache, tmp_path):
    options = s3.storage_options
    dataset, output = f"s3://{bucket}/digits", f"s3://{bucket}/pred"
    stage_plain(source="digits", dest=dataset, val_fraction=0.2, shard_size="20KB", storage_options=options)
    shards = len(Dataset.open(dataset, options).shards())
    first = infer_plain(model=digits_checkpoint, dataset=dataset, output=output, storage_options=options)
    assert first.predicted_shards == shards > 2
    assert (first.cache_misses, first.cache_hits) == (shards, 0)
    assert check_predictions(output, dataset, digits_checkpoint, options, every=3) > 0
    assert leftovers(output, options) == []
    assert list(node_cache.rglob("*")), "shards were cached on this node"

    second = infer_plain(model=digits_checkpoint, dataset=dataset, output=str(tmp_path / "pred"), storage_options=options)
    assert (second.cache_misses, second.cache_hits) == (0, shards), "the second run reads the cached copies"


def test_groups_share_the_batch_size_of_their_run(digits_checkpoint, digits_dataset, tmp_path):
    plan = plan_inference(InferConfig(model=digits_checkpoint, dataset=digits_dataset, output=str(tmp_path / "p"),
                                      initial_batch_size=8))
    first, second = group_inputs(plan, 2)
    a, b = predict_group(first), predict_group(second)
    assert b.batch_sizes["tried"].keys() >= a.batch_sizes["tried"].keys(), "the second group went on from the first"
    result = commit_inference(plan, [a, b], 1.0)
    assert result.rows == 1797 and result.data_stall_share >= 0


# ------------------------------------------------------------------ bad input: a clear error, nothing written


@pytest.mark.parametrize(
    "change,error,message",
    [
        ({"model": "{t}/nope"}, ManifestError, "no checkpoint at '{t}/nope'"),
        ({"model": "{dataset}"}, ManifestError, "no checkpoint at '{dataset}'"),
        ({"dataset": "{t}/nope"}, ManifestError, "no dataset at '{t}/nope'"),
        ({"dataset": "{images}"}, ConfigError, "takes rows of shape [1, 8, 8] (64 values); column 'image'"),
        ({"dataset": "{tokens}"}, ConfigError, "reads column 'image', which dataset '{tokens}' lacks"),
        ({"output": "{t}/file"}, DestinationError, "'{t}/file' is an existing file"),
        ({"output": "{dataset}/train"}, ConfigError, "overlaps dataset"),
        ({"output": "{t}"}, ConfigError, "overlaps dataset"),
        ({"output": "{dataset_parent}/staged"}, DestinationError, "holds a dataset that is not predictions"),
        ({"split": "test"}, ConfigError, "split 'test' is not in dataset '{dataset}'; it has: train, val"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(digits_checkpoint, tmp_path, change, error, message):
    dataset = str(tmp_path / "ds")
    stage_plain(source="digits", dest=dataset, val_fraction=0.2)
    names = {"t": str(tmp_path), "dataset": dataset, "dataset_parent": str(tmp_path / "other")}
    if "{images}" in str(change.values()):
        names["images"] = str(tmp_path / "images")
        stage_plain(source="synthetic-image?rows=50&size=4", dest=names["images"])
    if "{tokens}" in str(change.values()):
        names["tokens"] = str(tmp_path / "tokens")
        stage_plain(source="synthetic-tokens?rows=50&seq_len=8", dest=names["tokens"])
    if "staged" in str(change.values()):
        stage_plain(source="digits", dest=str(tmp_path / "other" / "staged"))
    (tmp_path / "file").write_text("x")
    params = {"model": digits_checkpoint, "dataset": dataset, "output": str(tmp_path / "out")}
    params.update({k: v.format(**names) for k, v in change.items()})
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.raises(error) as info:
        plan_inference(InferConfig(**params))
    assert message.format(**names) in str(info.value)
    assert sorted(p for p in tmp_path.rglob("*")) == before, "nothing written"
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("change", [{"codec": "brotli"}, {"max_batch_size": 0}, {"device": "tpu"},
                                    {"memory_cap_mb": -1}])
def test_bad_options_fail_validation(change):
    with pytest.raises(ValidationError) as info:
        InferConfig(model="m", dataset="d", output="o", **change)
    assert next(iter(change)) in str(info.value)


def test_batch_sizes_judged_by_cpu_time_on_one_cpu_thread():
    from tasks.inference.offline import batch_clock

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert batch_clock(torch.device("cpu"), None)[1] == "thread cpu time"
        assert batch_clock(torch.device("cpu"), 50.0)[1] == "wall time", "a latency target is about wall time"
        assert batch_clock(torch.device("cuda"), None)[1] == "wall time"
        torch.set_num_threads(2)
        assert batch_clock(torch.device("cpu"), None)[1] == "wall time"
    finally:
        torch.set_num_threads(threads)


def test_device_choice():
    assert inference_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert inference_device("auto").type == "cpu"
        with pytest.raises(ConfigError, match="sees no CUDA device"):
            inference_device("cuda")


class _FakeClient:
    """A client whose scheduler reports workers with the given resources (no cluster needed)."""

    def __init__(self, resources):
        self.resources = resources
        self.scheduler = self

    def identity(self, n_workers=0):
        return {"workers": {f"tcp://w{i}": {"resources": r} for i, r in enumerate(self.resources)}}

    def sync(self, fn, **kwargs):
        return fn(**kwargs)


class _FakeRunner:
    def __init__(self, *resources):
        self.client = _FakeClient(resources)


def test_predict_tasks_need_a_gpu_where_workers_have_one():
    from deployments.cluster import gpu_tasks, worker_count

    with gpu_tasks(_FakeRunner({}, {})) as on_gpus:
        assert not on_gpus and "resources" not in dask.get_annotations()
    runner = _FakeRunner({"GPU": 1}, {}, {"GPU": 1})
    with gpu_tasks(runner) as on_gpus:
        assert on_gpus and dask.get_annotations()["resources"] == {"GPU": 1}
    assert "resources" not in dask.get_annotations()
    assert worker_count(runner, "GPU") == 2 and worker_count(runner) == 3
