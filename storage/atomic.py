"""Atomic writes on any fsspec filesystem.

Local files are written to a temporary sibling, fsynced and renamed over the target, so
a reader sees the old file or the new one, never a torn one. Object stores (s3, gcs,
memory) make a single PUT visible atomically, so one ``pipe_file`` is already atomic.
"""

from __future__ import annotations

import errno
import os
import uuid

from storage.errors import DestinationError
from storage.urls import is_local

TMP_PREFIX = ".tmp-"
#: Errors of a write that found no room: a full disk, a quota, a file size limit.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def tmp_name(path: str) -> str:
    head, _, tail = path.rpartition("/")
    return f"{head}/{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{tail}" if head else f"{TMP_PREFIX}{tail}"


def write_bytes(fs, path: str, data: bytes | memoryview) -> None:
    """Write ``data`` to ``path`` so that no reader ever sees a partial file."""
    parent = path.rpartition("/")[0]
    if is_local(fs):
        if parent:
            os.makedirs(parent, exist_ok=True)
        tmp = tmp_name(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as exc:
            _remove_quietly(tmp)
            if isinstance(exc, OSError) and exc.errno in DISK_FULL:
                raise DestinationError(
                    f"no room to write {path!r} ({len(data):,} bytes): {exc.strerror}; nothing half-written was "
                    "left. Free space there, or write somewhere else"
                ) from None
            raise
        _fsync_dir(parent)
    else:
        fs.pipe_file(path, bytes(data))


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _fsync_dir(path: str) -> None:
    if not path:
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
