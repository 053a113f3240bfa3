"""GPU checks: what only a CUDA machine can show, in one command and one table.

    python benchmarks/gpu_check.py               # ~1 minute on a GPU machine
    python benchmarks/gpu_check.py --rows 50000  # quicker

Sections (each a function in ``CHECKS``; add one with ``@check``):

* ``h2d_copy``: host-to-device bandwidth from pinned and from pageable memory, and how
  much of a pinned copy on a side stream hides behind kernels on the default stream
  (``overlap`` 1.0 = fully hidden, 0 = serialised).
* ``train_throughput``: the training rank on the GPU with its defaults (on CUDA the captured
  step and device-gathered batches; CNN on synthetic images), samples/s,
  mean GPU utilisation and data stall for fp32, bf16-mixed and fp16-mixed (grad scaler).
* ``train_step``: issue 19's before/after, in one run: the CNN at batch 512 (bf16-mixed)
  from a warm cache, on the plain path (as it was: an eager step, its metrics read every
  step, ``sync_every=1``; batches gathered on the host) and after (metrics on the device, the
  whole step as one CUDA graph with fused capturable AdamW, channels_last, batches
  gathered on the device), and with ``step_capture="compile"`` (torch.compile
  reduce-overhead) to settle which capture is the default: samples/s, GPU utilisation
  (NVML, as ``nvidia-smi`` samples it) and data-stall share; targets: utilisation >= 90 %,
  samples/s >= 3x the plain path.
* ``loader_to_gpu``: the streaming loader through the prefetcher (pinned ring, side-stream
  copies) into device tensors, at batch sizes 256 and 2048, made by a producer thread,
  by a producer process (``producer="process"``), by ``--workers`` DataLoader worker
  processes and gathered on the device (``gather="device"``, from shuffle windows copied once): samples/s and GB/s alone, then
  with a GPU step per batch (one kernel, then a sync) as long as the load time per batch:
  total time against ``max(load, compute)`` and the data-stall share.
* ``lm_train_throughput``: causal-LM training of a GPT-2-small-sized built-in GPT (12 layers,
  768 wide, context 1024) on python-stdlib tokens, fp32 vs bf16-mixed: tokens/s, MFU against
  the GPU's dense bf16 peak, mean GPU utilisation and data stall.

Without a CUDA device it says so and exits with status 2. The last line printed is one
JSON object of every figure (``section/metric``: value).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


@dataclass
class Row:
    section: str
    metric: str
    value: float
    unit: str = ""
    note: str = ""


@dataclass
class Context:
    args: argparse.Namespace
    work: Path
    device: torch.device


Check = Callable[[Context], list[Row]]
CHECKS: list[Check] = []


def check(fn: Check) -> Check:
    """Add a section to the run (training and inference add theirs the same way)."""
    CHECKS.append(fn)
    return fn


def _timed(fn, device) -> float:
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _calibrated_kernel(device, seconds: float):
    """A default-stream kernel workload lasting about ``seconds``."""
    a = torch.randn(2048, 2048, device=device)
    once = min(_timed(lambda: a @ a, device) for _ in range(5))
    reps = max(1, round(seconds / max(once, 1e-6)))

    def run():
        for _ in range(reps):
            a @ a

    return run


@check
def h2d_copy(ctx: Context) -> list[Row]:
    device, size = ctx.device, ctx.args.copy_mb << 20
    pinned = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    pageable = torch.empty(size, dtype=torch.uint8)
    target = torch.empty(size, dtype=torch.uint8, device=device)
    copy_pinned = min(_timed(lambda: target.copy_(pinned, non_blocking=True), device) for _ in range(5))
    copy_pageable = min(_timed(lambda: target.copy_(pageable), device) for _ in range(3))
    kernel = _calibrated_kernel(device, copy_pinned)
    kernel_s = min(_timed(kernel, device) for _ in range(3))
    side = torch.cuda.Stream(device=device)

    def both():
        with torch.cuda.stream(side):
            target.copy_(pinned, non_blocking=True)
        kernel()

    both_s = min(_timed(both, device) for _ in range(5))
    hidden = (copy_pinned + kernel_s - both_s) / min(copy_pinned, kernel_s)
    return [
        Row("h2d_copy", "pinned bandwidth", size / copy_pinned / 1e9, "GB/s", f"{ctx.args.copy_mb} MiB"),
        Row("h2d_copy", "pageable bandwidth", size / copy_pageable / 1e9, "GB/s"),
        Row("h2d_copy", "copy alone", copy_pinned * 1e3, "ms"),
        Row("h2d_copy", "kernels alone", kernel_s * 1e3, "ms", "default stream"),
        Row("h2d_copy", "copy + kernels", both_s * 1e3, "ms", "copy on a side stream"),
        Row("h2d_copy", "overlap", max(0.0, min(1.0, hidden)), "", "1.0 = copy fully hidden"),
    ]


def _step_kernel(device, seconds: float):
    """A training step's stand-in: one default-stream kernel of about ``seconds``, then a sync.

    ``torch.cuda._sleep`` spins for a number of GPU cycles: one launch, no host work, like a
    step whose time is all on the device. The sync is the step's ``loss.item()``; without it
    the host only queues launches and its waits say nothing about the GPU's.
    """
    cycles = 1_000_000
    once = min(_timed(lambda: torch.cuda._sleep(cycles), device) for _ in range(5))
    n = max(1, int(cycles * seconds / once))
    stream = torch.cuda.current_stream(device)

    def step():
        torch.cuda._sleep(n)
        stream.synchronize()

    return step


@check
def loader_to_gpu(ctx: Context) -> list[Row]:
    from loader_bench import stage  # noqa: PLC0415 - benchmarks/ is this script's folder

    from storage.loader import StreamingDataset
    from storage.prefetch import Prefetcher

    args, device = ctx.args, ctx.device
    url = str(ctx.work / "images")
    stage(f"synthetic-image?rows={args.rows}&size=32", url, {}, "16MB")
    opts = {"cache_dir": str(ctx.work / "cache")}
    for _ in Prefetcher(StreamingDataset(url, batch_size=args.batch_size, cache=True, storage_options=opts),
                        device=device):  # fills the node cache
        pass
    rows = []
    for producer, workers, gather in (("thread", 0, "host"), ("process", 0, "host"), ("thread", args.workers, "host"),
                                      ("thread", 0, "device")):
        for batch_size in sorted({args.batch_size, 2048}):
            rows += _loader_to_gpu(StreamingDataset(url, batch_size=batch_size, cache=True, storage_options=opts),
                                   device, workers, producer, gather)
    return rows


def _loader_to_gpu(ds, device, workers: int, producer: str, gather: str = "host") -> list[Row]:
    """One dataset through the prefetcher onto the GPU: alone, then with a step per batch."""
    from storage.prefetch import Prefetcher

    def epoch(step=None) -> tuple[float, Prefetcher, int]:
        loader = Prefetcher(ds, device=device, depth=4, stall_target=0.05, num_workers=workers, producer=producer,
                            gather=gather)
        moved = 0
        start = time.perf_counter()
        for batch in loader:
            moved += sum(t.numel() * t.element_size() for t in batch.values())
            if step is not None:
                step()
        torch.cuda.synchronize(device)
        return time.perf_counter() - start, loader, moved

    load_s, loader, moved = min((epoch() for _ in range(3)), key=lambda r: r[0])
    step = _step_kernel(device, load_s / len(ds))
    compute_s = min(_timed(lambda: [step() for _ in range(len(ds))], device) for _ in range(2))
    total_s, with_compute, _ = min((epoch(step) for _ in range(2)), key=lambda r: r[0])
    section = f"loader_to_gpu {ds.base_spec.batch_size}" + (f" w{workers}" if workers else "") + (
        " proc" if producer == "process" else "") + (" dev" if gather == "device" else "")
    return [
        Row(section, "samples/s", loader.stats.samples / load_s, "", "warm cache, loader alone"),
        Row(section, "to device", moved / load_s / 1e9, "GB/s"),
        Row(section, "load / compute", load_s / compute_s, "", "compute = 1 kernel + sync per batch"),
        Row(section, "overlap_vs_ideal", total_s / max(load_s, compute_s), "", "target <= 1.1"),
        Row(section, "stall share", with_compute.stats.stall_share, "", "with compute; target <= 0.05"),
    ]


class _Utilisation:
    """Mean GPU utilisation while a block runs, sampled every 100 ms from NVML (``pynvml``, the
    counter ``nvidia-smi`` shows) where it is installed, else from ``nvidia-smi`` itself."""

    def __enter__(self):
        import subprocess
        import threading

        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        except Exception:  # noqa: BLE001 - no NVML bindings: fall back to nvidia-smi
            handle = None
        self.source = "nvml" if handle is not None else "nvidia-smi"
        if handle is not None:
            self.values, self.stop = [], threading.Event()

            def sample():
                while not self.stop.wait(0.1):
                    self.values.append(float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))

            self.thread = threading.Thread(target=sample, daemon=True)
            self.thread.start()
            self.proc = None
            return self
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "100"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc):
        if self.proc is None:
            self.stop.set()
            self.thread.join()
            self.mean = sum(self.values) / len(self.values) if self.values else float("nan")
            return
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=10)
        values = [float(v) for v in out.split() if v.replace(".", "", 1).isdigit()]
        self.mean = sum(values) / len(values) if values else float("nan")


def _train(ctx: Context, url: str, tag: str, **options) -> tuple[dict, float, str]:
    """The training rank on the CNN, batch 512, 2 epochs: epoch 2's row and its mean GPU utilisation."""
    from tasks.training import RankJob, TrainConfig, prepare_training
    from tasks.training.rank import train_rank

    cfg = TrainConfig(dataset=url, model="cnn", model_args={"channels": [64, 128, 256], "hidden": 256},
                      batch_size=512, resume=False, checkpoint_dir=str(ctx.work / f"ck-{tag}"),
                      **{"epochs": 2, "precision": "bf16-mixed", **options})
    plan = prepare_training(cfg)
    job = RankJob(cfg, plan.model_name, plan.model_args, plan.columns)
    with _Utilisation() as util:
        result = train_rank(job)
    return result.history[-1], util.mean, util.source


