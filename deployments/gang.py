"""Gang scheduling of a group of Prefect tasks on distinct Dask workers.

Every member is pinned to its own worker (``allow_other_workers=False``) with Dask
retries off, so Dask never re-runs one member alone: if a member fails, or its worker
leaves the cluster, every member is cancelled and :class:`GangFailed` is raised for the
caller to retry the whole group. A member still running ``straggler_s`` after another
finished is stuck (its peers have left every collective): its worker is restarted, since
Dask cannot stop a running thread, and the group fails the same way; a member that failed with a user error (a
:class:`~storage.errors.SwarmError`: bad input, damaged data) raises that error instead.

A cancelled member keeps running in its worker's thread, so each attempt first *takes over*
its gang (:func:`take_over`): every worker learns the attempt's token, members of earlier
attempts stop at their next :func:`check` with :class:`Superseded`, and the attempt waits
until they have left (restarting the workers of any still there after a bound) before it
reads what they wrote. Nothing an abandoned attempt does can then overlap its successor.
"""

from __future__ import annotations

import socket
import time
from typing import Any, Callable

import dask

from tasks.dask_workers import live_workers
from storage.errors import ConfigError, SwarmError
from tasks import attempts
from tasks.attempts import Superseded, check, membership  # noqa: F401 - the worker side, for callers of gangs


class GangFailed(RuntimeError):
    """A member of the group failed; the group as a whole should be retried."""


def take_over(client, key: str, token: str, wait_s: float, poll_s: float = 0.25) -> list[str]:
    """Make ``token`` the current attempt of gang ``key`` on every worker and wait until members of
    earlier attempts have left. Workers still running one after ``wait_s`` (stuck in a native call)
    are restarted; returns their addresses, so the caller can wait for their replacements."""
    deadline = time.monotonic() + wait_s
    while stale := _stale(client, key, token):
        if time.monotonic() >= deadline:
            _restart(client, stale)
            if still := _stale(client, key, token):
                raise GangFailed(f"worker(s) {', '.join(still)} still run a member of an earlier attempt "
                                 f"{wait_s:.0f} s after it was superseded and could not be restarted")
            return stale
        time.sleep(poll_s)
    return []


def _stale(client, key: str, token: str) -> list[str]:
    """Workers still running older members of ``key``; one that did not answer counts unless it left."""
    counts = client.run(attempts.supersede, key, token, on_error="return")
    alive = set(live_workers(client))
    return sorted(w for w, n in counts.items() if (n > 0 if isinstance(n, int) else w in alive))


def taken_over(client, key: str, token: str) -> bool:
    """Whether another attempt or run has made itself current for ``key`` on some worker."""
    current = client.run(attempts.current, key, on_error="ignore")
    return any(t is not None and t != token for t in current.values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _worker_resources(client) -> dict[str, dict]:
    info = live_workers(client)
    return {addr: w.get("resources", {}) for addr, w in info.items()}


def pick_workers(client, size: int, wait_s: float = 0.0, resource: str | None = None) -> list[str]:
    """``size`` distinct workers (those with ``resource`` when given), or a clear error."""
    deadline = time.monotonic() + wait_s
    while True:
        workers = sorted(a for a, r in _worker_resources(client).items() if resource is None or r.get(resource))
        if len(workers) >= size or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if len(workers) < size:
        kind = f" with a {resource} resource" if resource else ""
        raise ConfigError(
            f"world size {size} is larger than the cluster: it has {len(workers)} worker(s){kind}; "
            f"lower --world-size to at most {len(workers)} or add workers"
        )
    return workers[:size]


def has_resource(client, resource: str) -> bool:
    return any(r.get(resource) for r in _worker_resources(client).values())


def free_port_on(client, worker: str) -> int:
    """A port that is free on ``worker``'s host, asked of the worker itself."""
    return client.run(_free_port, workers=[worker])[worker]


def host_of(worker: str) -> str:
    return worker.split("://", 1)[-1].rsplit(":", 1)[0]


def run_gang(runner, task, jobs: list[Any], workers: list[str], resources: dict | None = None,
             on_poll: Callable[[], None] | None = None, poll_s: float = 0.25,
             straggler_s: float = 300.0) -> list[Any]:
    """Run ``task(job=jobs[i])`` on ``workers[i]`` for all i; all succeed or :class:`GangFailed`."""
    client = runner.client
    futures = []
    for job, worker in zip(jobs, workers):
        with dask.annotate(workers=[worker], allow_other_workers=False, retries=0, **({"resources": resources} if resources else {})):
            futures.append(runner.submit(task, {"job": job}))
    wrapped = [f.wrapped_future for f in futures]
    first_done: float | None = None
    try:
        while True:
            if on_poll is not None:
                on_poll()
            problem = _problem(client, wrapped, workers)
            if problem:
                raise GangFailed(problem)
            if all(w.done() for w in wrapped):
                return [f.result() for f in futures]
            if first_done is None and any(w.done() for w in wrapped):
                first_done = time.monotonic()
            if first_done is not None and time.monotonic() - first_done > straggler_s:
                stuck = [workers[r] for r, w in enumerate(wrapped) if not w.done()]
                client.cancel(wrapped, force=True)
                _restart(client, stuck)
                raise GangFailed(f"member(s) on {', '.join(stuck)} still running {straggler_s:.0f} s after the "
                                 "others finished; their workers were restarted")
            time.sleep(poll_s)
    except BaseException:
        client.cancel(wrapped, force=True)
        raise


def _restart(client, workers: list[str]) -> None:
    """Restart stuck workers (their nannies start fresh processes); a worker without a nanny
    cannot be restarted and is left to the cluster's operator."""
    try:
        client.restart_workers(workers, timeout=120, raise_for_error=False)
    except Exception:  # noqa: BLE001 - best effort: the group fails and is retried either way
        pass


def _raise_user_error(state) -> None:
    """A member that failed on the user's input or data fails the group with that error: a
    retry would fail alike, and the error says what to fix."""
    try:
        state.result(raise_on_failure=True)
    except SwarmError:
        raise
    except BaseException:  # noqa: BLE001 - any other failure is the group's to retry
        pass


def _problem(client, wrapped, workers) -> str | None:
    for rank, fut in enumerate(wrapped):
        if fut.status in ("error", "cancelled", "lost"):
            return f"member {rank} on {workers[rank]} ended with status {fut.status}"
        if fut.done():
            state = fut.result()
            if not state.is_completed():
                _raise_user_error(state)
                return f"member {rank} on {workers[rank]} ended {state.type.value}: {state.message}"
    alive = set(live_workers(client))
    for rank, fut in enumerate(wrapped):
        if not fut.done() and workers[rank] not in alive:
            return f"worker {workers[rank]} of member {rank} left the cluster"
    return None
