"""``/metrics`` of the generation server, on the serving registry (:mod:`tasks.inference.metrics`).

Per-token latencies are observed as the HTTP layer hands each token on (from the engine's
own timestamps, so a slow client does not inflate them): time to first token and
inter-token latency histograms. State is read from the engine when scraped: running and
waiting sequences, KV-pool blocks and bytes, tokens/s over the last
:data:`RATE_WINDOW_S` seconds, token and preemption counters.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Iterator

from prometheus_client import Histogram
from prometheus_client.core import CounterMetricFamily

from tasks.inference.metrics import LATENCY_BUCKETS, RequestMetrics, gauge

if TYPE_CHECKING:
    from tasks.generation.http import GenerationService

RATE_WINDOW_S = 10.0
TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class GenerationMetrics(RequestMetrics):
    def __init__(self, service: "GenerationService"):
        super().__init__(GenerationState(service, self))
        self.ttft = Histogram("swarm_generate_time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("swarm_generate_inter_token_latency_seconds", "Time between a request's tokens",
                             buckets=TOKEN_BUCKETS, registry=self.registry)
        self._recent: deque[float] = deque(maxlen=200_000)   # when recent tokens came (tokens/s)
        self._lock = threading.Lock()

    def on_token(self, arrival: float, token_times: list[float], index: int) -> None:
        """The request's ``index``-th token was handed on (its time is ``token_times[index]``)."""
        now = token_times[index]
        if index == 0:
            self.ttft.observe(now - arrival)
        else:
            self.itl.observe(now - token_times[index - 1])
        with self._lock:
            self._recent.append(now)

    def tokens_per_s(self) -> float:
        horizon = time.perf_counter() - RATE_WINDOW_S
        with self._lock:
            while self._recent and self._recent[0] < horizon:
                self._recent.popleft()
            return len(self._recent) / RATE_WINDOW_S


class GenerationState:
    """The engine's state, read when scraped."""

    def __init__(self, service: "GenerationService", metrics: GenerationMetrics):
        self.service = service
        self.metrics = metrics

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator:
        stats = self.service.engine.stats()
        pool = stats["kv_pool"]
        yield gauge("swarm_generate_running_sequences", "Sequences in the running batch", stats["running"])
        yield gauge("swarm_generate_waiting_sequences", "Requests waiting for room in the batch", stats["waiting"])
        yield gauge("swarm_generate_kv_pool_blocks_used", "KV-cache blocks held by sequences", pool["blocks_used"])
        yield gauge("swarm_generate_kv_pool_blocks_total", "KV-cache blocks in the pool", pool["blocks_total"])
        yield gauge("swarm_generate_kv_pool_usage_ratio", "Share of the KV-cache pool in use", pool["fraction_used"])
        yield gauge("swarm_generate_kv_pool_bytes", "Bytes of the KV-cache pool (allocated once)", pool["bytes_total"])
        yield gauge("swarm_generate_tokens_per_second", f"Tokens generated per second over the last "
                    f"{RATE_WINDOW_S:g} s", self.metrics.tokens_per_s())
        yield gauge("swarm_serve_draining", "1 while shutting down", int(self.service.draining))
        for name, doc, value in (
            ("swarm_generate_generation_tokens", "Tokens generated", stats["generated_tokens"]),
            ("swarm_generate_prompt_tokens", "Prompt tokens submitted", stats["prompt_tokens"]),
            ("swarm_generate_preemptions", "Sequences preempted (recomputed later) for want of blocks",
             stats["preemptions"]),
            ("swarm_generate_requests_cancelled", "Requests cancelled (client gone)", stats["requests_cancelled"]),
        ):
            yield CounterMetricFamily(name, doc, value=value)
