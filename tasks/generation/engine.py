"""The engine: ties the scheduler, the block pool, the paged cache and a model runner into
``submit`` / ``step``, with an optional background loop thread.

One ``step`` asks the scheduler what runs, builds one packed batch of every scheduled chunk,
runs the model once, samples a token for every sequence whose chunk reached its end, streams
it to the request's handle, and retires finished sequences at once (their blocks go back to
the pool before the next step is scheduled). Everything that touches the engine's state
holds one lock, so ``submit`` and ``cancel`` may be called from any thread while the loop
runs (the model's forward pass runs outside it: see ``step``).
"""

from __future__ import annotations

import logging
import threading
from typing import Iterable

import torch

from storage.errors import ConfigError
from tasks.generation.block_pool import BlockPool
from tasks.generation.handle import GenerationResult, RequestHandle
from tasks.generation.kv_cache import BatchLayout
from tasks.generation.metrics import EngineMetrics
from tasks.generation.params import QueueFull, Request, SamplingParams, validate
from tasks.generation.runners.base import ModelRunner
from tasks.generation.sampler import make_generator, sample
from tasks.generation.scheduler import Scheduler, Sequence

log = logging.getLogger("swarm.generation")


class Engine:
    """``pool_tokens`` (or ``pool_bytes``) sizes the KV pool, allocated once; ``block_size``
    tokens per block; at most ``max_batch`` sequences run at once and ``max_waiting`` wait;
    ``max_tokens_per_step`` bounds the tokens of one step (and so the prefill chunk)."""

    def __init__(self, runner: ModelRunner, pool_tokens: int | None = None, pool_bytes: int | None = None,
                 block_size: int = 16, max_batch: int = 64, max_waiting: int = 1024,
                 max_tokens_per_step: int = 256, max_new_tokens_limit: int | None = None):
        for name, value in (("block_size", block_size), ("max_batch", max_batch), ("max_waiting", max_waiting),
                            ("max_tokens_per_step", max_tokens_per_step)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if max_tokens_per_step < max_batch:
            raise ConfigError(f"max_tokens_per_step ({max_tokens_per_step}) must be at least max_batch ({max_batch}): "
                              f"every running sequence must be able to decode a token at every step")
        if pool_bytes is not None:
            if pool_tokens is not None:
                raise ConfigError("give the KV pool's size as pool_tokens or pool_bytes, not both")
            pool_tokens = pool_bytes // runner.bytes_per_token()
        if pool_tokens is None:
            pool_tokens = max_batch * runner.context
        num_blocks = pool_tokens // block_size
        if num_blocks < 1:
            raise ConfigError(f"a KV pool of {pool_tokens} tokens holds no block of {block_size} tokens; "
                              f"give at least {block_size} tokens ({block_size * runner.bytes_per_token()} bytes)")
        self.runner = runner
        self.pool = BlockPool(num_blocks, block_size)
        self.cache = runner.make_cache(num_blocks, block_size)
        self.scheduler = Scheduler(self.pool, max_batch, max_waiting, max_tokens_per_step)
        self.max_new_tokens_limit = max_new_tokens_limit or runner.context
        self.metrics = EngineMetrics()
        self._seqs: dict[str, Sequence] = {}
        self._lock = threading.RLock()
        self._step_lock = threading.Lock()   # one step at a time (the model runs outside _lock)
        self._wake = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drain = True
        self.last_error: str | None = None   # the background loop's last failed step
        self._decode = self._make_decoder(runner.tokenizer)

    @staticmethod
    def _make_decoder(tokenizer):
        if tokenizer is None:
            return None
        return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)

    # --- requests ---------------------------------------------------------------------------
    def submit(self, request: Request | Iterable[int], params: SamplingParams | None = None) -> RequestHandle:
        """Queue a request; raises ConfigError for bad input and QueueFull when the queue is full."""
        if not isinstance(request, Request):
            request = Request(list(request), params or SamplingParams())
        validate(request, self.runner.context, self.runner.vocab_size, self.max_new_tokens_limit,
                 self.pool.num_blocks * self.pool.block_size)
        if request.params.stop and self._decode is None:
            raise ConfigError("stop strings need the model's tokenizer, and this model has none; "
                              "use stop_token_ids instead")
        with self._lock:
            if self._stopping:
                raise QueueFull("the engine is shutting down and takes no new requests")
            if request.request_id in self._seqs:
                raise ConfigError(f"request id {request.request_id!r} is already in the engine")
            if not self.scheduler.has_room():
                raise QueueFull(f"the waiting queue is full ({self.scheduler.max_waiting} requests)",
                                retry_after_s=1.0)
            handle = RequestHandle(request.request_id, len(request.prompt), request.params.stop,
                                   self._decode, self.cancel)
            seq = Sequence(request, make_generator(request.params), handle)
            self._seqs[request.request_id] = seq
            self.scheduler.add(seq)
            self.metrics.prompt_tokens += len(request.prompt)
            self._wake.notify_all()
            return handle

    def cancel(self, request_id: str) -> bool:
        """Drop a request now, waiting or running; its blocks return to the pool at once."""
        with self._lock:
            seq = self._seqs.get(request_id)
            if seq is None:
                return False
            self._retire(seq, "cancelled")
            self.metrics.requests_cancelled += 1
            return True

    def _retire(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq)
        del self._seqs[seq.request_id]
        seq.handle.close(reason)
        if reason != "cancelled":
            self.metrics.requests_finished += 1

    # --- stepping ---------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        return bool(self._seqs)

    @torch.no_grad()
    def step(self) -> int:
        """Run one iteration; returns how many sequences ran (0 when idle).

        The model runs outside the engine's lock, so ``submit``, ``cancel`` and ``stats`` from
        other threads (the HTTP server's event loop) never wait for a forward pass. That is
        safe because only ``schedule`` hands out blocks, and it runs in this method: blocks a
        cancel frees meanwhile are not reused before this step has written its keys/values,
        and a sequence cancelled meanwhile gets no token."""
        with self._step_lock:
            with self._lock:
                chunks = self.scheduler.schedule()
                if not chunks:
                    return 0
                layout = BatchLayout.build([(c.seq.blocks, c.start, c.count) for c in chunks], self.pool.block_size,
                                           device=self.runner.device)
                tokens = torch.tensor([t for c in chunks for t in c.seq.tokens[c.start:c.start + c.count]],
                                      dtype=torch.long, device=self.runner.device)
                running = len(self.scheduler.running)
            logits = self.runner.forward(tokens, layout, self.cache)
            with self._lock:
                self.metrics.on_step(running, int(tokens.shape[0]))
                live = [c for c in chunks if self._seqs.get(c.seq.request_id) is c.seq]
                for c in live:
                    c.seq.num_cached += c.count
                rows = [i for i, c in enumerate(chunks) if c.samples and self._seqs.get(c.seq.request_id) is c.seq]
                done = [chunks[i] for i in rows]
                if done:
                    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
                    picked = sample(logits[index].float().cpu(), [c.seq.request.params for c in done],
                                    [c.seq.generator for c in done])
                    for c, token in zip(done, picked):
                        self._append(c.seq, token)
                return len(chunks)

    def _append(self, seq: Sequence, token: int) -> None:
        p = seq.request.params
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.runner.eos_token_ids):
            self._retire(seq, "stop")
            return
        seq.tokens.append(token)
        hit_stop = seq.handle.push(token)
        self.metrics.on_token(seq.handle.arrival, seq.handle.token_times)
        if hit_stop:
            self._retire(seq, "stop")
        elif seq.num_generated >= p.max_new_tokens:
            self._retire(seq, "length")

    def run_until_done(self) -> None:
        while self.has_work:
            self.step()

    def generate(self, requests: Iterable[Request]) -> list[GenerationResult]:
        """Offline: run every request, keeping the queue full; results in the order given."""
        pending = iter(requests)
        handles: list[RequestHandle] = []
        try:
            nxt = next(pending, None)
            while nxt is not None or self.has_work:
                while nxt is not None and self.scheduler.has_room():
                    handles.append(self.submit(nxt))
                    nxt = next(pending, None)
                self.step()
        except BaseException:   # a bad request (or an interrupt) stops the whole run, leaving nothing queued
            for handle in handles:
                self.cancel(handle.request_id)
            raise
        return [h.result() for h in handles]

    # --- background loop ----------------------------------------------------------------------
    def start(self) -> None:
        """Run steps on a daemon thread whenever there is work."""
        with self._lock:
            if self._thread is not None:
                return
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="generation-engine", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._seqs and not self._stopping:
                    self._wake.wait()
                if self._stopping and (not self._seqs or not self._drain):
                    return
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - a failed step must not leave its requests waiting forever
                log.exception("a generation step failed; its requests end with finish_reason 'error'")
                with self._lock:
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    for seq in list(self._seqs.values()):
                        self._retire(seq, "error")

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the loop: with ``drain``, new requests are refused and running ones finish
        first (graceful shutdown); without, every request is cancelled."""
        with self._lock:
            self._stopping, self._drain = True, drain
            if not drain:
                for seq in list(self._seqs.values()):
                    self._retire(seq, "cancelled")
            self._wake.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._lock:
            self._thread = None

    # --- reporting ----------------------------------------------------------------------------
    def stats(self) -> dict:
        with self._lock:
            return {
                **self.metrics.snapshot(),
                "running": len(self.scheduler.running),
                "waiting": len(self.scheduler.waiting),
                "preemptions": self.scheduler.preemptions,
                "kv_pool": {**self.pool.usage(), "bytes_total": self.cache.nbytes},
            }
