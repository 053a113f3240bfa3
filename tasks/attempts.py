"""The worker side of gang attempts: which attempt of each gang is current in this process.

A gang (see :mod:`deployments.gang`, which schedules them) runs its members as attempts,
each with a token. A member runs inside :func:`membership` and calls :func:`check` now and
then; once a newer attempt has taken the gang over (:func:`supersede`, run on every worker
by the driver), :func:`check` raises :class:`Superseded` and the member stops without
writing more. Tasks import this module; how gangs are scheduled stays in ``deployments``.
"""

from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager
from typing import Iterator

from storage.errors import SwarmError


class Superseded(SwarmError):
    """A member whose gang a newer attempt (or another run with the same key) has taken over."""


# Per worker process: the current attempt's token of each gang, and the members running here.
_LOCK = threading.Lock()
_CURRENT: dict[str, str] = {}
_RUNNING: dict[str, Counter] = {}


@contextmanager
def membership(key: str, token: str | None) -> Iterator[None]:
    """Run a member of attempt ``token`` of gang ``key`` in this process (no-op without a token)."""
    if token is None:
        yield
        return
    with _LOCK:
        _RUNNING.setdefault(key, Counter())[token] += 1
    try:
        check(key, token)
        yield
    finally:
        with _LOCK:
            _RUNNING[key][token] -= 1
            if not +_RUNNING[key]:
                del _RUNNING[key]


def check(key: str, token: str | None) -> None:
    """Raise :class:`Superseded` if a newer attempt has taken gang ``key`` over; cheap enough per step."""
    now = _CURRENT.get(key)
    if token is not None and now is not None and now != token:
        raise Superseded(f"this attempt at {key!r} was taken over by a newer one (a retry of the group, "
                         "or another run with the same checkpoint folder); it stopped without writing more")


def supersede(key: str, token: str) -> int:
    """On a worker: make ``token`` current for ``key``; how many older members still run here."""
    with _LOCK:
        _CURRENT[key] = token
        return sum(n for t, n in _RUNNING.get(key, Counter()).items() if t != token)


def current(key: str) -> str | None:
    """The current attempt's token of gang ``key`` in this process."""
    return _CURRENT.get(key)


def running(key: str) -> int:
    """Members of gang ``key`` running in this process now."""
    with _LOCK:
        return sum(_RUNNING.get(key, Counter()).values())
