"""Real services for tests: moto's S3 server, a Prefect server, a Dask cluster of processes."""

from __future__ import annotations

import time
from pathlib import Path

from deployments.local_s3 import MotoS3, wait_http  # noqa: F401 - the fixtures' S3
from deployments.runtime import PrefectServer, free_port  # noqa: F401 - tests import free_port from here


def start_prefect(home: Path) -> PrefectServer:
    return PrefectServer(home).start()


def start_dask(n_workers: int = 2):
    from distributed import LocalCluster

    from deployments.cluster import keep_nannies

    keep_nannies()
    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None)


def gang_members_running(client, key: str) -> int:
    """Members of gang ``key`` (see :mod:`deployments.gang`) running on the cluster's workers now."""
    from tasks import attempts

    return sum(client.run(attempts.running, key).values())


def settled_task_runs(flow_run_id, timeout: float = 30.0, expect: tuple[str, ...] = ()) -> list:
    """The task runs of a flow run once none of them is still pending or running (and, with
    ``expect``, once a run of each of those task names is there).

    Prefect 3 reports task-run states as events, which the server applies shortly after the
    flow call has returned: read right away, the last task can still show ``Running``, or
    not be there at all yet.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            names = {r.name.rsplit("-", 1)[0] for r in runs}
            settled = all(r.state is not None and r.state.is_final() for r in runs) and names >= set(expect)
            if settled or time.monotonic() > deadline:
                return runs
            time.sleep(0.2)
