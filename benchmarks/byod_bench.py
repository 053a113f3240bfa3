"""Issue 15's benchmark as one command: the JPEG loader (benchmarks/image_bench.py) and the warm
vs cold runtime (benchmarks/runtime_bench.py), one after the other, each in its own process
(so neither's imports or threads skew the other's figures).

    PYTHONPATH=. .venv/bin/python benchmarks/byod_bench.py [--images 2000] [--runs 3]

Each part prints its own table; the last printed line is one JSON object holding both parts'
figures, among them ``jpeg_loader_vs_dataloader``, ``decoded_at_staging_vs_dataloader``,
``warm_runtime_train_s`` and ``cold_runtime_train_s``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_part(script: str, args: list[str]) -> dict:
    """Run one benchmark script, echo its output, and return its last line's JSON object."""
    proc = subprocess.run([sys.executable, str(HERE / script), *args], stdout=subprocess.PIPE, text=True,
                          cwd=HERE.parent)
    print(proc.stdout, end="", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"{script} failed with exit status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="JPEGs for the loader part")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each side of the runtime part")
    args = parser.parse_args()
    images = run_part("image_bench.py", ["--images", str(args.images)])
    runtime = run_part("runtime_bench.py", ["--runs", str(args.runs)])
    print(json.dumps({**images, **runtime}))


if __name__ == "__main__":
    main()
