"""The batch inference flow on the session's Dask cluster and Prefect API, and `swarm infer`."""

import os
import signal
import subprocess
import sys
import time

import pytest

from storage import formats
from storage.dataset import Dataset
from tasks.inference.offline import InferConfig
from tests.conftest import ROOT, run_cli, stage_plain
from tests.flows.test_stage_flow import _prefect_records
from tests.predictions import check_predictions, leftovers, random_checkpoint


def test_flow_predicts_on_workers_reports_and_resumes(dask_cluster, digits_checkpoint, digits_dataset, tmp_path):
    from flows.infer import batch_inference

    out = str(tmp_path / "pred")
    config = InferConfig(model=digits_checkpoint, dataset=digits_dataset, output=out, probabilities=True)
    state = batch_inference(config, return_state=True)
    result = state.result()
    assert (result.rows, result.shards, result.predicted_shards) == (1797, 2, 2)
    assert check_predictions(out, digits_dataset, digits_checkpoint) == 1797
    assert leftovers(out) == []
    assert all(not b["worker"].endswith(f":{os.getpid()}") for b in result.batch_sizes), "ran on worker processes"
    assert all(b["size"] >= 1 and b["tried"] for b in result.batch_sizes)

    runs, arts = _prefect_records(state.state_details.flow_run_id)
    predicts = [r for r in runs if r.name.startswith("predict-shards")]
    assert predicts and all(r.state.is_completed() for r in predicts)
    assert {a.key for a in arts if a.type == "table"} >= {"batch-inference", "batch-sizes"}

    again = batch_inference(config)
    assert (again.predicted_shards, again.skipped_shards) == (0, 2)
    assert again.manifest_hash == result.manifest_hash


def test_s3_dataset_and_output(dask_cluster, s3, bucket, digits_checkpoint):
    from flows.infer import batch_inference

    options = s3.storage_options
    dataset, output = f"s3://{bucket}/digits", f"s3://{bucket}/predictions"
    stage_plain(source="digits", dest=dataset, val_fraction=0.2, shard_size="20KB", storage_options=options)
    result = batch_inference(InferConfig(model=digits_checkpoint, dataset=dataset, output=output,
                                         storage_options=options))
    assert result.rows == 1797 and result.shards == len(Dataset.open(dataset, options).shards())
    assert result.cache_hits + result.cache_misses == result.shards, "every input shard read through the cache"
    assert check_predictions(output, dataset, digits_checkpoint, options, every=3) > 0
    assert leftovers(output, options) == []


def test_cli_happy_path_and_rerun(dask_cluster, digits_checkpoint, digits_dataset, tmp_path):
    out = str(tmp_path / "pred")
    proc = run_cli("infer", digits_checkpoint, digits_dataset, out, "--max-batch-size", "256", "--codec", "lz4")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "1,797 rows, 2 shards" in text and "2 predicted, 0 already done" in text
    assert "batch sizes chosen" in text and "Traceback" not in proc.stderr
    assert Dataset.open(out).manifest.codec == "lz4"
    again = run_cli("infer", digits_checkpoint, digits_dataset, out, "--max-batch-size", "256", "--codec", "lz4")
    assert again.returncode == 0 and "0 predicted, 2 already done" in " ".join(again.stdout.split())


@pytest.mark.parametrize(
    "args,message",
    [
        (["{t}/nomodel", "{ds}", "{t}/out"], "no checkpoint at '{t}/nomodel'"),
        (["{ck}", "{tokens}", "{t}/out"], "reads column 'image', which dataset '{tokens}' lacks"),
        (["{ck}", "{ds}", "{t}/file"], "'{t}/file' is an existing file"),
        (["{ck}", "{ds}", "{t}/out", "--split", "test"], "split 'test' is not in dataset '{ds}'; it has: train, val"),
        (["{ck}", "{ds}", "{t}/out", "--codec", "brotli"], "invalid codec (got 'brotli')"),
    ],
)
def test_cli_bad_input(dask_cluster, digits_checkpoint, digits_dataset, tmp_path, args, message):
    names = {"t": str(tmp_path), "ds": digits_dataset, "ck": digits_checkpoint, "tokens": str(tmp_path / "tokens")}
    if "{tokens}" in args:
        stage_plain(source="synthetic-tokens?rows=50&seq_len=8", dest=names["tokens"])
    (tmp_path / "file").write_text("x")
    proc = run_cli("infer", *[a.format(**names) for a in args])
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message.format(**names) in " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out").exists() and (tmp_path / "file").read_text() == "x"


def test_sigkill_mid_inference_then_rerun(dask_cluster, tmp_path):
    """Kill `swarm infer` (its own local cluster included) once some prediction shards
    exist; what it left is whole shards only, and the re-run gives every row one prediction."""
    from flows.infer import batch_inference

    dataset, out = str(tmp_path / "images"), tmp_path / "pred"
    stage_plain(source="synthetic-image?rows=20000&size=8&channels=1", dest=dataset, shard_size="16KB")
    inputs = {e.name: e.rows for e in Dataset.open(dataset).shards()}
    assert len(inputs) > 50
    model = random_checkpoint(tmp_path / "model", hidden=[1024, 1024])
    env = dict(os.environ, SWARM_WORKERS="2")
    env.pop("SWARM_DASK_ADDRESS", None)
    proc = subprocess.Popen(  # batches of one row: slow enough to be caught mid-way
        [sys.executable, "-c", "from flows.cli import entrypoint; entrypoint()", "infer", model, dataset, str(out),
         "--max-batch-size", "1", "--no-adaptive"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(out.rglob("part-*"))) < 5 and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    left = list(out.rglob("part-*"))
    assert left, "inference never started writing"
    assert not (out / "index.json").exists(), "killed before the commit"
    for path in left:  # every visible shard is whole
        table = formats.get("arrow").decode(path.read_bytes())
        [shard] = set(table.column("shard").to_pylist())
        assert table.num_rows == inputs[shard]

    result = batch_inference(InferConfig(model=model, dataset=dataset, output=str(out)))
    assert result.skipped_shards == len(left) and result.predicted_shards == len(inputs) - len(left) > 0
    assert result.rows == 20000
    assert check_predictions(str(out), dataset, model, every=97) > 0  # every row once; a sample against the model
    assert leftovers(str(out)) == [], "no partial or temporary files left"

