"""Real services for tests: moto's S3 server, a Prefect server, a Dask cluster of processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from deployments.runtime import PrefectServer, free_port


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


class MotoS3:
    """moto's standalone S3 server on loopback, as s3fs's own tests run it."""

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
        cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
        self.process = subprocess.Popen(
            cmd + ["-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        wait_http(self.endpoint + "/moto-api/")

    @property
    def storage_options(self) -> dict:
        return {"endpoint_url": self.endpoint}

    def s3fs(self):
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, skip_instance_cache=True, use_listings_cache=False)

    def reset(self) -> None:
        req = urllib.request.Request(self.endpoint + "/moto-api/reset", method="POST")
        urllib.request.urlopen(req, timeout=10).read()

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass


def start_prefect(home: Path) -> PrefectServer:
    return PrefectServer(home).start()


def start_dask(n_workers: int = 2):
    from distributed import LocalCluster

    from deployments.cluster import keep_nannies

    keep_nannies()
    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None)


def gang_members_running(client, key: str) -> int:
    """Members of gang ``key`` (see :mod:`deployments.gang`) running on the cluster's workers now."""
    from deployments import gang

    return sum(client.run(lambda: sum(gang._RUNNING.get(key, {}).values())).values())


def settled_task_runs(flow_run_id, timeout: float = 30.0) -> list:
    """The task runs of a flow run once none of them is still pending or running.

    Prefect 3 reports task-run states as events, which the server applies shortly after the
    flow call has returned: read right away, the last task can still show ``Running``.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if all(r.state is not None and r.state.is_final() for r in runs) or time.monotonic() > deadline:
                return runs
            time.sleep(0.2)
