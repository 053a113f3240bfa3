"""Training on a real Dask cluster reporting to a real Prefect API: DDP, faults, many nodes."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from storage import checkpoint as ckpt
from tasks.training import TrainConfig
from tests.conftest import ROOT, run_cli
from tests.services import free_port, gang_members_running


def _reference_single_rank(dataset: str, epochs: int, batch: int, lr: float, seed: int):
    """One process, global batches of 2 x ``batch``: the union of what two ranks read at each step."""
    import numpy as np
    import torch.nn.functional as F

    from storage import order
    from storage.dataset import Dataset
    from storage.loader import StreamingDataset
    from tasks.models import build_model
    from tasks.training import prepare_training
    from tasks.training.data import column_transform, to_arrays

    plan = prepare_training(TrainConfig(dataset=dataset, checkpoint_dir="/nonexistent", seed=seed))
    x, y = to_arrays(Dataset.open(dataset).read_table("train"), plan.columns)
    x = column_transform(plan.columns)(x)
    torch.manual_seed(seed)
    model = build_model(plan.model_name, plan.model_args)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)  # as TrainConfig does
    ranks = [StreamingDataset(dataset, batch_size=batch, seed=seed, drop_last=True, rank=r, world_size=2)
             for r in range(2)]
    steps = 0
    for epoch in range(epochs):
        per_rank = []
        for ds in ranks:
            ds.set_epoch(epoch)
            per_rank.append(order.rank_batches(ds.shard_rows, ds.spec(1)))
        for a, b in zip(*per_rank):
            ids = np.concatenate([a, b])
            loss = F.cross_entropy(model(torch.from_numpy(x[ids])), torch.from_numpy(y[ids]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
    return model.state_dict(), steps


def test_ddp_two_ranks_equal_one_rank_with_double_batch(dask_cluster, digits_dataset, tmp_path):
    """2 DDP ranks of batch b through the streaming loader == 1 process of batch 2b on the same samples."""
    from flows.train import train_model

    two = train_model(TrainConfig(dataset=digits_dataset, epochs=2, lr=1e-2, seed=5, world_size=2, batch_size=16,
                                  checkpoint_dir=str(tmp_path / "two")))
    reference, steps = _reference_single_rank(digits_dataset, epochs=2, batch=16, lr=1e-2, seed=5)
    assert two.steps == steps > 50
    got, _ = ckpt.load(two.checkpoint)
    # Same samples per step; only the float summation order differs (rows within a batch come
    # in storage order per rank), which ~90 Adam steps at lr 1e-2 amplify to ~1e-5.
    for key, value in reference.items():
        torch.testing.assert_close(got[f"model.{key}"], value, rtol=1e-3, atol=1e-4)


def artifacts_of(flow_run_id):
    """Artifacts of a flow run and of its subflow runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )

    with get_client(sync_client=True) as client:
        ids = [flow_run_id]
        frontier = [flow_run_id]
        while frontier:
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)))
            frontier = [c.id for c in children]
            ids += frontier
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))


def test_default_config_on_digits_and_artifacts(dask_cluster, digits_dataset, tmp_path):
    from flows.train import train_model

    state = train_model(TrainConfig(dataset=digits_dataset, checkpoint_dir=str(tmp_path / "ck")), return_state=True)
    result = state.result()
    assert result.val_acc >= 0.95
    assert result.seconds < 60, "the default digits config trains in under a minute"
    arts = artifacts_of(state.state_details.flow_run_id)
    keys = {a.key for a in arts if a.key}
    assert {"train-model", "train-epochs", "train-curves"} <= keys
    assert "progress" in {a.type for a in arts}
    curves = next(a for a in arts if a.key == "train-curves")
    assert "data:image/png;base64," in curves.data
    epochs = next(a for a in arts if a.key == "train-epochs")
    assert "samples_per_s" in epochs.data and "data_stall_share" in epochs.data


def test_world_size_larger_than_cluster_is_refused(dask_cluster, digits_dataset, tmp_path):
    proc = run_cli("train", digits_dataset, "--world-size", "3", "--checkpoint-dir", str(tmp_path / "ck"))
    assert proc.returncode == 2
    assert "world size 3 is larger than the cluster: it has 2 worker(s)" in " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "ck").glob("ckpt-*")) if (tmp_path / "ck").exists() else True


def train_with_a_rank_worker_killed(dask_cluster, config: TrainConfig):
    """Train ``config`` in a thread and SIGKILL one rank's Dask worker once two checkpoints
    exist; returns the run's result once the cluster has its workers back."""
    from distributed import Client

    from flows.train import train_model

    holder = {}
    thread = threading.Thread(target=lambda: holder.setdefault("result", train_model(config)))
    thread.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(ckpt.steps(_localfs(), config.checkpoint_dir)) < 2:
        time.sleep(0.05)
    with Client(dask_cluster.scheduler_address) as client:
        pids = client.run(os.getpid)
        victim = sorted(pids)[-1]
        os.kill(pids[victim], signal.SIGKILL)
        thread.join(timeout=300)
        client.wait_for_workers(2, timeout=60)
    return holder["result"]


