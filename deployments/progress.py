"""Progress that users can see: a Prefect progress artifact and, in the CLI, a bar.

Flows report progress through :class:`Progress`; the CLI subscribes with
:func:`listening` to draw a bar. Artifact updates are throttled so a fast loop does not
flood the API.
"""

from __future__ import annotations

import contextvars
import time
from contextlib import contextmanager
from typing import Callable, Iterator

Listener = Callable[[str, float, float], None]  # (description, done, total)
_listener: contextvars.ContextVar[Listener | None] = contextvars.ContextVar("swarm_progress", default=None)


@contextmanager
def listening(callback: Listener) -> Iterator[None]:
    token = _listener.set(callback)
    try:
        yield
    finally:
        _listener.reset(token)


class Progress:
    def __init__(self, description: str, total: float, min_interval_s: float = 0.5):
        self.description = description
        self.total = max(float(total), 1e-9)
        self.done = 0.0
        self.min_interval_s = min_interval_s
        self._last = 0.0
        self._artifact_id = None
        self._listener = _listener.get()
        try:
            from prefect.artifacts import create_progress_artifact
            from prefect.context import FlowRunContext, TaskRunContext

            if FlowRunContext.get() or TaskRunContext.get():
                self._artifact_id = create_progress_artifact(progress=0.0, description=description)
        except Exception:  # noqa: BLE001 - progress is best effort, never fails the work
            self._artifact_id = None
        self._notify()

    def advance(self, amount: float = 1.0) -> None:
        self.done = min(self.total, self.done + amount)
        now = time.monotonic()
        if now - self._last >= self.min_interval_s or self.done >= self.total:
            self._last = now
            self._update_artifact()
        self._notify()

    def _notify(self) -> None:
        if self._listener is not None:
            self._listener(self.description, self.done, self.total)

    def _update_artifact(self) -> None:
        if self._artifact_id is None:
            return
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self._artifact_id, progress=100.0 * self.done / self.total)
        except Exception:  # noqa: BLE001
            pass

    def finish(self) -> None:
        self.done = self.total
        self._update_artifact()
        self._notify()