@check
def train_step(ctx: Context) -> list[Row]:
    """Before (plain step, host batches) and after (captured step, device batches), one run."""
    from loader_bench import stage  # noqa: PLC0415

    url = str(ctx.work / "train-images")
    stage(f"synthetic-image?rows={min(ctx.args.rows, 60_000)}&size=32", url, {}, "16MB")
    variants = {
        "plain": {"compile": False, "device_batches": "host", "sync_every": 1},
        "graph": {"compile": True, "step_capture": "graph", "device_batches": "device"},
        "compile": {"compile": True, "step_capture": "compile", "device_batches": "device"},
        "graph host batches": {"compile": True, "step_capture": "graph", "device_batches": "host"},
    }
    rows, rates = [], {}
    for name, options in variants.items():
        last, util, source = _train(ctx, url, name.replace(" ", "-"), **options)
        rates[name] = last["samples_per_s"]
        rows += [
            Row("train_step", f"{name} samples/s", last["samples_per_s"], "", "cnn 64-128-256, batch 512, bf16, epoch 2"),
            Row("train_step", f"{name} GPU utilisation", util, "%", f"mean while training ({source}); target >= 90"),
            Row("train_step", f"{name} data stall", last["data_stall_share"], "", "share of epoch time"),
        ]
    for name in ("graph", "compile", "graph host batches"):
        rows.append(Row("train_step", f"{name} vs plain", rates[name] / rates["plain"], "x", "target >= 3"))
    return rows


