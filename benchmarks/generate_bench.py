"""The generation engine alone vs transformers, same model, same machine, one run.

Model: a Llama with random weights built from a LlamaConfig (``--hidden`` wide, ``--layers``
layers, grouped-query attention, vocabulary ``--vocab``); weights do not change speed, and
every mode runs the same module in this process on the same torch threads.

Workload: ``--requests`` (64) requests with random prompts of 8-64 tokens; each asks for up
to 256 new tokens and ends at its own drawn length (``--min-new``..``--max-new``), as a stop
sequence would end it.

- online, ours: the engine's background loop; ``--clients`` (32) closed-loop client threads,
  each submitting its next request when its last one finished. Throughput = useful output
  tokens / wall time; time to first token per request (p50, p99).
- online over HTTP: the same workload through ``swarm serve-model``'s OpenAI-compatible app
  (:mod:`tasks.generation.http`, a server on loopback in this process over the model saved
  as an ``hf:`` folder) from ``--clients`` closed-loop streaming clients in a separate
  process (``benchmarks/generate_http_clients.py``); time to first token as the clients see
  it, and the tokens checked equal to the engine's own (greedy). ``--skip http`` leaves it out.
- static: ``model.generate()`` (greedy, its own KV cache) over left-padded batches of
  ``--clients`` requests in arrival order; a batch runs until its longest request's length
  and only each request's own tokens count (the rest is padding work a static batch pays).
- sequential: ``model.generate()`` one request at a time, each to its own length (the first
  ``--sequential-requests`` (16) of them: its rate does not depend on how many).
- transformers' continuous batching: ``model.generate_batch`` (paged attention) on the first
  ``--hf-cb-requests`` requests cut to 16 new tokens (it is far too slow on CPU for the
  whole workload); its tokens/s is compared with ours on the full workload.
- offline: ``--offline-prompts`` prompts through ``Engine.generate`` (queue kept full) vs
  ``generate()`` in static batches of ``--clients``.
- KV memory: under a budget of ``--kv-budget`` cache tokens, a contiguous cache reserves
  prompt + 256 per sequence; ours runs the workload (all requests queued at once) in a pool
  of that size: the mean number of running sequences over the steps after which the next
  waiting request did not fit in the free blocks (the pool was the limit), against what the
  reservation admits. Ours admits on the prompt's blocks and grows block by block, so it
  preempts (and later recomputes) the newest sequence when decoding runs out of blocks; the
  count of preemptions is printed beside the ratio.

Torch runs ``--threads`` (1) threads: on a shared 2-core machine under load, 2 threads made
every mode 10-15x slower (threads spinning against other jobs), far more than it varied the
ratios. Each mode is warmed up once before it is timed.

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/generate_bench.py \
        [--requests 64] [--clients 32] [--offline-prompts 1000] [--kv-budget 4096]

Writes benchmarks/generate_bench.png (tokens/s of every mode; the online run's batch
occupancy over time). Every figure is given per wall second and per CPU second of this process; ratios ``*_cpu``
use the latter. Prints ratios; the last line is one JSON object with ``online_vs_static``,
``online_vs_sequential``, ``online_vs_hf_continuous``, ``ttft_p99_over_p50``,
``offline_vs_static`` and ``kv_admitted_vs_contiguous`` (and the raw figures).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time

import torch

from tasks.generation import Engine, Request, SamplingParams, runner_for_model
from tasks.generation.metrics import percentile

MAX_NEW = 256


class Timer:
    """Wall and process CPU time of a block (CPU time moves far less than wall time when
    other jobs share the machine)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def rates(tokens: int, timer: Timer, **extra) -> dict:
    return {"tokens": tokens, "wall_s": round(timer.wall, 2), "cpu_s": round(timer.cpu, 2),
            "tokens_per_s": tokens / timer.wall, "tokens_per_cpu_s": tokens / max(timer.cpu, 1e-9), **extra}


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=max(1, args.heads // 2), max_position_embeddings=512,
                      bos_token_id=None, eos_token_id=None, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def workload(n: int, args, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(1, args.vocab) for _ in range(rng.randint(8, 64))], rng.randint(args.min_new, args.max_new))
            for _ in range(n)]


