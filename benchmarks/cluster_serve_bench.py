"""Serving on Dask worker processes: ours vs Ray Serve, scaling, router latency, failover.

One command, everything on this machine, each server in its own processes on loopback and
the load from Debian's ``wrk`` (C, one thread, a Lua script rotating real digits rows: one row
per request, closed loop per connection), whose CPU use is reported so it can be seen not to
be the limit. Before each measurement every server's answers are checked against the model's
class for each row alone.

1. ``swarm serve`` (replicas on a local Dask cluster of worker processes, router in the front)
   vs Ray Serve 2.x (``@serve.batch`` at the same max batch size and wait, the same replicas),
   32 connections, on the digits MLP.
2. Scaling: 2 worker-process replicas vs 1 on a wide MLP (64-2048-2048-2048-10), CPU-bound.
3. Router added latency: 1 connection, the cluster server vs ``--in-process`` (thread replica),
   both with ``--max-wait-ms 0`` (a lone request would otherwise wait out the batch window in
   both, and the timer's jitter on a loaded machine would drown the router's share).
4. Failover: 32 connections on 2 replicas; one replica's worker process is SIGKILLed midway;
   failed requests (non-2xx and socket errors) and the time without it.

    .venv/bin/python benchmarks/cluster_serve_bench.py [--duration 8] [--ray-python /work/venvs/cluster-serving/bin/python]

Ray Serve runs from its own environment (``--ray-python``; BENCHMARKS.md has the install
command). Last line: one JSON object with ``vs_ray_serve_throughput``, ``vs_ray_serve_p99``,
``scaling_2_vs_1``, ``router_added_p50_ms``, ``failover_failed_requests`` and the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.serve_bench import Server, train_model  # noqa: E402


def lua_script(path: Path, x: np.ndarray) -> str:
    bodies = ",\n".join("[=[" + json.dumps({"inputs": [row.tolist()]}) + "]=]" for row in x)  # JSON holds ]]
    path.write_text(f"""local bodies = {{
{bodies}
}}
local i = 0
request = function()
  i = i + 1
  return wrk.format("POST", "/predict", {{["Content-Type"] = "application/json"}}, bodies[(i % #bodies) + 1])
end
""")
    return str(path)


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}[unit]


def wrk(url: str, lua: str, connections: int, duration: float) -> dict:
    """``wrk`` against ``url``/predict: throughput, p50/p99, failures, and wrk's own CPU share."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(["wrk", "-t", "1", "-c", str(connections), "-d", f"{duration:g}s", "--latency",
                          "--timeout", "30s", "-s", lua, f"{url}/predict"], capture_output=True, text=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    return {"connections": connections, "requests": requests,
            "throughput": round(float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), 1),
            "p50_ms": round(_ms(re.search(r"50%\s+(\S+)", out).group(1)), 3),
            "p99_ms": round(_ms(re.search(r"99%\s+(\S+)", out).group(1)), 3),
            "failed": (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, errors.groups())) if errors else 0),
            "load_generator_cpu_share": round(cpu / duration, 3)}


