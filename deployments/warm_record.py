"""The warm runtime's record, ``<state dir>/server.json``, and whether a command may use it.

``swarm prefect-server`` (:mod:`deployments.warm`) writes the record: its Prefect URL, its
Dask scheduler address, the worker count, the process ids and salted hashes of the worker
environment. Commands read it here: :func:`live_record` for the Prefect server (from
:func:`deployments.runtime.ensure_prefect_api`), :func:`warm_dask_address` for the cluster
(from :func:`deployments.cluster.scheduler_address`). A stale record (its server process
killed) is noted, removed and ignored, and the orphaned Prefect server it names is stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

RECORD_NAME = "server.json"

#: Environment variables a worker process's work depends on: commands whose values differ
#: from the warm workers' do not use them.
WORKER_ENV_PREFIXES = ("AWS_", "SWARM_", "HF_", "TRANSFORMERS_", "PYTORCH_", "TORCH", "CUDA_", "NCCL_", "GLOO_",
                       "OMP_", "MKL_", "PYTHONPATH", "FSSPEC_")
#: Of those, the ones that only choose the runtime or the console, not what the work does.
RUNTIME_ONLY = {"SWARM_HOME", "SWARM_DASK_ADDRESS", "SWARM_DEBUG", "SWARM_QUIET_CONSOLE"}


def state_dir() -> Path:
    path = Path(os.environ.get("SWARM_HOME", ".swarm")).absolute()
    path.mkdir(parents=True, exist_ok=True)
    return path


def healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (OSError, ValueError):
        return False


_noted: set[str] = set()


def note(message: str) -> None:
    """Tell the user (stderr, once per process) what the runtime chose and why."""
    if message not in _noted:
        _noted.add(message)
        print(f"swarm: {message}", file=sys.stderr, flush=True)


def record_path() -> Path:
    return state_dir() / RECORD_NAME


def read_record() -> dict | None:
    try:
        record = json.loads(record_path().read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("url"), str) else None


def write_record(record: dict) -> None:
    path = record_path()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def remove_record(owner_pid: int) -> None:
    """Remove the record if it is still the one process ``owner_pid`` wrote."""
    record = read_record()
    if record is not None and record.get("owner_pid") == owner_pid:
        record_path().unlink(missing_ok=True)


def pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process its parent has not reaped yet is gone all the same
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def reachable(address: str, timeout: float = 2.0) -> bool:
    """Whether a Dask scheduler's ``tcp://host:port`` accepts a connection."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=timeout):
            return True
    except (OSError, ValueError, TypeError):
        return False


def worker_environment() -> dict[str, str]:
    """What a local worker process takes from the shell that starts it, as salted hashes."""
    salt = f"{os.getuid()}:{Path(__file__).resolve()}"
    values = {name: value for name, value in os.environ.items()
              if name.startswith(WORKER_ENV_PREFIXES) and name not in RUNTIME_ONLY}
    values["current folder"] = os.getcwd()
    values["Python"] = sys.executable
    return {name: hashlib.sha256(f"{salt}\0{name}\0{value}".encode()).hexdigest()[:20] for name, value in values.items()}


def environment_differences(recorded: dict[str, str]) -> list[str]:
    here = worker_environment()
    return sorted(name for name in set(here) | set(recorded) if here.get(name) != recorded.get(name))


def live_record() -> dict | None:
    """The record of a running warm runtime; a stale one is noted, removed and ignored."""
    record = read_record()
    if record is None:
        return None
    owner = record.get("owner_pid", record.get("pid"))
    if not pid_alive(owner):
        problem = f"its `swarm prefect-server` (pid {owner}) is gone"
    elif not healthy(record["url"]):
        problem = f"its Prefect server at {record['url']} does not answer"
    else:
        return record
    note(f"ignoring the stale runtime record {record_path()}: {problem}")
    _stop_orphaned_server(record)
    record_path().unlink(missing_ok=True)
    return None


def _stop_orphaned_server(record: dict) -> None:
    """Stop the Prefect server a killed ``swarm prefect-server`` left behind (its own process group)."""
    pid = record.get("pid")
    if record.get("owner_pid") == pid or not pid_alive(pid):
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if b"prefect" in cmdline and b"server" in cmdline and str(record.get("port", "")).encode() in cmdline:
        try:
            os.killpg(pid, signal.SIGTERM)
        except OSError:
            pass


def warm_dask_address(workers: int | None = None) -> str | None:
    """The warm runtime's scheduler, when this command can use it (else None, with a note why):
    its server process lives, it reports to this command's Prefect API, this shell's folder and
    worker environment are its workers', it has ``workers`` workers, and its scheduler answers."""
    record = read_record()
    address = (record or {}).get("dask_address")
    if not address:
        return None
    api = os.environ.get("PREFECT_API_URL")
    differing = environment_differences(record.get("environment") or {})
    if not pid_alive(record.get("owner_pid")):
        why = f"its `swarm prefect-server` (pid {record.get('owner_pid')}) is gone"
    elif api and api.rstrip("/") != record["url"].rstrip("/"):
        why = f"this command reports to another Prefect API ({api})"
    elif differing:
        why = (f"its workers have the folder and environment of the shell that started it, and here "
               f"{', '.join(differing)} differ")
    elif workers and not record.get("gpu") and workers > int(record.get("workers") or 0):
        why = f"it has {record.get('workers')} workers and this command wants {workers}"
    elif not reachable(address):
        why = "its scheduler does not answer"
    else:
        note(f"using the warm Dask cluster at {address} (swarm prefect-server, pid {record['owner_pid']})")
        return address
    note(f"not using the warm Dask cluster at {address}: {why}; starting a local cluster for this command")
    return None
