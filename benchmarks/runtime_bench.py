"""`swarm train` on a small table: wall time with a warm runtime vs a cold one.

Both sides run the real CLI in a subprocess, as a user would, on the same staged table
(scikit-learn's digits: 1,797 rows of 64 features; one epoch of the built-in MLP, a fresh
checkpoint folder each run so every run trains):

- cold: no ``swarm prefect-server`` runs for the command's state folder, so the command
  starts a temporary Prefect server and a local Dask cluster, and stops them at exit;
- warm: a ``swarm prefect-server`` started once beforehand (its own state folder) keeps
  both, and the command reuses them.

Runs alternate cold and warm, so a change in the machine's load hits both sides alike.
The wall time is the whole command, from process start to exit (imports, Prefect, Dask,
the training, the summary).

    .venv/bin/python benchmarks/runtime_bench.py [--runs 3]

The last printed line is one JSON object with `warm_runtime_train_s`, `cold_runtime_train_s`
(medians) and `cold_vs_warm`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CLI = [sys.executable, "-c", "from flows.cli import entrypoint; entrypoint()"]


def load() -> str:
    return Path("/proc/loadavg").read_text().split()[0] if Path("/proc/loadavg").exists() else "?"


def env_for(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "SWARM_DASK_ADDRESS")}
    env.update(SWARM_HOME=str(home), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return env


def timed_train(env: dict, dataset: str, checkpoints: Path) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run([*CLI, "train", dataset, "--epochs", "1", "--checkpoint-dir", str(checkpoints)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"swarm train failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return seconds, proc.stderr


def start_runtime(env: dict, home: Path) -> tuple[subprocess.Popen, float]:
    start = time.perf_counter()
    log = open(home.parent / "server.log", "w")
    server = subprocess.Popen([*CLI, "prefect-server"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    record = home / "server.json"
    while not record.exists():
        if server.poll() is not None or time.perf_counter() - start > 300:
            raise SystemExit(f"swarm prefect-server did not start: see {log.name}")
        time.sleep(0.2)
    return server, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each side")
    args = parser.parse_args()

    from tasks.staging import StageConfig, stage_here

    work = Path(tempfile.mkdtemp(prefix="swarm-runtime-bench-"))
    dataset = str(work / "digits")
    stage_here(StageConfig(source="digits", dest=dataset, val_fraction=0.2), 2)
    cold_env, warm_env = env_for(work / "cold-home"), env_for(work / "warm-home")
    (work / "warm-home").mkdir()
    print(f"load average at start: {load()} (shared machine: other engineers' jobs run on the same cores)", flush=True)
    server, start_s = start_runtime(warm_env, work / "warm-home")
    print(f"swarm prefect-server ready in {start_s:.1f} s (paid once)", flush=True)
    try:
        time.sleep(5)  # let the workers finish their warm imports, as they would have by a user's next command
        cold, warm = [], []
        for run in range(args.runs):
            seconds, _ = timed_train(cold_env, dataset, work / f"ck-cold-{run}")
            cold.append(seconds)
            seconds, stderr = timed_train(warm_env, dataset, work / f"ck-warm-{run}")
            if "using the warm Dask cluster" not in stderr:
                raise SystemExit(f"the warm run did not use the warm runtime:\n{stderr}")
            warm.append(seconds)
            print(f"run {run + 1}: cold {cold[-1]:5.1f} s   warm {warm[-1]:5.1f} s   (load {load()})", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    result = {
        "warm_runtime_train_s": round(statistics.median(warm), 2),
        "cold_runtime_train_s": round(statistics.median(cold), 2),
        "cold_vs_warm": round(statistics.median(cold) / statistics.median(warm), 2),
        "warm_runs_s": [round(s, 2) for s in warm],
        "cold_runs_s": [round(s, 2) for s in cold],
        "runtime_start_s": round(start_s, 2),
        "load_average_end": load(),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
