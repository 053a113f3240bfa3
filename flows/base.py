"""The flow decorator: a Prefect flow that makes sure there is a real Prefect API first.

Called as plain Python (``stage_dataset(...)``) with no ``PREFECT_API_URL`` set, Prefect
would fall back to a temporary in-process server that Dask worker processes cannot
reach; :class:`SwarmFlow` starts (or reuses) the managed local server before the run.
"""

from __future__ import annotations

from typing import Any, Callable

from prefect import Flow

from deployments.runtime import ensure_prefect_api


class SwarmFlow(Flow):
    def __call__(self, *args: Any, **kwargs: Any):
        ensure_prefect_api()
        return super().__call__(*args, **kwargs)


def swarm_flow(**options: Any) -> Callable[[Callable], SwarmFlow]:
    def decorate(fn: Callable) -> SwarmFlow:
        return SwarmFlow(fn=fn, **options)

    return decorate
