"""The staging flow on a real Dask cluster of worker processes reporting to a real Prefect API."""

import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from storage.dataset import Dataset
from tasks.datasets import open_builtin
from tasks.staging import StageConfig
from tests.conftest import ROOT, run_cli
from tests.services import settled_task_runs
from tests.tables import rich_table


def _prefect_records(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    runs = settled_task_runs(flow_run_id)
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return runs, arts


def test_flow_writes_in_parallel_on_dask_and_reports(dask_cluster, tmp_path):
    from flows.stage import stage_dataset

    source = "synthetic-image?rows=6000&size=8"
    state = stage_dataset(StageConfig(source=source, dest=str(tmp_path / "ds"), shard_size="40KB"), return_state=True)
    result = state.result()
    assert result.rows == 6000 and result.shards >= 4
    assert Dataset.open(str(tmp_path / "ds")).read_table(verify=True).equals(open_builtin(source).read(0, 6000))

    runs, arts = _prefect_records(state.state_details.flow_run_id)
    writes = [r for r in runs if r.name.startswith("write-shards")]
    assert len(writes) >= 2 and all(r.state.is_completed() for r in writes)
    assert {a.type for a in arts} >= {"table", "progress"}
    table = next(a for a in arts if a.type == "table")
    assert table.key == "stage-dataset"


def test_tasks_run_on_worker_processes(dask_cluster, tmp_path):
    from tasks.staging import group_tasks, plan_stage, write_group_task
    from deployments.cluster import dask_runner

    plan = plan_stage(StageConfig(source="synthetic?rows=4000&size=8", dest=str(tmp_path / "ds"), shard_size="30KB"))
    from flows.base import swarm_flow

    @swarm_flow(name="probe-workers")
    def probe():
        with dask_runner() as runner:
            futures = [runner.submit(write_group_task, {"group": g}) for g in group_tasks(plan, 4)]
            return [f.result().worker for f in futures]

    workers = set(probe())
    assert len(workers) == 2, workers
    assert all(not w.endswith(f":{os.getpid()}") for w in workers)


def test_s3_round_trip_through_flow(dask_cluster, s3, bucket):
    from flows.stage import stage_dataset

    fs = s3.s3fs()
    src = rich_table(500)
    with fs.open(f"{bucket}/in/data.parquet", "wb") as f:
        pq.write_table(src, f, row_group_size=100)
    result = stage_dataset(StageConfig(source=f"s3://{bucket}/in", dest=f"s3://{bucket}/ds", shard_size="8KB",
                                       storage_options=s3.storage_options))
    assert result.rows == 500
    assert Dataset.open(f"s3://{bucket}/ds", s3.storage_options).read_table(verify=True).equals(src)


def test_cli_happy_path(dask_cluster, tmp_path):
    proc = run_cli("stage", "digits", str(tmp_path / "digits"), "--val-fraction", "0.2")
    assert proc.returncode == 0, proc.stderr
    assert "1,797" in proc.stdout and "val" in proc.stdout
    assert "Traceback" not in proc.stderr
    again = run_cli("stage", "digits", str(tmp_path / "digits"), "--val-fraction", "0.2")
    assert again.returncode == 0 and "already staged" in again.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["{t}/nope.csv"], "source '{t}/nope.csv' does not exist"),
        (["{t}/fake.parquet"], "is not a valid Parquet file"),
        (["{t}/ragged.csv"], "ragged CSV"),
        (["notabuiltin"], "unknown built-in dataset 'notabuiltin'"),
        (["digits", "--codec", "brotli"], "brotli"),
        (["digits", "--level", "40"], "level 40 is out of range"),
        (["digits", "--shard-size", "0"], "greater than 0"),
        (["digits", "--shard-size", "huge"], "could not parse"),
        (["digits", "--format", "xml"], "xml"),
        (["digits", "--storage-option", "novalue"], "is not KEY=VALUE"),
    ],
)
def test_cli_bad_input(dask_cluster, tmp_path, args, message):
    (tmp_path / "fake.parquet").write_text("a,b\n1,2\n")
    (tmp_path / "ragged.csv").write_text("a,b\n1,2\n3,4,5\n")
    args = [a.format(t=tmp_path) for a in args]
    proc = run_cli("stage", args[0], str(tmp_path / "out"), *args[1:])
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert message.format(t=tmp_path) in " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "out").exists()


def test_cli_missing_bucket_and_file_dest(dask_cluster, s3, tmp_path):
    proc = run_cli("stage", "digits", "s3://no-such-bucket/x", "--storage-option", f"endpoint_url={s3.endpoint}")
    assert proc.returncode == 2 and "bucket 'no-such-bucket' does not exist" in proc.stderr
    (tmp_path / "file").write_text("x")
    proc = run_cli("stage", "digits", str(tmp_path / "file"))
    assert proc.returncode == 2 and "is an existing file" in proc.stderr
    assert (tmp_path / "file").read_text() == "x"


def test_sigkill_mid_staging_then_rerun(dask_cluster, tmp_path):
    """Kill staging (its own local cluster included) mid-way; the re-run holds every row once."""
    from flows.stage import stage_dataset

    source = "synthetic-image?rows=60000&size=16"
    dest = tmp_path / "ds"
    env = dict(os.environ, SWARM_WORKERS="2")
    env.pop("SWARM_DASK_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", "from flows.cli import entrypoint; entrypoint()", "stage", source, str(dest),
         "--shard-size", "400KB", "--val-fraction", "0.1"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(dest.rglob("part-*"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(dest.rglob("part-*")), "staging never started writing"
    assert not (dest / "index.json").exists(), "killed before the commit: no dataset yet"

    result = stage_dataset(StageConfig(source=source, dest=str(dest), shard_size="400KB", val_fraction=0.1))
    assert result.skipped_shards >= 1
    ds = Dataset.open(str(dest))
    assert ds.manifest.rows == 60000
    full = open_builtin(source).read(0, 60000)
    got = ds.read_table(verify=True)
    assert got.num_rows == 60000
    ids = got.column("image").to_pylist()  # every source row exactly once, across both splits
    assert sorted(map(bytes, ids)) == sorted(map(bytes, full.column("image").to_pylist()))
    assert not list(dest.rglob(".tmp-*")), "temporaries of the killed run are cleaned up"
