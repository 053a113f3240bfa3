"""Prefect API bootstrap: use ``PREFECT_API_URL`` when set, else one managed local server.

Dask worker processes report task state to the Prefect API. Without a configured API
every process would start its own temporary server (slow and flaky), so we start one
server (SQLite in the project state folder, ``$SWARM_HOME`` or ``./.swarm``) on a free
port, wait until it answers, and export its URL before any worker starts. A server
started by ``swarm prefect-server`` is recorded in ``server.json`` and reused by later
commands, with the Dask cluster it keeps (:mod:`deployments.warm`); a server started here
is temporary (it stops when the process exits, which :func:`ui_url` says).
"""

from __future__ import annotations

import atexit
import fcntl
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from deployments.warm_record import healthy, live_record, state_dir  # noqa: F401 - healthy, state_dir: used here and by callers
from storage.errors import SwarmError

STARTUP_TIMEOUT_S = 90.0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def use_api(url: str) -> None:
    """Point this process (and the processes it starts) at the Prefect API at ``url``."""
    os.environ["PREFECT_API_URL"] = url
    if "prefect.context" in sys.modules:  # settings were read at import: refresh them
        from prefect.context import refresh_global_settings_context

        refresh_global_settings_context()


@contextmanager
def _lock(path: Path):
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class PrefectServer:
    """A local Prefect server process (SQLite under the state folder)."""

    def __init__(self, home: Path, port: int | None = None, host: str = "127.0.0.1"):
        self.home = home
        self.host = host
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}/api"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> "PrefectServer":
        self.home.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.pop("PREFECT_API_URL", None)
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{self.home / 'prefect.db'}",
            PREFECT_UI_API_URL=self.url,
        )
        log = open(self.home / "server.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", self.host, "--port", str(self.port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SwarmError(
                    f"the local Prefect server exited with code {self.process.returncode}; see {self.home / 'server.log'}"
                )
            if healthy(self.url, timeout=1.0):
                return self
            time.sleep(0.25)
        self.stop()
        raise SwarmError(f"the local Prefect server did not answer within {timeout:.0f}s; see {self.home / 'server.log'}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


_OWNED: list[PrefectServer] = []


def ensure_prefect_api() -> str:
    """Return a live Prefect API URL, starting the managed local server if none is set."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    home = state_dir()
    with _lock(home / "server.lock"):
        record = live_record()
        if record is not None:
            use_api(record["url"])
            return record["url"]
        server = PrefectServer(home / "prefect").start()
    _OWNED.append(server)
    atexit.register(server.stop)
    use_api(server.url)
    return server.url


def stop_owned_servers() -> None:
    """Stop the Prefect servers this process started now rather than at exit (a benchmark
    hands the cores to what it measures next); ``PREFECT_API_URL`` no longer points at them."""
    while _OWNED:
        server = _OWNED.pop()
        server.stop()
        if os.environ.get("PREFECT_API_URL") == server.url:
            del os.environ["PREFECT_API_URL"]


def ui_url() -> str | None:
    """The Prefect UI's address, said to be temporary when it is a server this process started
    (it stops when the process exits; the run history stays in the state folder's database)."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return None
    ui = url.removesuffix("/api")
    if any(server.url == url for server in _OWNED):
        return (f"{ui}  (temporary: it stops when this command exits; `swarm prefect-server` keeps one "
                "running, showing these runs)")
    return ui
