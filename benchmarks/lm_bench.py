"""Causal-LM training throughput: our flow (1 and 2 ranks, fp32 and bf16) against a plain loop.

The corpus is the Python standard library's own ``.py`` sources (``python-stdlib``: no
download), tokenized with a byte-level BPE fitted on it and packed into blocks as the data
contract says (documents joined by end-of-text, cut into ``--seq-len`` blocks), staged by the
product's own text staging (``tasks.staging.stage_here``).

Compared, with the same GPT config, per-rank batch and one thread per rank:

* ``train_model`` (the product path: Prefect flow, Dask workers, streaming loader and
  prefetcher, masked loss, checkpoints at epoch ends) with 1 rank and with 2 ranks, fp32,
  and 1 rank bf16-mixed: tokens/s of the last epoch (steady state; the first warms up);
* nanoGPT's way: one process reading random blocks from a NumPy memmap of the same
  tokens, ``loss = cross_entropy(model(x), y)``, AdamW, tokens/s after 10 warm-up steps
  over as many steps as one epoch of ours; run before and after our runs, averaged (the
  load of a shared machine drifts; the 1-rank fp32 flow likewise runs first and last).

    .venv/bin/python benchmarks/lm_bench.py [--tokens 60000] [--seq-len 128] [--epochs 2]

The last printed line is one JSON object with ``lm_scaling_2_vs_1``, ``lm_vs_plain_loop`` and
``bf16_vs_fp32``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPT = {"d_model": 128, "n_layers": 4, "n_heads": 4}


def stage_corpus(dest: str, tokens: int, seq_len: int, vocab: int = 4096, val_fraction: float = 0.05) -> dict:
    """Stage about ``tokens`` tokens of the built-in python-stdlib as packed blocks, through the
    product's own text staging (a byte-level BPE fitted on the train split); returns the metadata."""
    from storage.dataset import Dataset
    from tasks.staging import StageConfig, stage_here

    files = max(2, tokens // 500)  # the first files in path order hold ~500-600 tokens each
    stage_here(StageConfig(source=f"python-stdlib?max_files={files}", dest=dest, vocab_size=vocab, seq_len=seq_len,
                           val_fraction=val_fraction))
    return Dataset.open(dest).manifest.metadata


def plain_loop(dataset: str, seq_len: int, vocab: int, batch: int, steps: int, lr: float) -> float:
    """nanoGPT's loop over a memmap of the same tokens; tokens/s after 10 warm-up steps."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from storage.dataset import Dataset
    from tasks.models.gpt import GPT as Model
    from tasks.models.gpt import GPTConfig
    from tasks.training.lm_data import token_array

    torch.set_num_threads(1)
    path = Path(dataset) / "train.bin"
    token_array(Dataset.open(dataset).read_table("train"), "tokens").astype(np.uint16).tofile(path)
    data = np.memmap(path, dtype=np.uint16, mode="r")
    torch.manual_seed(0)
    model = Model(GPTConfig(vocab_size=vocab, seq_len=seq_len, **GPT))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(0)

    def get_batch():
        ix = rng.integers(0, len(data) - seq_len - 1, batch)
        x = torch.from_numpy(np.stack([data[i:i + seq_len].astype(np.int64) for i in ix]))
        y = torch.from_numpy(np.stack([data[i + 1:i + 1 + seq_len].astype(np.int64) for i in ix]))
        return x, y

    started = None
    for step in range(10 + steps):
        if step == 10:
            started = time.perf_counter()
        x, y = get_batch()
        loss = F.cross_entropy(model(x).view(-1, vocab), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return steps * batch * seq_len / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=60_000)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="swarm-lm-bench-"))
    os.environ["SWARM_HOME"] = str(work / "home")
    from deployments.runtime import PrefectServer, use_api
    from distributed import LocalCluster

    from flows.train import train_model
    from storage.dataset import Dataset
    from tasks.training import TrainConfig

    dataset = str(work / "python-stdlib")
    meta = stage_corpus(dataset, args.tokens, args.seq_len)
    print(f"python-stdlib: {meta['documents']} files, {meta['tokens']:,} tokens, vocab {meta['vocab_size']}, "
          f"blocks of {args.seq_len}; gpt {GPT}, per-rank batch {args.batch_size}, one thread per rank", flush=True)
    server = PrefectServer(work / "prefect").start()
    use_api(server.url)
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    os.environ["SWARM_DASK_ADDRESS"] = cluster.scheduler_address
    try:
        def run(name: str, **kw) -> tuple[float, int]:
            cfg = TrainConfig(dataset=dataset, model="gpt", model_args=GPT, epochs=args.epochs, lr=1e-3,
                              batch_size=args.batch_size, checkpoint_dir=str(work / "ck" / name), resume=False, **kw)
            result = train_model(cfg)
            last = result.history[-1]
            print(f"{name:24s} {last['tokens_per_s']:10,.0f} tokens/s   MFU {100 * last['mfu']:5.2f}%   "
                  f"stall {100 * last['data_stall_share']:5.1f}%   val ppl {last['val_ppl']:.1f}", flush=True)
            return last["tokens_per_s"], result.steps // args.epochs

        steps = len(Dataset.open(dataset).read_table("train")) // args.batch_size  # one epoch of 1 rank

        def plain_run(when: str) -> float:
            plain = plain_loop(dataset, args.seq_len, meta["vocab_size"], args.batch_size, steps, 1e-3)
            print(f"{'plain loop (memmap), ' + when:24s} {plain:10,.0f} tokens/s   ({steps} steps after 10 warm-up)",
                  flush=True)
            return plain

        # The plain loop runs before and after the flows: on a shared machine the load drifts.
        plain_before = plain_run("before")
        one_before, _ = run("flow, 1 rank fp32", world_size=1)
        two, _ = run("flow, 2 ranks fp32", world_size=2)
        bf16, _ = run("flow, 1 rank bf16-mixed", world_size=1, precision="bf16-mixed")
        one_after, _ = run("flow, 1 rank fp32, again", world_size=1)
        one = (one_before + one_after) / 2
        plain = (plain_before + plain_run("after")) / 2
        summary = {
            "lm_scaling_2_vs_1": round(two / one, 3),
            "lm_vs_plain_loop": round(one / plain, 3),
            "bf16_vs_fp32": round(bf16 / one, 3),
            "tokens_per_s": {"1_rank": one, "2_ranks": two, "1_rank_bf16": bf16, "plain_loop": round(plain, 1)},
        }
        print(json.dumps(summary))
    finally:
        cluster.close()
        server.stop()


if __name__ == "__main__":
    main()
