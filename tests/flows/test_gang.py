"""Gang scheduling: a member stuck after its peers finished fails the group and its worker is restarted."""

from __future__ import annotations

import os
import time
import uuid
from contextlib import contextmanager

import fsspec
import pytest
from prefect import flow, task

from deployments.cluster import dask_runner
from deployments.gang import (
    GangFailed,
    Superseded,
    check,
    membership,
    pick_workers,
    run_gang,
    take_over,
    taken_over,
)
from tasks import attempts
from tests.services import gang_members_running


@task(name="gang-member")
def member(job: dict) -> int:
    if job["stuck"]:
        time.sleep(3600)  # stands for a rank hung in a native call: Dask cannot stop its thread
    return os.getpid()


@flow(name="gang-test")
def gang(stuck: bool, straggler_s: float) -> list:
    with dask_runner(None) as runner:
        workers = pick_workers(runner.client, 2)
        jobs = [{"stuck": False}, {"stuck": stuck}]
        return run_gang(runner, member, jobs, workers, straggler_s=straggler_s)


def _worker_pids(client) -> dict[str, int]:
    return client.run(os.getpid)


@pytest.mark.timeout(300)
def test_members_run_on_distinct_workers(dask_cluster):
    states = gang(stuck=False, straggler_s=60)
    pids = [s.result() if hasattr(s, "result") else s for s in states]
    assert len(set(pids)) == 2


@pytest.mark.timeout(300)
def test_a_member_stuck_after_the_others_finished_fails_the_group_and_its_worker_restarts(dask_cluster):
    from distributed import Client

    with Client(dask_cluster.scheduler_address) as client:
        before = set(_worker_pids(client).values())
        started = time.monotonic()
        with pytest.raises(GangFailed, match="still running 2 s after the others finished; their workers were restarted"):
            gang(stuck=True, straggler_s=2)
        assert time.monotonic() - started < 120
        client.wait_for_workers(2, timeout=120)
        after = set(_worker_pids(client).values())
        assert len(after) == 2 and len(after - before) == 1, "the stuck member's worker was not restarted"


def _member_loop(key: str, token: str, checks: bool) -> None:
    """A member of attempt ``token``: one that checks its gang each step, or one stuck in a native call."""
    with membership(key, token):
        while True:
            if checks:
                check(key, token)
            time.sleep(0.02)


def _wait_running(client, key: str, n: int) -> None:
    deadline = time.monotonic() + 60
    while gang_members_running(client, key) < n:
        assert time.monotonic() < deadline, f"{n} member(s) did not start in 60 s"
        time.sleep(0.05)


@contextmanager
def _gang_key(client):
    """A fresh gang key; afterwards no member of it is left on the session's workers (their only threads)."""
    key = f"ckpt-{uuid.uuid4().hex}"
    try:
        yield key
    finally:
        take_over(client, key, "cleanup", wait_s=5)
        client.wait_for_workers(2, timeout=120)


@pytest.mark.timeout(300)
def test_take_over_stops_the_members_of_an_earlier_attempt_before_returning(dask_cluster):
    """An abandoned attempt's members (Dask cannot stop their threads) stop at their next check."""
    from distributed import Client

    with Client(dask_cluster.scheduler_address) as client, _gang_key(client) as key:
        workers = pick_workers(client, 2)
        old = [client.submit(_member_loop, key, "attempt-1", True, workers=[w], pure=False) for w in workers]
        _wait_running(client, key, 2)
        assert take_over(client, key, "attempt-2", wait_s=60) == []
        assert gang_members_running(client, key) == 0  # all left before take_over returned
        for fut in old:
            with pytest.raises(Superseded, match="taken over by a newer one"):
                fut.result(timeout=30)
        # The current attempt's members run on; a later take-over with the same token waits for nobody.
        new = client.submit(_member_loop, key, "attempt-2", True, workers=[workers[0]], pure=False)
        _wait_running(client, key, 1)
        assert take_over(client, key, "attempt-2", wait_s=1) == []
        assert not new.done() and not taken_over(client, key, "attempt-2")
        assert take_over(client, key, "attempt-3", wait_s=60) == []
        assert taken_over(client, key, "attempt-2")
        with pytest.raises(Superseded):
            new.result(timeout=30)


@pytest.mark.timeout(300)
def test_take_over_restarts_a_worker_whose_old_member_never_checks(dask_cluster):
    from distributed import Client

    with Client(dask_cluster.scheduler_address) as client, _gang_key(client) as key:
        workers = pick_workers(client, 2)
        before = _worker_pids(client)
        client.submit(_member_loop, key, "attempt-1", False, workers=[workers[1]], pure=False)
        _wait_running(client, key, 1)
        assert take_over(client, key, "attempt-2", wait_s=2) == [workers[1]]
        client.wait_for_workers(2, timeout=120)
        after = _worker_pids(client)
        assert before[workers[0]] == after.get(workers[0]), "a worker without old members was restarted"
        assert before[workers[1]] not in after.values(), "the stuck member's worker was not restarted"
        assert gang_members_running(client, key) == 0


def test_a_rank_of_a_superseded_attempt_writes_nothing(digits_dataset, tmp_path):
    """In process: a rank whose attempt was taken over stops before its first step, with a clear error."""
    from storage import checkpoint as ckpt
    from tasks.training import TrainConfig, prepare_training
    from tasks.training.rank import RankJob, train_rank

    cfg = TrainConfig(dataset=digits_dataset, epochs=1, checkpoint_dir=str(tmp_path / "ck"), checkpoint_every=1)
    plan = prepare_training(cfg)
    attempts.supersede(cfg.checkpoint_dir, "newer")
    with pytest.raises(Superseded, match="taken over by a newer one"):
        train_rank(RankJob(cfg, plan.model_name, plan.model_args, plan.columns, gang="older"))
    assert ckpt.steps(fsspec.filesystem("file"), cfg.checkpoint_dir) == []
    assert train_rank(RankJob(cfg, plan.model_name, plan.model_args, plan.columns, gang="newer")).epochs == 1
