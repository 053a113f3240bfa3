"""glibc's allocator as CPU kernels expect it, also inside Dask workers.

Dask's nanny starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536`` (its
``distributed.nanny.pre-spawn-environ``) to hand freed memory back to the OS. Setting it
also turns off glibc's adaptive mmap threshold, so every buffer over 128 KiB is mapped
and unmapped on each call and faulted in again. Kernels that allocate per call pay for
it: measured on a worker, int8 dynamic Linear layers ran 2-4x slower and fp32 ones up to
1.5x (BENCHMARKS.md). :func:`steady_allocator` restores the usual behaviour for a block
of work, then puts the worker's setting back.
"""

from __future__ import annotations

import ctypes
import os
import platform
from contextlib import contextmanager
from typing import Iterator

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
GLIBC_MMAP_THRESHOLD = 128 * 1024  # glibc's initial value
STEADY_MMAP_THRESHOLD, STEADY_TRIM_THRESHOLD = 64 << 20, 256 << 20


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "mallopt") else None


@contextmanager
def steady_allocator() -> Iterator[None]:
    """Within the block, large buffers are reused rather than mapped per call (glibc only,
    and only where ``MALLOC_TRIM_THRESHOLD_`` pinned the thresholds, as Dask workers do)."""
    trim = os.environ.get("MALLOC_TRIM_THRESHOLD_")
    libc = _glibc() if trim else None
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, STEADY_MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, STEADY_TRIM_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, int(trim))
