"""Session services, started by the tests themselves: S3 (moto), Prefect, Dask.

Order matters: credentials and the Prefect API URL go into the environment before the
Dask worker processes start, so the workers inherit them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def s3(session_dir):
    from tests.services import MotoS3

    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        os.environ[key] = value
    server = MotoS3()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def prefect_api(session_dir, s3):
    """A real Prefect server for the whole session (``s3`` first: its env must reach workers)."""
    from deployments.runtime import use_api
    from tests.services import start_prefect

    os.environ["SWARM_HOME"] = str(session_dir / "swarm-home")
    server = start_prefect(session_dir / "prefect")
    use_api(server.url)
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def dask_cluster(prefect_api):
    """A Dask cluster of two worker processes that report to the session's Prefect API."""
    from tests.services import start_dask

    cluster = start_dask(2)
    os.environ["SWARM_DASK_ADDRESS"] = cluster.scheduler_address
    yield cluster
    cluster.close()


@pytest.fixture
def bucket(s3):
    """A fresh, empty S3 bucket on the loopback server."""
    import uuid

    name = f"test-{uuid.uuid4().hex[:10]}"
    s3.s3fs().mkdir(name)
    return name


def run_cli(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``swarm`` as a user would, in a subprocess."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", "from flows.cli import entrypoint; entrypoint()", *args],
        capture_output=True, text=True, env=full_env, timeout=timeout, cwd=ROOT,
    )


def stage_plain(n_groups: int = 2, **kwargs):
    """Staging without Prefect or Dask: plan, write every group, commit."""
    from tasks.staging import StageConfig, stage_here

    return stage_here(StageConfig(**kwargs), n_groups)


def infer_plain(n_groups: int = 2, **kwargs):
    """Offline inference without Prefect or Dask: plan, predict every group, commit."""
    from tasks.inference.offline import InferConfig, commit_inference, group_inputs, plan_inference, predict_group

    plan = plan_inference(InferConfig(**kwargs))
    return commit_inference(plan, [predict_group(g) for g in group_inputs(plan, n_groups)], 1.0)


@pytest.fixture(scope="session")
def digits_dataset(session_dir) -> str:
    """The built-in digits, staged once with a 20% validation split."""
    dest = str(session_dir / "digits")
    stage_plain(source="digits", dest=dest, val_fraction=0.2)
    return dest


@pytest.fixture(scope="session")
def digits_checkpoint(digits_dataset, session_dir) -> str:
    """A digits MLP trained in-process (~97% validation accuracy), for evaluation and optimization tests."""
    from tasks.training import TrainConfig, prepare_training
    from tasks.training.rank import RankJob, train_rank

    cfg = TrainConfig(dataset=digits_dataset, epochs=8, checkpoint_dir=str(session_dir / "digits-mlp"))
    plan = prepare_training(cfg)
    return train_rank(RankJob(cfg, plan.model_name, plan.model_args, plan.columns)).checkpoint
