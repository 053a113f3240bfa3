"""Create the process work pool and deploy every flow declared in prefect.yaml.

    python -m deployments.deploy            # against $PREFECT_API_URL (or the managed local server)
    prefect worker start --pool swarm-process

Idempotent: the pool is created only if missing; deployments are updated in place.
"""

from __future__ import annotations

import os
import subprocess
import sys

from deployments.project import PROJECT_DIR, WORK_POOL
from deployments.runtime import ensure_prefect_api


def ensure_work_pool(name: str = WORK_POOL) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            except ObjectAlreadyExists:
                pass


def deploy_all() -> int:
    ensure_prefect_api()
    ensure_work_pool()
    env = dict(os.environ, SWARM_PROJECT_DIR=str(PROJECT_DIR))
    cmd = [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"]
    return subprocess.run(cmd, cwd=PROJECT_DIR, env=env).returncode


if __name__ == "__main__":
    sys.exit(deploy_all())
