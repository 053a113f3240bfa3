"""Gang scheduling: a member stuck after its peers finished fails the group and its worker is restarted."""

from __future__ import annotations

import os
import time

import pytest
from prefect import flow, task

from deployments.cluster import dask_runner
from deployments.gang import GangFailed, pick_workers, run_gang


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
