"""Model optimization on this CPU: int8 vs fp32 throughput, size and accuracy, per model.

Trains three built-in models in-process (plain functions, one torch thread, as a Dask
worker runs them) and runs the real optimization path (`prepare_optimization` and
`optimize`, which write the artifact) on each:

- digits-mlp: the default digits model, MLP 64 -> 128 -> 64 -> 10 (17k parameters);
- wide-mlp:   MLP 64 -> 1024 -> 1024 -> 10 on digits (1.1M parameters), the larger model;
- transformer: the built-in transformer on synthetic-tokens (d_model 128, FFN 512).

Throughput is at batch 64 and latency at batch 1, one thread, best-of-5 blocks; the int8
speedup is then re-measured on the *loaded* artifact (what inference runs), alternating
fp32 and int8 for a few rounds and taking the median ratio. torchao's own CPU int8
configs are measured on the wide MLP for comparison (when torchao is installed).

    .venv/bin/python benchmarks/optimize_bench.py [--hidden 1024] [--rounds 3] [--skip-transformer]

The last printed line is one JSON object; `int8_speedup`, `int8_size_ratio` and
`int8_accuracy_drop` are int8-dynamic on the wide MLP (the target model); every model's
figures are under `models`.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGETS = {"speedup": 2.0, "size_ratio": 0.30, "accuracy_drop": 1.0}


def stage(source: str, dest: str) -> str:
    from tasks.staging import StageConfig, stage_here

    stage_here(StageConfig(source=source, dest=dest, val_fraction=0.2))
    return dest


def train(dataset: str, checkpoint_dir: str, **kw) -> tuple[str, float]:
    from tasks.training import TrainConfig, prepare_training
    from tasks.training.rank import RankJob, train_rank

    cfg = TrainConfig(dataset=dataset, checkpoint_dir=checkpoint_dir, resume=False, **kw)
    plan = prepare_training(cfg)
    result = train_rank(RankJob(cfg, plan.model_name, plan.model_args, plan.columns))
    return result.checkpoint, result.history[-1]["val_acc"]


def eval_batches(dataset: str, checkpoint: str):
    """The eval split as arrays, and batches of 1 and 64 rows as model inputs."""
    import numpy as np

    from tasks.models.loading import load_model
    from tasks.training.data import feature_tensor, load_split, resolve_columns
    from storage.dataset import Dataset

    columns = load_model(checkpoint).columns
    cols = resolve_columns(Dataset.open(dataset), columns.get("feature"), columns.get("label"))
    x, y = load_split(dataset, "val", cols)
    return x, y, cols, feature_tensor(x[:1], cols), feature_tensor(x[np.resize(np.arange(len(y)), 64)], cols)


def median_speedup(base, candidate, batch, rounds: int) -> float:
    import torch

    from tasks.optimize.report import best_seconds

    ratios = []
    with torch.inference_mode():
        for _ in range(rounds):
            ratios.append(best_seconds(lambda: base(batch)) / best_seconds(lambda: candidate(batch)))
    return round(statistics.median(ratios), 3)


def run_model(label: str, checkpoint: str, dataset: str, work: Path, rounds: int) -> dict:
    from tasks.models.loading import load_model
    from tasks.optimize import OptimizeConfig, optimize, prepare_optimization

    _, _, _, one, batch = eval_batches(dataset, checkpoint)
    base = load_model(checkpoint).model
    figures = {}
    variants = {"int8-dynamic": {"quantize": "int8-dynamic"}, "int8-weight-only": {"quantize": "int8-weight-only"},
                "bf16": {"dtype": "bf16"}, "prune-0.5-structured": {"prune": 0.5, "structured": True},
                "prune-0.5": {"prune": 0.5}}
    for name, steps in variants.items():
        cfg = OptimizeConfig(checkpoint=checkpoint, eval_dataset=dataset, output=str(work / f"{label}-{name}"),
                             max_accuracy_drop=100, **steps)
        result = optimize(cfg, prepare_optimization(cfg))
        b, a = result.before, result.after
        row = {"size_ratio": round(a["size_bytes"] / b["size_bytes"], 4),
               "parameters": a["parameters"], "nonzeros": a["nonzeros"],
               "accuracy_before": round(100 * b["accuracy"], 2), "accuracy_after": round(100 * a["accuracy"], 2),
               "accuracy_drop": round(result.accuracy_drop, 2),
               "fp32_samples_per_s_b64": b["throughput"], "samples_per_s_b64": a["throughput"],
               "fp32_latency_ms_b1": b["latency_ms"], "latency_ms_b1": a["latency_ms"]}
        loaded = load_model(result.output).model
        row["speedup_b64"] = median_speedup(base, loaded, batch, rounds)
        row["speedup_b1"] = median_speedup(base, loaded, one, rounds)
        figures[name] = row
        print(f"  {label:12s} {name:22s} size x{row['size_ratio']:<7} accuracy {row['accuracy_before']:6.2f} -> "
              f"{row['accuracy_after']:6.2f}  throughput b64 x{row['speedup_b64']:<6} latency b1 x{row['speedup_b1']}",
              flush=True)
    return {"parameters": figures["int8-dynamic"]["parameters"], "variants": figures}


def torchao_figures(checkpoint: str, dataset: str, rounds: int) -> dict:
    """torchao's int8 configs, eager, on the same model and inputs (for the backend choice)."""
    import copy

    import torch

    from tasks.models.loading import load_model
    from tasks.optimize.report import accuracy

    logging.getLogger("torchao").setLevel(logging.ERROR)  # its CUDA-only libraries fail to load on CPU
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        print("  torchao is not installed: its comparison is skipped (pip install torchao)", flush=True)
        return {}

    x, y, cols, one, batch = eval_batches(dataset, checkpoint)
    base = load_model(checkpoint).model
    out = {}
    for name, config in (("torchao-int8-dynamic", Int8DynamicActivationInt8WeightConfig()),
                         ("torchao-int8-weight-only", Int8WeightOnlyConfig())):
        model = copy.deepcopy(base)
        quantize_(model, config)
        out[name] = {"speedup_b64": median_speedup(base, model, batch, rounds),
                     "speedup_b1": median_speedup(base, model, one, rounds),
                     "accuracy": round(100 * accuracy(model, x, y, cols), 2)}
        print(f"  {'wide-mlp':12s} {name:22s} throughput b64 x{out[name]['speedup_b64']:<6} "
              f"latency b1 x{out[name]['speedup_b1']}  (eager, no torch.compile)", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024, help="Width of the wide MLP's two hidden layers")
    parser.add_argument("--rounds", type=int, default=3, help="Alternating timing rounds per speedup")
    parser.add_argument("--skip-transformer", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="swarm-optimize-bench-"))
    digits = stage("digits", str(work / "digits"))
    models = {
        "digits-mlp": (digits, {"epochs": 15}),
        "wide-mlp": (digits, {"epochs": 15, "model": "mlp", "model_args": {"hidden": [args.hidden, args.hidden]}}),
    }
    if not args.skip_transformer:
        tokens = stage("synthetic-tokens?rows=6000&seq_len=64&vocab=1024&classes=4", str(work / "tokens"))
        models["transformer"] = (tokens, {"epochs": 3, "model": "transformer",
                                          "model_args": {"d_model": 128, "d_ff": 512, "n_heads": 4}})
    print(f"torch {torch.__version__}, 1 thread; eval on each dataset's val split", flush=True)
    results, checkpoints = {}, {}
    for label, (dataset, kw) in models.items():
        checkpoints[label], val_acc = train(dataset, str(work / "ck" / label), **kw)
        print(f"{label}: trained to {100 * val_acc:.2f}% val accuracy", flush=True)
        results[label] = run_model(label, checkpoints[label], dataset, work / "out", args.rounds)
    results["wide-mlp"]["torchao"] = torchao_figures(checkpoints["wide-mlp"], digits, args.rounds)

    head = results["wide-mlp"]["variants"]["int8-dynamic"]
    summary = {
        "int8_model": f"mlp 64-{args.hidden}-{args.hidden}-10 on digits (int8-dynamic)",
        "int8_speedup": head["speedup_b64"],
        "int8_size_ratio": head["size_ratio"],
        "int8_accuracy_drop": head["accuracy_drop"],
        "targets": TARGETS,
        "met": {"speedup": head["speedup_b64"] >= TARGETS["speedup"],
                "size_ratio": head["size_ratio"] <= TARGETS["size_ratio"],
                "accuracy_drop": head["accuracy_drop"] <= TARGETS["accuracy_drop"]},
        "models": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
