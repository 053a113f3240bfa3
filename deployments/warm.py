"""The warm runtime: ``swarm prefect-server`` keeps a Prefect server *and* a local Dask cluster.

Starting Prefect and a cluster of worker processes costs a command 8-18 s; a command on a
small table needs a fraction of that. ``swarm prefect-server`` (:func:`serve_forever`)
starts both once, in the foreground, and records them in ``<state dir>/server.json``
(``$SWARM_HOME`` or ``./.swarm``, the folder every command already looks in for its
Prefect server): the Prefect URL, the scheduler address, the worker count and the process
ids; the workers import the heavy libraries (:data:`WARM_IMPORTS`) at once. Later
commands in that folder reuse the server (:func:`live_record`, from
:func:`deployments.runtime.ensure_prefect_api`) and, with no ``--dask-address`` or
``$SWARM_DASK_ADDRESS``, the cluster (:func:`warm_dask_address`, from
:func:`deployments.cluster.scheduler_address`).

The workers were started by the ``swarm prefect-server`` shell, so they have its folder
and environment (credentials, cache settings, ``PYTHONPATH``). A command whose shell
differs in any of those (:data:`WORKER_ENV_PREFIXES`) starts its own cluster and says
which variables differ; the record keeps only salted hashes of the values, never the
values. A record whose server process is gone (killed) is stale: it is noted, removed and
ignored, and the orphaned Prefect server it names is stopped. Ctrl-C or SIGTERM stops the
cluster and the server and removes the record.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

from storage.errors import SwarmError

RECORD_NAME = "server.json"

#: Imported in the warm workers as soon as they start: the libraries every command's tasks
#: load (torch alone takes seconds), so that the first command finds them loaded too.
WARM_IMPORTS = ("torch", "pyarrow", "fsspec", "prefect")

#: Environment variables a worker process's work depends on: commands whose values differ
#: from the warm workers' do not use them.
WORKER_ENV_PREFIXES = ("AWS_", "SWARM_", "HF_", "TRANSFORMERS_", "PYTORCH_", "TORCH", "CUDA_", "NCCL_", "GLOO_",
                       "OMP_", "MKL_", "PYTHONPATH", "FSSPEC_")
#: Of those, the ones that only choose the runtime or the console, not what the work does.
RUNTIME_ONLY = {"SWARM_HOME", "SWARM_DASK_ADDRESS", "SWARM_DEBUG", "SWARM_QUIET_CONSOLE"}

_noted: set[str] = set()


def note(message: str) -> None:
    """Tell the user (stderr, once per process) what the runtime chose and why."""
    if message not in _noted:
        _noted.add(message)
        print(f"swarm: {message}", file=sys.stderr, flush=True)


def record_path() -> Path:
    from deployments.runtime import state_dir

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
    from deployments.runtime import healthy

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


def _preimport(address: str) -> None:
    from distributed import Client

    try:
        with Client(address, timeout="30s") as client:
            client.run(_import_all, WARM_IMPORTS)
    except Exception:  # noqa: BLE001 - only a head start: a command imports what it needs anyway
        pass


def _import_all(names) -> None:
    import importlib

    for name in names:
        importlib.import_module(name)


class _Stop(Exception):
    pass


def _raise_stop(signum, frame) -> None:
    raise _Stop(signal.Signals(signum).name)


def serve_forever(port: int | None = None, host: str = "127.0.0.1", dask: bool = True,
                  workers: int | None = None) -> None:
    """``swarm prefect-server``: run the Prefect server and a local Dask cluster in the foreground,
    recorded for later commands, until Ctrl-C, SIGTERM or SIGHUP (which stop both and remove the record)."""
    from deployments.runtime import PrefectServer, _lock, state_dir, ui_url, use_api

    home = state_dir()
    with _lock(home / "server.lock"):
        running = live_record()
        if running is not None:
            raise SwarmError(f"a Swarm runtime is already running at {running['url']} (pid {running.get('owner_pid')}); "
                             "stop it first, or let commands in this folder reuse it")
        environment = worker_environment()  # before the nannies add their own variables to this process's
        server = PrefectServer(home / "prefect", port=port, host=host).start()
        use_api(server.url)  # the workers inherit it: they report task runs to this server
        cluster = None
        try:
            if dask and not os.environ.get("SWARM_DASK_ADDRESS"):
                from deployments.cluster import gpu_count, start_local_cluster

                cluster = start_local_cluster(workers)
            write_record({
                "url": server.url, "port": server.port, "pid": server.process.pid, "owner_pid": os.getpid(),
                "dask_address": cluster.scheduler_address if cluster else None,
                "dashboard": cluster.dashboard_link if cluster else None,
                "workers": len(cluster.workers) if cluster else 0, "gpu": bool(cluster and gpu_count()),
                "environment": environment,
            })
        except BaseException:
            if cluster is not None:
                cluster.close(timeout=20)
            server.stop()
            raise
    if cluster is not None:
        threading.Thread(target=_preimport, args=(cluster.scheduler_address,), daemon=True).start()
    dask_line = (f"Dask scheduler at {cluster.scheduler_address} ({len(cluster.workers)} worker processes; "
                 f"dashboard {cluster.dashboard_link})\n" if cluster else "")
    print(f"Prefect API at {server.url}\nPrefect UI at {ui_url()}\n{dask_line}"
          f"swarm commands run in {os.getcwd()} (state in {home}) reuse them until Ctrl-C or SIGTERM stops them\n"
          f"export PREFECT_API_URL={server.url}   # for the prefect CLI and other shells", flush=True)
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        server.process.wait()
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the clean-up short
        remove_record(os.getpid())
        if cluster is not None:
            try:
                cluster.close(timeout=20)
            except Exception:  # noqa: BLE001 - stopping anyway
                pass
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.signal(signal.SIGINT, signal.default_int_handler)
