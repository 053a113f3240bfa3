"""The Dask cluster's live workers, asked of the scheduler every time.

Not ``client.scheduler_info(n_workers=-1)["workers"]``: distributed (2026.7) refreshes the
client's cached scheduler identity every 2 s *without* per-worker information, and when that
refresh lands between ``scheduler_info``'s own fetch and its return, the caller reads no
workers at all. Under load this made a live training worker look gone ("left the cluster")
and failed every retry of the rank group at once.
"""

from __future__ import annotations

from typing import Any


def live_workers(client) -> dict[str, dict[str, Any]]:
    """Address -> the scheduler's record of that worker (resources, status, ...), fetched now."""
    return client.sync(client.scheduler.identity, n_workers=-1)["workers"]
