"""Serving on Dask worker processes: failover, a cluster started apart (two "machines"), autoscaling.

The router and replicas run as they do for users: replicas are Dask actors in worker processes
(the session's ``dask_cluster``, or a ``dask scheduler`` with two ``dask worker`` processes),
requests come over HTTP on loopback. Equality with the model, bad input and limits run in both
modes in test_inference_online.py.
"""

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tasks.inference.config import ServeConfig
from tasks.inference.server import BackgroundServer
from tests.conftest import ROOT
from tests.tasks.test_inference_online import checkpoint, val_rows  # noqa: F401 - module fixtures


class Load:
    """``clients`` closed-loop clients sending one row each, checking every answer, until stopped."""

    def __init__(self, url: str, x: np.ndarray, classes: np.ndarray):
        self.url, self.x, self.classes = url, x, classes
        self.codes: list[int] = []
        self.wrong: list[str] = []
        self.clients: list[asyncio.Task] = []
        self.stopped = False

    def add(self, clients: int) -> None:
        for _ in range(clients):
            self.clients.append(asyncio.create_task(self._client(len(self.clients))))

    async def ready(self, clients: int) -> list[asyncio.Event]:
        """``clients`` clients connected and waiting, each for its gate to open (a sharp step)."""
        gates = [asyncio.Event() for _ in range(clients)]
        connected = [asyncio.Event() for _ in range(clients)]
        for gate, up in zip(gates, connected):
            self.clients.append(asyncio.create_task(self._client(len(self.clients), gate, up)))
        await asyncio.gather(*(up.wait() for up in connected))
        return gates

    async def _client(self, index: int, gate: asyncio.Event | None = None, up: asyncio.Event | None = None) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=120) as client:
            if gate is not None:
                await client.get("/health")
                up.set()
                await gate.wait()
            i = index
            while not self.stopped:
                row = i % len(self.x)
                response = await client.post("/predict", json={"inputs": self.x[row:row + 1].tolist()})
                self.codes.append(response.status_code)
                if response.status_code != 200 or response.json()["predictions"] != [int(self.classes[row])]:
                    self.wrong.append(f"{response.status_code} {response.text[:200]}")
                i += 7

    async def stop(self) -> None:
        self.stopped = True
        await asyncio.gather(*self.clients)
        self.clients = []


async def _health(url: str) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return (await client.get("/health")).json()


