"""Storage that cannot be reached, as a user error naming the URL.

An endpoint that refuses or times out the connection (a wrong ``endpoint_url``, no
network) surfaces from botocore/aiohttp as their own exception classes, after their own
connection retries; a bucket that does not exist as a ``FileNotFoundError`` or a
``NoSuchBucket`` client error. Both are the user's to fix, and would fail alike on any
retry, so :func:`reaching` turns them into one-line :class:`StorageUnreachable` errors
(exit 2, no retries of a task or a training group). Classes are matched by name, so this
module imports no cloud SDK.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from storage.errors import StorageUnreachable, SwarmError

#: Exception class names (anywhere in the type's MRO) that mean "could not connect".
UNREACHABLE = frozenset({"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError",
                         "ClientConnectorError", "ServerDisconnectedError", "ConnectionRefusedError",
                         "ConnectTimeout", "ConnectError"})


def _names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def describe(exc: BaseException, url: str) -> str | None:
    """The one-line message for a storage failure the user must fix, or None for any other."""
    names = _names(exc)
    first = " ".join(str(exc).split())[:200]
    if names & UNREACHABLE:
        return (f"cannot reach the storage of {url!r} ({first}); check the endpoint "
                "(--storage-option endpoint_url=...) and the network")
    if "NoSuchBucket" in names or "NoSuchBucket" in first or "bucket does not exist" in first.lower():
        bucket = url.split("://", 1)[-1].split("/", 1)[0]
        return f"bucket {bucket!r} of {url!r} does not exist; create it first or fix the URL"
    return None


def missing_bucket(fs, root: str, url: str, role: str = "") -> str | None:
    """The message for a URL whose bucket (the first part of an object store path) does not
    exist, or None (local and in-memory paths have no buckets)."""
    from storage.urls import protocol_of

    if protocol_of(fs) in ("file", "local", "memory"):
        return None
    bucket = root.strip("/").split("/", 1)[0]
    if fs.exists(bucket):
        return None
    return f"{role + ' ' if role else ''}bucket {bucket!r} does not exist ({url!r}); create it first or fix the URL"


@contextmanager
def reaching(url: str) -> Iterator[None]:
    """Run storage calls for ``url``: an unreachable endpoint or a missing bucket becomes
    :class:`~storage.errors.StorageUnreachable` naming it."""
    try:
        yield
    except SwarmError:
        raise
    except Exception as exc:
        message = describe(exc, url)
        if message is None:
            raise
        raise StorageUnreachable(message) from None
