"""The console of a command-line run: a user's mistake is printed once, plainly, by the CLI.

Prefect logs a failed flow or task run at ERROR, traceback included. For a
:class:`~storage.errors.SwarmError` (bad input, damaged data, a full disk) the CLI prints
the message itself, so those records are dropped from the console; every log still
reaches the Prefect API and its UI. The filter goes into the CLI's process and, as a Dask
preload (``dask_setup``), into the workers of the local cluster the CLI starts: their
console is the user's terminal too.
"""

from __future__ import annotations

import logging
import os

from storage.errors import SwarmError

#: Set by the CLI; a local cluster started under it preloads this module in its workers.
QUIET_ENV = "SWARM_QUIET_CONSOLE"


class UserErrorFilter(logging.Filter):
    """Drop log records of a user's mistake and run failures (the CLI reports those once)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], SwarmError):
            return False
        return not (record.levelno >= logging.ERROR and record.name.startswith(("prefect.flow_runs", "prefect.task_runs")))


def quiet_console() -> None:
    """Install :class:`UserErrorFilter` on Prefect's console handlers in this process."""
    import prefect.main  # noqa: F401 - importing it configures Prefect's logging (the handlers to filter)

    seen = set()
    for logger in [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]:
        for handler in getattr(logger, "handlers", []):
            if id(handler) not in seen and type(handler).__name__ == "PrefectConsoleHandler":
                seen.add(id(handler))
                handler.addFilter(UserErrorFilter())


def quiet_workers() -> list[str]:
    """Dask ``preload`` for a local cluster's workers when the CLI asked for a quiet console."""
    return [__name__] if os.environ.get(QUIET_ENV) else []


def dask_setup(worker) -> None:  # Dask's preload hook, run in each worker process
    quiet_console()
