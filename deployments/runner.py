"""Run every deployment of prefect.yaml in this process with Prefect's ``serve`` (a Runner:
no work pool, no worker needed).

    python -m deployments.runner      (``python -m deployments.serve``, its old name, still works)

Runs in the foreground, creates the deployments with their schedules and parameters,
and executes their runs in subprocesses of this process until Ctrl-C.
"""

from __future__ import annotations

import os

from deployments.project import PROJECT_DIR, declared_deployments, load_flow
from deployments.runtime import ensure_prefect_api


def runner_deployments():
    from prefect.client.schemas.schedules import CronSchedule

    out = []
    for spec in declared_deployments():
        flow = load_flow(spec["entrypoint"])
        schedules = [
            CronSchedule(cron=s["cron"], timezone=s.get("timezone", "UTC"))
            for s in spec.get("schedules") or []
            if "cron" in s
        ]
        out.append(flow.to_deployment(
            name=spec["name"],
            description=spec.get("description"),
            tags=spec.get("tags"),
            parameters=spec.get("parameters") or {},
            schedules=schedules or None,
        ))
    return out


def main() -> None:
    from prefect import serve

    os.chdir(PROJECT_DIR)
    ensure_prefect_api()
    serve(*runner_deployments())


if __name__ == "__main__":
    main()