def engine_for(model, args, pool_tokens: int | None = None) -> Engine:
    return Engine(runner_for_model(model), pool_tokens=pool_tokens or args.clients * 512, block_size=16,
                  max_batch=args.clients, max_waiting=4096, max_tokens_per_step=args.step_tokens)


def ours_online(model, work, args) -> dict:
    engine = engine_for(model, args)
    engine.start()
    todo, lock, results = list(enumerate(work)), threading.Lock(), {}

    def client():
        while True:
            with lock:
                if not todo:
                    return
                i, (prompt, n) = todo.pop(0)
            results[i] = engine.submit(Request(prompt, SamplingParams(max_new_tokens=n))).result()

    with Timer() as timer:
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    engine.stop()
    tokens = sum(len(r.tokens) for r in results.values())
    ttft = [r.ttft_s for r in results.values()]
    return rates(tokens, timer, ttft_p50_s=percentile(ttft, 50), ttft_p99_s=percentile(ttft, 99),
                 peak_kv_blocks=engine.pool.peak_used, occupancy=list(engine.metrics.occupancy),
                 outputs=[results[i].tokens for i in range(len(work))])


def ours_http(model, work, args, expected: list[list[int]] | None = None) -> dict:
    import os
    import subprocess
    import sys
    import tempfile

    from tasks.inference.config import ServeConfig
    from tasks.inference.server import BackgroundServer

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, safe_serialization=True)
        config = ServeConfig(model=f"hf:{folder}", port=0, kv_pool_tokens=args.clients * 512, kv_block_size=16,
                             max_batch_size=args.clients, max_waiting=4096, max_tokens_per_step=args.step_tokens)
        with BackgroundServer(config) as srv, Timer() as timer:
            job = json.dumps({"url": srv.url, "clients": args.clients, "work": work})
            env = {**os.environ, "PYTHONPATH": os.getcwd()}
            done = subprocess.run([sys.executable, "benchmarks/generate_http_clients.py"], input=job, env=env,
                                  capture_output=True, text=True, check=True)
            stats = srv.service.engine.stats()
    answer = json.loads(done.stdout)
    results = answer["results"]
    timer.wall = answer["wall_s"]   # from the first request to the last answer: not the client's start-up
    if expected is not None:
        assert [r["tokens"] for r in results] == expected, "the HTTP answers differ from the engine's"
    ttft = [r["ttft_s"] for r in results]
    return rates(sum(len(r["tokens"]) for r in results), timer, ttft_p50_s=percentile(ttft, 50),
                 ttft_p99_s=percentile(ttft, 99), peak_kv_blocks=stats["kv_pool"]["peak_blocks_used"])


@torch.no_grad()
def hf_static(model, work, batch: int) -> dict:
    tokens = 0
    with Timer() as timer:
        for start in range(0, len(work), batch):
            group = work[start:start + batch]
            width = max(len(p) for p, _ in group)
            ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in group])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in group])
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(n for _, n in group),
                           do_sample=False, pad_token_id=0, eos_token_id=None)
            tokens += sum(n for _, n in group)
    return rates(tokens, timer)


def hf_continuous(model, work, args) -> dict:
    from transformers import GenerationConfig

    prompts = [p for p, _ in work[:args.hf_cb_requests]]
    config = GenerationConfig(max_new_tokens=16, do_sample=False, eos_token_id=-1, pad_token_id=0)
    with Timer() as timer:
        out = model.generate_batch(inputs=prompts, generation_config=config)
    return rates(sum(len(v.generated_tokens) for v in out.values()), timer, requests=len(prompts))


