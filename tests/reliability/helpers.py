"""What the reliability scenarios share: damage, row accounting, user-error checks, kills."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa

from storage.cache_index import SIDECAR, fast_digest
from tests.conftest import ROOT


# --------------------------------------------------------------------------- damage


def flip_byte(path: Path, rng: random.Random) -> int:
    """XOR one byte at a random offset with a random non-zero value; return the offset."""
    data = bytearray(path.read_bytes())
    offset = rng.randrange(len(data))
    data[offset] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(data))
    return offset


def truncate(path: Path, rng: random.Random) -> int:
    """Cut the file at a random length shorter than it; return that length."""
    size = path.stat().st_size
    keep = rng.randrange(size)
    with open(path, "r+b") as f:
        f.truncate(keep)
    return keep


def damage(path: Path, rng: random.Random, how: str) -> str:
    if how == "flip":
        return f"byte {flip_byte(path, rng)} flipped"
    return f"cut to {truncate(path, rng)} bytes"


# --------------------------------------------------------------------------- rows


def row_keys(table: pa.Table) -> list:
    """Each row as a hashable value (lists become tuples)."""
    columns = [table.column(name).to_pylist() for name in table.column_names]
    return [tuple(_hashable(v) for v in row) for row in zip(*columns)]


def _hashable(value):
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def row_diff(expected, got) -> tuple[int, int]:
    """``(lost, duplicated)``: rows of ``expected`` missing from ``got``, and extra copies in it
    (tables, or lists of row keys; multisets, so rows equal by value count separately)."""
    want = Counter(row_keys(expected) if isinstance(expected, pa.Table) else expected)
    have = Counter(row_keys(got) if isinstance(got, pa.Table) else got)
    lost = sum(max(0, n - have[k]) for k, n in want.items())
    duplicated = sum(max(0, n - want[k]) for k, n in have.items())
    return lost, duplicated


# --------------------------------------------------------------------------- user errors


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str, code: int = 2) -> None:
    """Exit ``code``, every needle in stderr (whitespace folded), no traceback anywhere."""
    text = " ".join(proc.stderr.split())
    assert proc.returncode == code, f"exit {proc.returncode}, wanted {code}: {proc.stderr[-2000:]}"
    for needle in needles:
        assert needle in text, f"{needle!r} not in the error: {proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr + proc.stdout, _traceback_summary(proc.stderr + proc.stdout)


def _traceback_summary(text: str) -> str:
    """The first traceback in ``text``, shortest first: its exception line and where it was raised
    (a trial keeps only the start of its error), then the whole traceback."""
    start = text.index("Traceback")
    before = (text[:start].splitlines() or [""])[-1].strip()[:120]  # who printed it (a logger, a thread)
    lines = text[start:].splitlines()
    body = [lines[0]] + [ln for ln in lines[1:] if ln.startswith(" ")][:60]
    rest = lines[len(body):]
    exception = rest[0] if rest else "?"
    where = next((ln.strip() for ln in reversed(body) if ln.strip().startswith("File ")), "?")
    return f"a traceback in the output: {exception} at {where}, after {before!r}\n" + "\n".join(body)
    assert "internal error" not in proc.stderr, proc.stderr[-2000:]


def cache_is_consistent(cache_root: str, settle_s: float = 10.0) -> list[str]:
    """Problems in a shard cache folder: temporaries left, files without or failing their digest.

    Fills still running (a reader's read-ahead threads outlive the error that stopped it)
    get ``settle_s`` to finish first.
    """
    problems = []
    tmp = Path(cache_root, "tmp")
    deadline = time.monotonic() + settle_s
    while tmp.exists() and any(tmp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    problems += [f"temporary left: {p.name}" for p in tmp.iterdir()] if tmp.exists() else []
    data = Path(cache_root, "data")
    for path in (data.iterdir() if data.exists() else []):
        if path.name.endswith(SIDECAR):
            if not path.with_name(path.name[: -len(SIDECAR)]).exists():
                problems.append(f"digest without data: {path.name}")
            continue
        side = path.with_name(path.name + SIDECAR)
        if not side.exists():
            problems.append(f"data without digest: {path.name}")
        elif side.read_text().strip() != fast_digest(path.read_bytes()):
            problems.append(f"data not matching its digest: {path.name}")
    return problems


# --------------------------------------------------------------------------- processes


def swarm(*args: str, env: dict | None = None, own_cluster: bool = False, **popen) -> subprocess.Popen:
    """Start ``swarm ARGS`` in a session of its own (so a kill takes its whole process group:
    with ``own_cluster``, its local Dask cluster too)."""
    full = dict(os.environ, **(env or {}))
    if own_cluster:
        full.pop("SWARM_DASK_ADDRESS", None)
        full["SWARM_WORKERS"] = "2"
    return subprocess.Popen([sys.executable, "-c", "from flows.cli import entrypoint; entrypoint()", *args],
                            env=full, cwd=ROOT, start_new_session=True, **popen)


def kill_after(proc: subprocess.Popen, delay: float) -> bool:
    """SIGKILL ``proc``'s process group ``delay`` seconds after now; False if it ended first."""
    deadline = time.monotonic() + delay
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    proc.wait()
    _wait_group_gone(proc.pid)
    return True


def _wait_group_gone(pgid: int, timeout: float = 30.0) -> None:
    """Wait until no live process of the killed group is left (its workers die with it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = group_members(pgid)
        if not alive:
            return
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    raise AssertionError(f"processes {group_members(pgid)} of group {pgid} survived SIGKILL")


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes whose process group is ``pgid``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return found
