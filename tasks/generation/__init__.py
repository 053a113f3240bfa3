"""The generation engine: continuous batching over a paged KV cache (no Prefect here).

Pieces, each with one job (as vLLM v1 splits them):

- ``params``: a :class:`Request` (prompt token ids + :class:`SamplingParams`) and its
  validation against the model and engine (:class:`~storage.errors.ConfigError`).
- ``block_pool``: hands out / takes back fixed-size blocks of cache slots.
- ``kv_cache``: the key/value tensors, allocated once for the whole pool, the per-step
  :class:`BatchLayout` and :func:`paged_attention`.
- ``scheduler``: iteration-level scheduling — who runs this step, how many tokens each
  (chunked prefill under a per-step token budget), admission by free blocks, a bounded
  waiting queue, preemption by recompute when decoding runs out of blocks.
- ``sampler``: greedy / temperature / top-k / top-p with a per-request ``torch.Generator``.
- ``runners``: the built-in GPT, Llama-family and GPT-2-family Hugging Face models, each
  reusing the model's own modules and weights around the paged attention.
- ``engine``: :class:`Engine` ties them together; ``handle``: what a caller holds.
- ``loading``: :func:`load_runner` for our checkpoints and ``hf:`` folders.
- ``http`` (with ``openai_api`` and ``serve_metrics``): the OpenAI-compatible server that
  ``swarm serve-model`` runs for a language model.

Why our own paged cache and not transformers' continuous batching: transformers 5.25's
``generate_batch`` (``ContinuousBatchingManager`` over ``PagedAttentionCache``) does run on
torch 2.13 CPU and gives the same greedy tokens, but measured on this machine a tiny Llama
(2 layers, d=64) took 24.1 s for two prompts of 16 new tokens, against 0.04 s for plain
``generate()`` (in benchmarks/generate_bench.py: 16–130 s for 32 tokens, mostly system time
in its manager thread), and its cache belongs to its own manager, so our scheduler could not
drive admission, preemption or chunking with it. (Joining requests mid-run through its
``ContinuousBatchingManager`` was not tried: at that speed it could not serve anyway.) The attention over the cache is ~40 lines around
``scaled_dot_product_attention``; the models' own modules (embeddings, norms, projections,
MLPs, rotary embedding) are reused as they are.

API for the offline flow and the server
---------------------------------------

::

    from tasks.generation import Engine, Request, SamplingParams, load_runner, QueueFull

    runner = load_runner("s3://bucket/lm/ckpt-000001000")      # or "hf:/models/tiny-llama"
    engine = Engine(runner, pool_tokens=65_536, block_size=16, max_batch=64,
                    max_waiting=256, max_tokens_per_step=256)
    ids = runner.tokenizer.encode(text).ids                    # runner.tokenizer may be None

    # offline: keeps the queue full, returns results in order
    results = engine.generate([Request(ids, SamplingParams(max_new_tokens=64, seed=1)), ...])

    # online: a background thread steps whenever there is work
    engine.start()
    handle = engine.submit(Request(ids, SamplingParams(temperature=0.8, top_p=0.9, stop=("\\n",))))
    for event in handle:            # TokenEvent(token_id, text delta, finished, finish_reason)
        ...                         # on client disconnect: handle.cancel() (blocks freed at once)
    result = handle.result()        # GenerationResult: tokens, text, finish_reason, ttft_s, ...
    engine.stats()                  # tokens/s, ttft/itl percentiles, running, waiting, kv_pool use
    engine.stop(drain=True)         # SIGTERM: refuse new requests, finish running ones

``submit`` raises :class:`~storage.errors.ConfigError` for bad input (HTTP 400, CLI exit 2)
and :class:`QueueFull` (with ``retry_after_s``) when ``max_waiting`` requests already wait
(HTTP 429). Finish reasons: ``"length"``, ``"stop"`` (end-of-text / stop token, not
included in the output, or a stop string, cut from the text), ``"cancelled"``, and
``"error"`` when a step of the background loop failed (``engine.last_error`` says why; the loop
goes on with later requests).
``engine.metrics.occupancy`` holds (seconds, running sequences, tokens) per step for a plot.
"""

from tasks.generation.engine import Engine
from tasks.generation.handle import GenerationResult, RequestHandle, TokenEvent
from tasks.generation.loading import load_runner, runner_for_model
from tasks.generation.params import QueueFull, Request, SamplingParams

__all__ = [
    "Engine", "GenerationResult", "QueueFull", "Request", "RequestHandle", "SamplingParams", "TokenEvent",
    "load_runner", "runner_for_model",
]
