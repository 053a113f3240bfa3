"""Dask cluster factory: an existing scheduler by address, or one local cluster per process.

The local cluster is sized to the machine: one single-threaded worker process per core
(CPU), or one worker per GPU through dask-cuda, imported only when GPUs are present,
with every GPU worker advertising a ``GPU`` resource. Prefect's task runner gets the
scheduler *address*, never a live cluster object (which does not serialize).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import subprocess
import threading
from contextlib import contextmanager
from typing import Iterator

from tasks.dask_workers import live_workers
from storage.errors import ConfigError

_LOCK = threading.Lock()
_LOCAL = None


def gpu_count() -> int:
    """GPUs visible to this process, asked of nvidia-smi so torch need not be imported."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return 0
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    count = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    if visible:
        count = min(count, len(visible.split(",")))
    return count


#: The CUDA caching allocator's settings for GPU workers: expandable segments grow a segment in
#: place instead of leaving fragments of fixed-size ones (fewer out-of-memory errors from
#: fragmentation when batch shapes vary, as in adaptive inference). A user's own
#: ``PYTORCH_CUDA_ALLOC_CONF`` wins.
CUDA_ALLOC_CONF = "expandable_segments:True"


def gpu_worker_env() -> dict[str, str]:
    """Environment for GPU worker processes, set where they start (the CUDA allocator reads it once)."""
    return {"PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF") or CUDA_ALLOC_CONF}


def configure_gpu_workers():
    """Worker processes this process's nannies start from now on get :func:`gpu_worker_env`
    (through Dask's ``pre-spawn-environ``, which dask-cuda's own ``env`` does not replace).
    Used as a context manager, only within the block."""
    import dask

    return dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in gpu_worker_env().items()})


def local_worker_count() -> int:
    return max(1, int(os.environ.get("SWARM_WORKERS", 0)) or os.cpu_count() or 1)


#: How long a local cluster waits, after a worker left, before closing that worker's nanny
#: for good if no worker of its name came back. Dask's default, 15 s, races with the nanny:
#: a worker that dies again as the timer of its previous death fires is unregistered for
#: the moment its nanny restarts it, so the nanny is closed and the cluster shrinks for good
#: (seen with workers killed ~15 s apart). Our nannies restart their workers themselves.
LOST_WORKER_TIMEOUT = "7 days"


def keep_nannies() -> None:
    """Configure this process (which runs a local cluster's nannies) as above."""
    import dask

    dask.config.set({"distributed.deploy.lost-worker-timeout": LOST_WORKER_TIMEOUT})


def _start_local_cluster(workers: int | None = None):
    from deployments.console import quiet_workers

    keep_nannies()
    gpus = gpu_count()
    common = dict(dashboard_address=":0", silence_logs=logging.WARNING, preload=quiet_workers())
    if gpus:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise ConfigError(
                f"{gpus} GPU(s) found but dask-cuda is not installed; install the GPU extra: "
                "pip install 'swarm-pipelines[gpu]' (or set CUDA_VISIBLE_DEVICES= to use the CPU)"
            ) from None
        configure_gpu_workers()
        return LocalCUDACluster(resources={"GPU": 1}, threads_per_worker=1, **common)
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=max(workers or 0, local_worker_count()), threads_per_worker=1, processes=True, **common
    )


def with_serving_cluster(config):
    """A serving config (``tasks.inference.config.ServeConfig``) whose replicas have a Dask
    scheduler: its own ``dask_address``, ``$SWARM_DASK_ADDRESS``, or this process's local
    cluster of worker processes, started here with a worker per replica at most."""
    if config.in_process or config.dask_address or os.environ.get("SWARM_DASK_ADDRESS"):
        return config
    return config.model_copy(update={"dask_address": scheduler_address(None, workers=config.replica_bounds[1])})


def scheduler_address(dask_address: str | None = None, workers: int | None = None) -> str:
    """The scheduler to use: the one given, ``$SWARM_DASK_ADDRESS``, or this process's local
    cluster (with at least ``workers`` worker processes on a CPU machine, when given)."""
    global _LOCAL
    address = dask_address or os.environ.get("SWARM_DASK_ADDRESS")
    if address:
        return address if "://" in address else f"tcp://{address}"
    with _LOCK:
        if _LOCAL is None:
            _LOCAL = _start_local_cluster(workers)
            atexit.register(close_local_cluster)
        elif workers and not gpu_count() and len(_LOCAL.workers) < workers:
            _LOCAL.scale(workers)
        return _LOCAL.scheduler_address


def close_local_cluster() -> None:
    global _LOCAL
    with _LOCK:
        if _LOCAL is not None:
            try:
                _LOCAL.close(timeout=20)
            except Exception:  # noqa: BLE001 - best effort at exit
                pass
            _LOCAL = None


@contextmanager
def dask_runner(dask_address: str | None = None) -> Iterator:
    """A started Prefect ``DaskTaskRunner`` on the chosen scheduler."""
    from prefect_dask import DaskTaskRunner

    address = scheduler_address(dask_address)
    runner = DaskTaskRunner(address=address, client_kwargs={"set_as_default": False, "timeout": "30s"})
    try:
        with runner:
            yield runner
    except OSError as exc:
        if dask_address:
            raise ConfigError(f"cannot reach the Dask scheduler at {dask_address!r}: {exc}") from None
        raise


def map_groups(runner, task, groups: list, progress) -> list:
    """Run ``task(group=g)`` for every group on ``runner``, advancing ``progress`` by each
    result's ``rows`` as it completes; the results, in completion order."""
    from prefect.futures import as_completed

    futures = [runner.submit(task, {"group": g}) for g in groups]
    results = []
    for future in as_completed(futures):
        result = future.result()
        results.append(result)
        progress.advance(result.rows)
    return results


def worker_count(runner, resource: str | None = None) -> int:
    """Workers of the runner's cluster (those advertising ``resource`` when given), at least 1."""
    workers = live_workers(runner.client).values()
    return max(1, sum(1 for w in workers if resource is None or w.get("resources", {}).get(resource)))


@contextmanager
def gpu_tasks(runner) -> Iterator[bool]:
    """Tasks submitted to ``runner`` in the block need a ``GPU`` resource when the cluster
    has workers advertising one (each then runs on a GPU worker, one at a time per GPU);
    yields whether it has."""
    import dask

    from deployments.gang import has_resource

    if not has_resource(runner.client, "GPU"):
        yield False
        return
    with dask.annotate(resources={"GPU": 1}):
        yield True