def check_answers(url: str, x: np.ndarray, classes: np.ndarray, rows: int = 40) -> None:
    for i in range(rows):
        req = urllib.request.Request(f"{url}/predict", data=json.dumps({"inputs": [x[i].tolist()]}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            got = json.loads(resp.read())["predictions"]
        if got != [int(classes[i])]:
            raise RuntimeError(f"{url}: row {i} answered {got}, the model says {int(classes[i])}")


def measure(name: str, url: str, lua: str, connections: int, args) -> dict:
    wrk(url, lua, connections, args.warmup)  # adaptive batch sizes settle, connections warm
    row = {"server": name, **wrk(url, lua, connections, args.duration)}
    print(f"{name:28s} c={connections:<3d} {row['throughput']:8,.0f} req/s  p50 {row['p50_ms']:7.2f} ms  "
          f"p99 {row['p99_ms']:7.2f} ms  failed {row['failed']}  wrk CPU {100 * row['load_generator_cpu_share']:.0f}%",
          flush=True)
    return row


class Ours(Server):
    """``swarm serve`` (cluster mode by default) with its URL; no SWARM_DASK_ADDRESS, so its own local cluster."""

    def __init__(self, checkpoint: str, *options: str):
        os.environ.pop("SWARM_DASK_ADDRESS", None)
        super().__init__(checkpoint, *options)
        self.url = f"http://{self.host}:{self.port}"


class RayServe:
    def __init__(self, python: str, checkpoint: str, replicas: int, max_batch: int, max_wait_ms: float):
        from deployments.runtime import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([python, str(ROOT / "benchmarks" / "ray_serve_app.py"), checkpoint, str(self.port),
                                      str(replicas), str(max_batch), str(max_wait_ms)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        line = self.proc.stdout.readline()
        if "READY" not in line:
            self.stop()
            raise RuntimeError(f"Ray Serve did not start: {line}{self.proc.stderr.read()[-3000:]}")

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def failover(checkpoint: str, lua: str, common: list[str], args) -> dict:
    server = Ours(checkpoint, "--replicas", "2", *common)
    try:
        check_answers(server.url, *args.rows)
        wrk(server.url, lua, 32, args.warmup)
        victim = server.health()["placement"][0]
        result: dict = {}

        def kill_later() -> None:
            time.sleep(args.duration / 3)
            os.kill(victim["pid"], signal.SIGKILL)

        import threading

        killer = threading.Thread(target=kill_later)
        killer.start()
        result = wrk(server.url, lua, 32, args.duration)
        killer.join()
        deadline = time.monotonic() + 120
        while not (health := server.health())["last_failover_gap_s"] and time.monotonic() < deadline:
            time.sleep(0.5)
        result.update(server="failover (2 replicas)", killed_replica=victim["replica"], killed_pid=victim["pid"],
                      gap_s=health["last_failover_gap_s"], replicas_after=health["replicas"],
                      router_retries=health["router"]["retries"])
        print(f"failover: {result['requests']} requests, {result['failed']} failed; replica {victim['replica']} "
              f"(pid {victim['pid']}) replaced after {result['gap_s']} s, {result['router_retries']} batch(es) "
              "sent again", flush=True)
        return result
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="Seconds measured per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="Seconds of load before each measurement")
    parser.add_argument("--replicas", type=int, default=1, help="Replicas for the Ray Serve comparison")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--ray-python", default="/work/venvs/cluster-serving/bin/python")
    parser.add_argument("--skip", default="", help="Comma-separated parts to skip: ray,scaling,latency,failover")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install -y wrk")
    work = Path(tempfile.mkdtemp(prefix="swarm-cluster-bench-"))
    small, x, classes = train_model(work / "small", [128, 64])
    args.rows = (x, classes)
    lua = lua_script(work / "rows.lua", x)
    common = ["--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
              "--threads-per-replica", "1"]
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (shared); wrk: 1 thread; "
          f"max batch {args.max_batch_size}, max wait {args.max_wait_ms} ms", flush=True)
    summary: dict = {}
    rows: list[dict] = []

    server = Ours(small, "--replicas", str(args.replicas), *common)
    try:
        check_answers(server.url, x, classes)
        ours = measure(f"swarm serve ({args.replicas} on Dask)", server.url, lua, 32, args)
    finally:
        server.stop()
    rows.append(ours)

    if "ray" not in skip:
        ray = RayServe(args.ray_python, small, args.replicas, args.max_batch_size, args.max_wait_ms)
        try:
            check_answers(ray.url, x, classes)
            theirs = measure(f"Ray Serve ({args.replicas} replica(s))", ray.url, lua, 32, args)
        finally:
            ray.stop()
        rows.append(theirs)
        summary["vs_ray_serve_throughput"] = round(ours["throughput"] / theirs["throughput"], 2)
        summary["vs_ray_serve_p99"] = round(ours["p99_ms"] / theirs["p99_ms"], 3)

    if "latency" not in skip:
        at_1 = {}
        no_wait = [*common[:2], "--max-wait-ms", "0", *common[4:]]
        for name, options in (("swarm serve, 1 on Dask", []), ("swarm serve --in-process", ["--in-process"])):
            server = Ours(small, "--replicas", "1", *options, *no_wait)
            try:
                check_answers(server.url, x, classes)
                at_1[name] = measure(f"{name}, no wait", server.url, lua, 1, args)
            finally:
                server.stop()
        rows += list(at_1.values())
        cluster_1, local_1 = at_1.values()
        summary["router_added_p50_ms"] = round(cluster_1["p50_ms"] - local_1["p50_ms"], 3)

    if "scaling" not in skip:
        wide, wx, wclasses = train_model(work / "wide", [2048, 2048, 2048])
        wide_lua = lua_script(work / "wide.lua", wx)
        by_replicas = {}
        for n in (1, 2):
            server = Ours(wide, "--replicas", str(n), *common)
            try:
                check_answers(server.url, wx, wclasses)
                by_replicas[n] = measure(f"wide MLP, {n} replica(s) on Dask", server.url, wide_lua, 32, args)
            finally:
                server.stop()
        rows += list(by_replicas.values())
        summary["scaling_2_vs_1"] = round(by_replicas[2]["throughput"] / by_replicas[1]["throughput"], 2)

    if "failover" not in skip:
        result = failover(small, lua, common, args)
        rows.append(result)
        summary["failover_failed_requests"] = result["failed"]
        summary["failover_gap_s"] = result["gap_s"]

    summary.update(targets={"vs_ray_serve_throughput": ">= 3", "vs_ray_serve_p99": "<= 1", "scaling_2_vs_1": ">= 1.6",
                            "router_added_p50_ms": "<= 1", "failover_failed_requests": "0"},
                   load_average=round(os.getloadavg()[0], 1), runs=rows)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