@check
def train_throughput(ctx: Context) -> list[Row]:
    """The training rank on one GPU: samples/s and GPU utilisation, fp32 vs bf16 vs fp16 autocast."""
    from loader_bench import stage  # noqa: PLC0415

    from tasks.training import RankJob, TrainConfig, prepare_training
    from tasks.training.rank import train_rank

    url = str(ctx.work / "train-images")
    stage(f"synthetic-image?rows={min(ctx.args.rows, 60_000)}&size=32", url, {}, "16MB")
    rows = []
    for precision in ("fp32", "bf16-mixed", "fp16-mixed"):
        cfg = TrainConfig(dataset=url, model="cnn", model_args={"channels": [64, 128, 256], "hidden": 256},
                          epochs=2, batch_size=512, precision=precision, resume=False,
                          checkpoint_dir=str(ctx.work / f"ck-{precision}"))
        plan = prepare_training(cfg)
        job = RankJob(cfg, plan.model_name, plan.model_args, plan.columns)
        with _Utilisation() as util:
            result = train_rank(job)
        last = result.history[-1]
        rows += [
            Row("train", f"{precision} samples/s", last["samples_per_s"], "", "cnn 64-128-256, batch 512, epoch 2"),
            Row("train", f"{precision} GPU utilisation", util.mean, "%", "mean while training (nvidia-smi)"),
            Row("train", f"{precision} data stall", last["data_stall_share"], "", "share of epoch time"),
        ]
    if torch.cuda.device_count() < 2:
        rows.append(Row("train", "DDP grad compression", float("nan"), "", "needs 2+ GPUs: not measured here"))
    return rows