def ours_offline(model, work, args) -> dict:
    engine = engine_for(model, args)
    with Timer() as timer:
        results = engine.generate(Request(p, SamplingParams(max_new_tokens=n)) for p, n in work)
    return rates(sum(len(r.tokens) for r in results), timer)


def kv_admission(model, work, args) -> dict:
    engine = Engine(runner_for_model(model), pool_tokens=args.kv_budget, block_size=16, max_batch=len(work),
                    max_waiting=len(work), max_tokens_per_step=args.step_tokens)
    for prompt, n in work:
        engine.submit(Request(prompt, SamplingParams(max_new_tokens=n)))
    bound = []   # running sequences at each step after which the pool could not take the next waiting one
    while engine.has_work:
        engine.step()
        assert engine.pool.num_used <= engine.pool.num_blocks
        waiting = engine.scheduler.waiting
        if waiting and engine.pool.blocks_for(len(waiting[0].tokens)) > engine.pool.num_free:
            bound.append(len(engine.scheduler.running))
    mean_prompt = statistics.mean(len(p) for p, _ in work)
    contiguous = args.kv_budget // round(mean_prompt + MAX_NEW)
    ours = statistics.mean(bound) if bound else float(len(work))
    return {"budget_tokens": args.kv_budget, "contiguous_admits": contiguous, "ours_running_mean": ours,
            "ours_running_max": max(bound, default=len(work)), "preemptions": engine.scheduler.preemptions}