def test_killed_rank_worker_resumes_from_checkpoint(dask_cluster, digits_dataset, tmp_path):
    """SIGKILL one rank's Dask worker mid-training: the group is retried, resumes, completes."""
    from flows.train import train_model

    common = dict(dataset=digits_dataset, epochs=40, world_size=2, batch_size=16, checkpoint_every=10, seed=1)
    result = train_with_a_rank_worker_killed(dask_cluster, TrainConfig(checkpoint_dir=str(tmp_path / "faulty"), **common))
    assert result.attempts >= 2 and result.resumed_from is not None
    assert result.epochs == 40

    clean = train_model(TrainConfig(checkpoint_dir=str(tmp_path / "clean"), **common))
    assert clean.attempts == 1
    assert result.val_acc >= 0.95
    assert abs(result.val_acc - clean.val_acc) <= 0.01


def test_rerun_after_the_flow_process_is_killed_stops_its_orphaned_ranks_then_resumes(dask_cluster, digits_dataset,
                                                                                        tmp_path):
    """SIGKILL the process running a training flow: its ranks run on in the Dask workers' threads,
    which Dask cannot stop. A re-run on the same checkpoint folder stops them before it reads the
    latest checkpoint (else they would go on writing and pruning under it), resumes, completes."""
    from distributed import Client

    from flows.train import train_model

    ck = str(tmp_path / "ck")
    common = dict(dataset=digits_dataset, epochs=40, world_size=2, batch_size=16, checkpoint_every=10, seed=1)
    cli = subprocess.Popen(
        [sys.executable, "-c", "from flows.cli import entrypoint; entrypoint()", "train", digits_dataset,
         "--world-size", "2", "--epochs", "40", "--batch-size", "16", "--checkpoint-every", "10", "--seed", "1",
         "--checkpoint-dir", ck],
        cwd=ROOT, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=open(tmp_path / "cli.err", "w"),
        start_new_session=True)
    deadline = time.monotonic() + 180
    while len(ckpt.steps(_localfs(), ck)) < 2:
        assert cli.poll() is None, f"swarm train exited {cli.returncode}: {(tmp_path / 'cli.err').read_text()[-2000:]}"
        assert time.monotonic() < deadline, "swarm train wrote no 2 checkpoints in 180 s"
        time.sleep(0.05)
    os.killpg(cli.pid, signal.SIGKILL)
    cli.wait(timeout=30)

    with Client(dask_cluster.scheduler_address) as client:
        assert gang_members_running(client, ck) == 2, "the killed flow's ranks should still be running on the workers"
        result = train_model(TrainConfig(checkpoint_dir=ck, **common))
        assert gang_members_running(client, ck) == 0
    assert result.attempts == 1
    assert result.resumed_from is not None and result.epochs == 40
    assert result.val_acc >= 0.95


def test_a_second_run_on_the_same_checkpoint_folder_takes_it_over(dask_cluster, digits_dataset, tmp_path):
    """Two runs started on one folder (Run pressed twice): the newer resumes from the older's
    checkpoints and completes; the older stops with a clear error instead of retrying against it."""
    from deployments.gang import Superseded
    from flows.train import train_model

    ck = str(tmp_path / "ck")
    config = TrainConfig(dataset=digits_dataset, epochs=40, world_size=2, batch_size=16, checkpoint_every=10,
                         seed=1, checkpoint_dir=ck)
    outcome = {}

    def older():
        try:
            outcome["result"] = train_model(config)
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test checks
            outcome["error"] = exc

    thread = threading.Thread(target=older)
    thread.start()
    deadline = time.monotonic() + 180
    while len(ckpt.steps(_localfs(), ck)) < 2:
        assert thread.is_alive() and time.monotonic() < deadline, f"the first run wrote no 2 checkpoints: {outcome}"
        time.sleep(0.05)
    newer = train_model(config)
    thread.join(timeout=300)
    assert isinstance(outcome.get("error"), Superseded), outcome
    assert "another run took over" in str(outcome["error"]) or "taken over by a newer one" in str(outcome["error"])
    assert newer.attempts == 1 and newer.resumed_from is not None and newer.epochs == 40


def _localfs():
    import fsspec

    return fsspec.filesystem("file")


def test_train_through_remote_scheduler_two_nodes(prefect_api, digits_dataset, tmp_path):
    """A separate `dask scheduler` and two `dask worker` processes, each with its own cache folder."""
    exe = os.path.join(os.path.dirname(sys.executable), "dask")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    # The `dask` script's own folder comes first on its path: point it at this checkout's code.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    procs = [subprocess.Popen([exe, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", ":0"],
                              env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)]
    try:
        for node in ("node-a", "node-b"):
            node_env = dict(env, SWARM_CACHE_DIR=str(tmp_path / node / "cache"))
            procs.append(subprocess.Popen([exe, "worker", address, "--nthreads", "1", "--name", node],
                                          env=node_env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True))
        from distributed import Client

        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=90)
        proc = run_cli("train", digits_dataset, "--dask-address", address, "--world-size", "2", "--epochs", "5",
                       "--checkpoint-dir", str(tmp_path / "ck"), env={"SWARM_DASK_ADDRESS": ""})
        assert proc.returncode == 0, proc.stderr
        assert "ranks" in proc.stdout and "validation accuracy" in proc.stdout
        assert ckpt.latest(str(tmp_path / "ck")) is not None
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            p.wait(timeout=30)
