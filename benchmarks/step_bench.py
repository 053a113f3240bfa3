"""The training step on this machine (CPU): eager vs torch.compile, metrics read every step vs every 50.

Decides ``compile``'s CPU default (issue 19: on for CPU only where it measures faster). In
process (the plain ``train_rank`` function, one rank, no cluster): the built-in digits MLP
(the embedded default, 15 epochs) and a small CNN on ``synthetic-image``. Figures: the
wall time of the whole run (compilation included: what a user waits for) and the
samples/s of the last epoch (steady state), best of ``--repeats`` interleaved runs.

    .venv/bin/python benchmarks/step_bench.py [--rows 8000] [--repeats 2]

The last printed line is one JSON object with ``compile_vs_eager`` per model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8000, help="synthetic images for the CNN")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import torch

    from tasks.staging import StageConfig, commit, group_tasks, plan_stage, write_group
    from tasks.training import RankJob, TrainConfig, prepare_training
    from tasks.training.rank import train_rank

    work = Path(tempfile.mkdtemp(prefix="swarm-step-bench-"))
    datasets = {"digits": "digits", "images": f"synthetic-image?rows={args.rows}&size=16"}
    for name, source in datasets.items():
        plan = plan_stage(StageConfig(source=source, dest=str(work / name), val_fraction=0.1))
        commit(plan, [write_group(g) for g in group_tasks(plan, 1)], 1.0)
    cases = {
        "mlp digits": dict(dataset=str(work / "digits"), epochs=15),
        "cnn images": dict(dataset=str(work / "images"), model="cnn", epochs=3, batch_size=128,
                           model_args={"channels": [16, 32], "hidden": 64, "in_channels": 3, "image_size": 16}),
    }
    variants = {"eager": {"compile": False}, "eager, sync every step": {"compile": False, "sync_every": 1},
                "compile": {"compile": True}}
    results: dict = {"machine": f"{os.cpu_count()} cores, torch {torch.__version__}",
                     "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    for case, base in cases.items():
        best: dict[str, dict] = {}
        for r in range(args.repeats):
            for variant, options in variants.items():
                cfg = TrainConfig(**base, **options, resume=False,
                                  checkpoint_dir=str(work / "ck" / f"{case}-{variant}-{r}".replace(" ", "-")))
                plan = prepare_training(cfg)
                start = time.perf_counter()
                result = train_rank(RankJob(cfg, plan.model_name, plan.model_args, plan.columns))
                wall = time.perf_counter() - start
                row = {"wall_s": round(wall, 2), "samples_per_s": result.history[-1]["samples_per_s"],
                       "val_acc": result.history[-1]["val_acc"]}
                if variant not in best or row["wall_s"] < best[variant]["wall_s"]:
                    best[variant] = row
                print(f"{case:12s} {variant:24s} {row['wall_s']:7.2f} s  {row['samples_per_s']:10,.0f} samples/s "
                      f"(last epoch)  val acc {row['val_acc']}", flush=True)
        results[case] = {**best,
                         "compile_vs_eager_wall": round(best["eager"]["wall_s"] / best["compile"]["wall_s"], 3),
                         "compile_vs_eager_samples": round(best["compile"]["samples_per_s"]
                                                           / best["eager"]["samples_per_s"], 3),
                         "sync_every_50_vs_1_samples": round(best["eager"]["samples_per_s"]
                                                             / best["eager, sync every step"]["samples_per_s"], 3)}
    results["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps({"compile_vs_eager": {c: results[c]["compile_vs_eager_samples"] for c in cases}, **results}))


if __name__ == "__main__":
    main()
