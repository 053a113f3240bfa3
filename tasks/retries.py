"""The retry condition of Prefect tasks that touch data."""

from __future__ import annotations

from storage.errors import SwarmError


def retry_unless_user_error(task, task_run, state) -> bool:
    """A task's retry condition: transient failures are retried, a user's mistake (bad input,
    damaged data) is not, as it would fail alike."""
    try:
        state.result()
    except SwarmError:
        return False
    except Exception:
        return True
    return False