def plot(figures: dict, path: str) -> None:
    """Output tokens/s of each mode (per wall and per CPU second), and the online run's batch
    occupancy over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [(k, label) for k, label in (("online_ours", "ours (online)"), ("online_http", "ours (HTTP)"),
                                         ("static", "generate() static"),
                                         ("sequential", "generate() 1 at a time"),
                                         ("hf_continuous", "generate_batch"), ("offline_ours", "ours (offline)"),
                                         ("offline_static", "generate() static\n(offline)")) if k in figures]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    x = range(len(modes))
    left.bar([i - 0.2 for i in x], [figures[k]["tokens_per_s"] for k, _ in modes], 0.4, label="per wall second")
    left.bar([i + 0.2 for i in x], [figures[k]["tokens_per_cpu_s"] for k, _ in modes], 0.4, label="per CPU second")
    left.set_xticks(list(x), [label for _, label in modes], rotation=20, fontsize=8)
    left.set_yscale("log")
    left.set_ylabel("output tokens/s")
    left.legend()
    occ = figures["online_ours"]["occupancy"]
    right.plot([t - occ[0][0] for t, _, _ in occ], [r for _, r, _ in occ])
    right.set_xlabel("seconds")
    right.set_ylabel("running sequences")
    on = figures["online_ours"]
    right.set_title(f"ours, online: TTFT p50 {on['ttft_p50_s'] * 1000:.0f} ms, p99 {on['ttft_p99_s'] * 1000:.0f} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--offline-prompts", type=int, default=1000)
    parser.add_argument("--min-new", type=int, default=16)
    parser.add_argument("--max-new", type=int, default=MAX_NEW)
    parser.add_argument("--kv-budget", type=int, default=4096)
    parser.add_argument("--hf-cb-requests", type=int, default=2)
    parser.add_argument("--step-tokens", type=int, default=1024,
                        help="max_tokens_per_step: the prefill budget of a step (a burst of 32 prompts in ~2 steps)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: http,sequential,hf_cb,offline")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--plot", default="benchmarks/generate_bench.png")
    parser.add_argument("--sequential-requests", type=int, default=16,
                        help="one-at-a-time runs only the first N requests (its tokens/s does not depend on N)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    model = build_model(args)
    work = workload(args.requests, args, seed=0)
    print(f"model: Llama hidden={args.hidden} layers={args.layers} heads={args.heads} vocab={args.vocab}; "
          f"torch threads={torch.get_num_threads()}; {len(work)} requests, "
          f"{sum(n for _, n in work)} output tokens", flush=True)
    figures: dict = {}
    warm = workload(args.clients, args, seed=2)[:4]
    ours_online(model, [(p, 8) for p, _ in warm], args)
    hf_static(model, [(p, 8) for p, _ in warm], len(warm))
    figures["online_ours"] = ours_online(model, work, args)
    print("online ours:", {k: v for k, v in figures["online_ours"].items() if k not in ("occupancy", "outputs")},
          flush=True)
    if "http" not in skip:
        ours_http(model, [(p, 8) for p, _ in warm], args)
        figures["online_http"] = ours_http(model, work, args, expected=figures["online_ours"]["outputs"])
        print("online ours over HTTP:", figures["online_http"], flush=True)
    figures["static"] = hf_static(model, work, args.clients)
    print("generate() static batches:", figures["static"], flush=True)
    if "sequential" not in skip:
        figures["sequential"] = hf_static(model, work[:args.sequential_requests], 1)
        print("generate() one at a time:", figures["sequential"], flush=True)
    if "hf_cb" not in skip:
        figures["hf_continuous"] = hf_continuous(model, work, args)
        print("generate_batch (transformers continuous batching):", figures["hf_continuous"], flush=True)
    if "offline" not in skip:
        offline_work = workload(args.offline_prompts, args, seed=1)
        figures["offline_ours"] = ours_offline(model, offline_work, args)
        print("offline ours:", figures["offline_ours"], flush=True)
        figures["offline_static"] = hf_static(model, offline_work, args.clients)
        print("offline generate() static:", figures["offline_static"], flush=True)
    figures["kv"] = kv_admission(model, work, args)
    print("kv admission:", figures["kv"], flush=True)

    def ratio(a, b, key="tokens_per_s"):
        return round(figures[a][key] / figures[b][key], 2) if a in figures and b in figures else None

    on, kv = figures["online_ours"], figures["kv"]
    summary = {
        "online_vs_static": ratio("online_ours", "static"),
        "online_vs_sequential": ratio("online_ours", "sequential"),
        "online_vs_hf_continuous": ratio("online_ours", "hf_continuous"),
        "ttft_p99_over_p50": round(on["ttft_p99_s"] / on["ttft_p50_s"], 2),
        "offline_vs_static": ratio("offline_ours", "offline_static"),
        "kv_admitted_vs_contiguous": round(kv["ours_running_mean"] / max(1, kv["contiguous_admits"]), 2),
        "online_vs_static_cpu": ratio("online_ours", "static", "tokens_per_cpu_s"),
        "online_vs_sequential_cpu": ratio("online_ours", "sequential", "tokens_per_cpu_s"),
        "offline_vs_static_cpu": ratio("offline_ours", "offline_static", "tokens_per_cpu_s"),
        "http_vs_engine_online": ratio("online_http", "online_ours"),
        "http_vs_static": ratio("online_http", "static"),
        "http_ttft_p99_over_p50": (round(figures["online_http"]["ttft_p99_s"] / figures["online_http"]["ttft_p50_s"], 2)
                                   if "online_http" in figures else None),
        "http_vs_engine_online_cpu": ratio("online_http", "online_ours", "tokens_per_cpu_s"),
        "online_tokens_per_s": round(on["tokens_per_s"], 1),
        "ttft_p50_s": round(on["ttft_p50_s"], 3),
        "ttft_p99_s": round(on["ttft_p99_s"], 3),
        "requests": args.requests, "clients": args.clients, "offline_prompts": args.offline_prompts,
    }
    plot(figures, args.plot)
    print(f"plot: {args.plot}")
    for key, value in summary.items():
        if key.endswith(("_static", "_sequential", "_continuous", "_contiguous", "_p50", "_cpu", "_online")):
            print(f"{key}: {value}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
