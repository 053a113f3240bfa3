"""The warm runtime: ``swarm prefect-server`` keeps a Prefect server *and* a local Dask cluster.

Starting Prefect and a cluster of worker processes costs a command 8-18 s; a command on a
small table needs a fraction of that. ``swarm prefect-server`` (:func:`serve_forever`)
starts both once, in the foreground, and records them in ``<state dir>/server.json``
(``$SWARM_HOME`` or ``./.swarm``, the folder every command already looks in for its
Prefect server): the Prefect URL, the scheduler address, the worker count and the process
ids; the workers import the heavy libraries (:data:`WARM_IMPORTS`) at once. Later
commands in that folder reuse the server and, with no ``--dask-address`` or
``$SWARM_DASK_ADDRESS``, the cluster: :mod:`deployments.warm_record` reads the record
and decides whether a command may.

The workers were started by the ``swarm prefect-server`` shell, so they have its folder
and environment (credentials, cache settings, ``PYTHONPATH``). A command whose shell
differs in any of those (``warm_record.WORKER_ENV_PREFIXES``) starts its own cluster and says
which variables differ; the record keeps only salted hashes of the values, never the
values. A record whose server process is gone (killed) is stale: it is noted, removed and
ignored, and the orphaned Prefect server it names is stopped. Ctrl-C or SIGTERM stops the
cluster and the server and removes the record.
"""

from __future__ import annotations

import os
import signal
import threading

from deployments.cluster import gpu_count, start_local_cluster
from deployments.runtime import PrefectServer, _lock, state_dir, ui_url, use_api
from deployments.warm_record import live_record, remove_record, worker_environment, write_record
from storage.errors import SwarmError

#: Imported in the warm workers as soon as they start: the libraries every command's tasks
#: load (torch alone takes seconds), so that the first command finds them loaded too.
WARM_IMPORTS = ("torch", "pyarrow", "fsspec", "prefect")


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