async def _until(url: str, ready, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = await _health(url)
        if ready(health):
            return health
        if time.monotonic() > deadline:
            raise AssertionError(f"never reached the expected state: {json.dumps(health)[:2000]}")
        await asyncio.sleep(0.1)


def test_failover_under_load_loses_no_request(checkpoint, val_rows, dask_cluster):  # noqa: F811
    x, alone = val_rows
    classes = alone.argmax(1)
    config = ServeConfig(model=checkpoint, port=0, replicas=2, max_batch_size=16, max_wait_ms=2,
                         probe_interval_s=0.5)

    async def scenario(url: str):
        load = Load(url, x, classes)
        load.add(32)
        await asyncio.sleep(1.5)
        before = await _health(url)
        victim = before["placement"][0]
        answered_before_kill = len(load.codes)
        os.kill(victim["pid"], signal.SIGKILL)
        after = await _until(url, lambda h: any(e["event"] == "replaced" for e in h["events"])
                             and h["replicas"] == 2)
        await asyncio.sleep(1.0)  # the replacement takes load too
        await load.stop()
        return load, before, victim, after, answered_before_kill

    with BackgroundServer(config) as srv:
        load, before, victim, after, answered_before_kill = asyncio.run(scenario(srv.url))
        text = httpx.get(f"{srv.url}/metrics").text
    assert load.wrong == [], load.wrong[:3]
    assert answered_before_kill > 0 and len(load.codes) > answered_before_kill
    assert set(load.codes) == {200}
    lost = [e for e in after["events"] if e["event"] == "lost"]
    replaced = [e for e in after["events"] if e["event"] == "replaced"]
    assert [e["replica"] for e in lost] == [victim["replica"]], after["events"]
    assert replaced[0]["replica"] == victim["replica"] and replaced[0]["gap_s"] > 0
    assert victim["pid"] not in [p["pid"] for p in after["placement"]]
    print(f"failover: {len(load.codes)} requests, all 200; replica {victim['replica']} on {victim['worker']} "
          f"replaced in {replaced[0]['gap_s']:.2f} s on {replaced[0]['on']}")
    assert re.search(r'^swarm_serve_replica_events_total\{event="replaced"\} 1\.0$', text, re.M)
    assert re.search(r"^swarm_serve_failover_gap_seconds \d", text, re.M)


@pytest.fixture
def two_machines(tmp_path):
    """A ``dask scheduler`` and two ``dask worker`` processes started apart, as on two machines."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("SWARM_DASK_ADDRESS", None)
    dask = str(Path(sys.executable).parent / "dask")
    scheduler_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([dask, "scheduler", "--scheduler-file", str(scheduler_file), "--port", "0",
                               "--no-dashboard"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists():
            assert time.monotonic() < deadline, "the scheduler did not start"
            time.sleep(0.1)
        address = json.loads(scheduler_file.read_text())["address"]
        for name in ("machine-a", "machine-b"):
            procs.append(subprocess.Popen([dask, "worker", address, "--nthreads", "1", "--name", name,
                                           "--no-dashboard"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True))
        from distributed import Client

        with Client(address, set_as_default=False, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for proc in reversed(procs):
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)


def test_cli_serves_through_a_separate_scheduler_with_a_replica_per_worker(checkpoint, val_rows, two_machines):  # noqa: F811
    x, alone = val_rows
    env = dict(os.environ)
    env.pop("SWARM_DASK_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", "from flows.cli import entrypoint; entrypoint()", "serve", checkpoint, "--port", "0",
         "--replicas", "2", "--dask-address", two_machines, "--max-batch-size", "16"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
        found = re.search(r"http://\S+", lines[0])
        assert found, f"no URL in {lines}; {proc.communicate(timeout=30)}"
        url = found.group(0)
        placed = [re.search(r"replica (\d) on (\S+) \(pid (\d+)", line) for line in lines[1:]]
        assert all(placed), lines
        assert len({m.group(2) for m in placed}) == 2, f"one replica per worker: {lines}"
        health = httpx.get(f"{url}/health").json()
        assert health["scheduler"] == two_machines
        assert len({p["worker"] for p in health["placement"]}) == 2
        bodies = [{"inputs": x[i:i + 1].tolist()} for i in range(64)]

        async def send():
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                return await asyncio.gather(*(client.post("/predict", json=b) for b in bodies))

        answers = asyncio.run(send())
        text = httpx.get(f"{url}/metrics").text
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert [a.json()["predictions"][0] for a in answers] == alone[:64].argmax(1).tolist()
    for replica in ("0", "1"):
        assert re.search(rf'^swarm_serve_router_choices_total\{{replica="{replica}"\}} [1-9]', text, re.M), text
    assert proc.returncode == 0, stderr
    assert "stopped after answering 64 requests" in stdout


def test_autoscaling_follows_a_load_step_without_failures(checkpoint, val_rows, dask_cluster):  # noqa: F811
    x, alone = val_rows
    up_delay, down_delay, window = 1.0, 2.0, 0.5
    config = ServeConfig(model=checkpoint, port=0, replicas=1, min_replicas=1, max_replicas=2, target_ongoing=1.5,
                         upscale_delay_s=up_delay, downscale_delay_s=down_delay, autoscale_window_s=window,
                         max_batch_size=16, max_wait_ms=2)

    async def scenario(url: str):
        load = Load(url, x, alone.argmax(1))
        gates = await load.ready(32)
        gates[0].set()
        await asyncio.sleep(1.5 * up_delay)
        quiet = await _health(url)
        step = time.time()
        for gate in gates[1:]:
            gate.set()
        scaled = await _until(url, lambda h: h["replicas"] == 2, timeout=60)
        up_at = time.time()
        await asyncio.sleep(1.0)
        await load.stop()
        idle = time.time()
        down = await _until(url, lambda h: h["replicas"] == 1 and any(e["event"] == "scale_down" for e in h["events"]),
                            timeout=60)
        return load, quiet, step, scaled, up_at, idle, down

    with BackgroundServer(config) as srv:
        load, quiet, step, scaled, up_at, idle, down = asyncio.run(scenario(srv.url))
    assert load.wrong == [] and set(load.codes) == {200}
    assert quiet["replicas"] == 1 and not [e for e in quiet["events"] if e["event"].startswith("scale")]
    ups = [e for e in down["events"] if e["event"] == "scale_up"]
    downs = [e for e in down["events"] if e["event"] == "scale_down"]
    assert len(ups) == 1 and ups[0]["to"] == 2
    # The configured delay counts from when the load averaged over the window passes the
    # target: the scaler acts within the delay and one control tick of that moment.
    assert ups[0]["over_target_for_s"] <= up_delay + 0.5, f"scaled up within the delay: {ups}"
    # End to end (step -> scale-up event) also holds the window's ramp; one quiet full-suite run
    # measured 3.15 s here (2.1 s before the average crossed the target, not yet explained), so
    # the bound is the delay + window + 3 s and the figure is printed below.
    assert ups[0]["time"] - step <= up_delay + window + 3.0, f"scaled up during the load step: {ups}"
    assert downs[0]["time"] - idle >= down_delay - 0.5, "scaled down only after the delay"
    workers = {p["worker"] for p in scaled["placement"]}
    assert len(workers) == 2, scaled["placement"]
    print(f"autoscaling: up {ups[0]['time'] - step:.2f} s after the step (replica serving after "
          f"{up_at - step:.2f} s), down {downs[0]['time'] - idle:.2f} s after the load stopped; "
          f"{len(load.codes)} requests, all 200")
