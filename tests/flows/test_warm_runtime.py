"""The warm runtime: a real ``swarm prefect-server`` whose Prefect server and Dask cluster later commands reuse."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

CLI = [sys.executable, "-c", "from flows.cli import entrypoint; entrypoint()"]


class Runtime:
    """``swarm prefect-server`` in a subprocess, with the environment its commands share."""

    def __init__(self, home: Path):
        self.home = home
        self.env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "SWARM_DASK_ADDRESS")}
        self.env.update(SWARM_HOME=str(home), SWARM_WORKERS="2", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
        self.log = home.parent / f"{home.name}-server.log"
        self.process = subprocess.Popen([*CLI, "prefect-server"], cwd=ROOT, env=self.env, stdout=open(self.log, "w"),
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while not (self.record or {}).get("dask_address"):
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "swarm prefect-server did not start in 180 s:\n" + self.log.read_text()
            time.sleep(0.5)

    @property
    def record(self) -> dict | None:
        try:
            return json.loads((self.home / "server.json").read_text())
        except (OSError, ValueError):
            return None

    def swarm(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        pid = (self.record or {}).get("pid")
        if pid:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    started = Runtime(tmp_path_factory.mktemp("warm") / "home")
    yield started
    started.stop()


def _scheduler(address: str, fn):
    from distributed import Client

    with Client(address, timeout="20s") as client:
        return client.run_on_scheduler(fn)


def _transitions(dask_scheduler) -> int:
    return dask_scheduler.transition_counter


def _workers(dask_scheduler) -> list[str]:
    return sorted(dask_scheduler.workers)


def _workers_prefect_api(address: str) -> set:
    from distributed import Client

    with Client(address, timeout="20s") as client:
        return set(client.run(lambda: os.environ.get("PREFECT_API_URL")).values())


def _answers(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status == 200


def test_commands_reuse_the_warm_cluster_and_print_a_ui_address_that_outlives_them(runtime, tmp_path):
    from deployments.runtime import healthy

    record = runtime.record
    address, ui = record["dask_address"], record["url"].removesuffix("/api")
    workers = _scheduler(address, _workers)
    assert len(workers) == 2
    assert _workers_prefect_api(address) == {record["url"]}, "the warm workers must report to its Prefect server"
    before = _scheduler(address, _transitions)
    dataset = str(tmp_path / "digits")
    for args in (("stage", "digits", dataset, "--val-fraction", "0.2"),
                 ("train", dataset, "--epochs", "1", "--checkpoint-dir", str(tmp_path / "ckpt"))):
        proc = runtime.swarm(*args)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"using the warm Dask cluster at {address}" in proc.stderr, proc.stderr
        assert "starting a local cluster" not in proc.stderr
        assert re.search(rf"Prefect UI\s*│\s*{re.escape(ui)}\s", proc.stdout), proc.stdout
        assert "temporary" not in proc.stdout
        after = _scheduler(address, _transitions)
        assert after > before, f"`swarm {args[0]}` ran nothing on the warm cluster"
        before = after
        assert healthy(record["url"]) and _answers(ui), "the printed Prefect UI address died with the command"
    assert _scheduler(address, _workers) == workers, "the warm workers were replaced"
    assert (tmp_path / "ckpt").exists()


def test_a_shell_with_other_worker_settings_starts_its_own_cluster(runtime, monkeypatch, capsys):
    """The warm workers have the server shell's folder and environment; a command whose differ does not use them."""
    from deployments.warm_record import warm_dask_address

    monkeypatch.chdir(ROOT)
    for name in list(os.environ):
        monkeypatch.delenv(name)
    for name, value in runtime.env.items():
        monkeypatch.setenv(name, value)
    assert warm_dask_address() == runtime.record["dask_address"]
    monkeypatch.setenv("AWS_PROFILE", "another-account")
    assert warm_dask_address() is None
    assert "AWS_PROFILE differ" in capsys.readouterr().err
    monkeypatch.delenv("AWS_PROFILE")
    assert warm_dask_address(workers=3) is None  # serving 3 replicas wants more workers than it has
    assert "it has 2 workers and this command wants 3" in capsys.readouterr().err


def test_sigterm_stops_the_cluster_and_the_server_and_removes_the_record(runtime):
    from deployments.runtime import healthy
    from deployments.warm_record import reachable

    record = runtime.record
    runtime.process.send_signal(signal.SIGTERM)
    assert runtime.process.wait(timeout=90) == 0, runtime.log.read_text()
    assert runtime.record is None
    assert not healthy(record["url"]) and not reachable(record["dask_address"], timeout=5)


def test_a_killed_runtime_is_ignored_with_a_note_and_its_orphaned_server_stopped(tmp_path):
    """``kill -9`` of ``swarm prefect-server`` leaves its record and its Prefect server (its own process
    group); the next command says so, stops that server, runs on a temporary runtime and says the
    UI address it prints is temporary."""
    from deployments.warm_record import pid_alive, reachable

    killed = Runtime(tmp_path / "home")
    try:
        record = killed.record
        os.kill(killed.process.pid, signal.SIGKILL)
        killed.process.wait()
        assert pid_alive(record["pid"]), "the Prefect server outlives its killed owner"
        start = time.monotonic()
        proc = killed.swarm("stage", "digits", str(tmp_path / "digits"))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"ignoring the stale runtime record {killed.home / 'server.json'}" in proc.stderr, proc.stderr
        assert f"(pid {killed.process.pid}) is gone" in proc.stderr
        assert "using the warm Dask cluster" not in proc.stderr
        assert re.search(r"Prefect UI\s*│\s*http://127\.0\.0\.1:\d+\s+\(temporary", proc.stdout), proc.stdout
        assert time.monotonic() - start < 180
        assert killed.record is None
        deadline = time.monotonic() + 30
        while pid_alive(record["pid"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not pid_alive(record["pid"]), "the orphaned Prefect server was left running"
        assert not reachable(record["dask_address"], timeout=5)
    finally:
        killed.stop()