@check
def generation(ctx: Context) -> list[Row]:
    """The generation engine on one GPU: 64 requests (16-256 new tokens) on a random-weight
    Llama, all queued at once: tokens/s, time to first token, KV-pool use, GPU utilisation."""
    import random

    from transformers import LlamaConfig, LlamaForCausalLM

    from tasks.generation import Engine, Request, SamplingParams, runner_for_model

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32_000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=1024,
                      bos_token_id=None, eos_token_id=None, pad_token_id=0)
    model = LlamaForCausalLM(cfg).to(ctx.device, torch.bfloat16).eval()
    rng = random.Random(0)
    work = [([rng.randrange(1, cfg.vocab_size) for _ in range(rng.randint(8, 256))], rng.randint(16, 256))
            for _ in range(64)]
    engine = Engine(runner_for_model(model), pool_tokens=64 * 512, block_size=16, max_batch=64,
                    max_tokens_per_step=1024)
    engine.generate([Request(p, SamplingParams(max_new_tokens=4)) for p, _ in work[:4]])   # warm-up
    with _Utilisation() as util:
        start = time.perf_counter()
        results = engine.generate([Request(p, SamplingParams(max_new_tokens=n)) for p, n in work])
        wall = time.perf_counter() - start
    stats = engine.stats()
    ttft = sorted(r.ttft_s for r in results)
    note = "llama 8x1024 bf16, 64 requests queued at once"
    return [
        Row("generation", "output tokens/s", sum(len(r.tokens) for r in results) / wall, "", note),
        Row("generation", "ttft p50", ttft[len(ttft) // 2], "s"),
        Row("generation", "ttft p99", ttft[-1], "s"),
        Row("generation", "KV pool peak use", stats["kv_pool"]["peak_blocks_used"] / stats["kv_pool"]["blocks_total"],
            "", f"of {stats['kv_pool']['bytes_total'] / 2**20:.0f} MiB"),
        Row("generation", "GPU utilisation", util.mean, "%", "mean while generating (nvidia-smi)"),
    ]


@check
def lm_train_throughput(ctx: Context) -> list[Row]:
    """Causal-LM training on the GPU: tokens/s, MFU and utilisation of a GPT-2-small-sized GPT."""
    from lm_bench import stage_corpus  # noqa: PLC0415

    from tasks.training import RankJob, TrainConfig, prepare_training
    from tasks.training.rank import train_rank

    url = str(ctx.work / "python-stdlib")
    stage_corpus(url, tokens=min(ctx.args.rows, 400_000), seq_len=1024, vocab=8192)
    gpt = {"d_model": 768, "n_layers": 12, "n_heads": 12}
    rows = []
    for precision in ("fp32", "bf16-mixed"):
        cfg = TrainConfig(dataset=url, model="gpt", model_args=gpt, epochs=2, batch_size=8, precision=precision,
                          lr=3e-4, resume=False, checkpoint_dir=str(ctx.work / f"lm-ck-{precision}"))
        plan = prepare_training(cfg)
        job = RankJob(cfg, plan.model_name, plan.model_args, plan.columns, lm=plan.lm)
        with _Utilisation() as util:
            result = train_rank(job)
        last = result.history[-1]
        note = "gpt 12x768, context 1024, batch 8, epoch 2"
        rows += [
            Row("lm_train", f"{precision} tokens/s", last["tokens_per_s"], "", note),
            Row("lm_train", f"{precision} MFU", 100 * last["mfu"], "%", "vs dense bf16 peak (tasks.training.lm)"),
            Row("lm_train", f"{precision} GPU utilisation", util.mean, "%", "mean while training (nvidia-smi)"),
            Row("lm_train", f"{precision} data stall", last["data_stall_share"], "", "share of epoch time"),
        ]
    return rows


def print_table(rows: list[Row]) -> None:
    print(f"{'section':<22} {'metric':<28} {'value':>12} {'unit':<6} note")
    for r in rows:
        print(f"{r.section:<22} {r.metric:<28} {r.value:>12.3f} {r.unit:<6} {r.note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--copy-mb", type=int, default=256)
    parser.add_argument("--workers", type=int, default=4, help="DataLoader worker processes, the second loader run")
    parser.add_argument("--only", nargs="*", help="run only these sections")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False; torch "
              f"{torch.__version__}). Run it on a machine with an NVIDIA GPU and a CUDA build of torch.",
              file=sys.stderr)
        return 2
    ctx = Context(args, Path(tempfile.mkdtemp(prefix="gpu-check-")), torch.device("cuda"))
    print(f"device: {torch.cuda.get_device_name(ctx.device)}, torch {torch.__version__}")
    rows: list[Row] = []
    failed = []
    for fn in CHECKS:
        if args.only and fn.__name__ not in args.only:
            continue
        try:
            rows.extend(fn(ctx))
        except Exception:  # one broken section must not cost the others' figures (device time is scarce)
            traceback.print_exc()
            failed.append(fn.__name__)
            rows.append(Row(fn.__name__, "FAILED", float("nan"), "", "traceback above"))
    print_table(rows)
    print(json.dumps({f"{r.section}/{r.metric}": (None if r.value != r.value else round(r.value, 4)) for r in rows}))
    if failed:
        print(f"gpu_check: sections failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
