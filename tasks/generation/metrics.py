"""Engine metrics: time to first token, inter-token latency, tokens/s, batch occupancy.

Kept as bounded windows of recent values (a long-running server does not grow), summarised
on demand as percentiles; ``snapshot`` is what ``/metrics`` and the offline flow report."""

from __future__ import annotations

import time
from collections import deque


def percentile(values, q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


class EngineMetrics:
    def __init__(self, window: int = 10_000):
        self.started = time.perf_counter()
        self.ttft = deque(maxlen=window)
        self.itl = deque(maxlen=window)
        self.occupancy = deque(maxlen=window)   # (time since start, running sequences, tokens run) per step
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.requests_finished = 0
        self.requests_cancelled = 0
        self.steps = 0

    def on_step(self, running: int, tokens: int) -> None:
        self.steps += 1
        self.occupancy.append((time.perf_counter() - self.started, running, tokens))

    def on_token(self, arrival: float, token_times: list[float]) -> None:
        self.generated_tokens += 1
        if len(token_times) == 1:
            self.ttft.append(token_times[0] - arrival)
        else:
            self.itl.append(token_times[-1] - token_times[-2])

    def snapshot(self) -> dict:
        elapsed = time.perf_counter() - self.started
        return {
            "uptime_s": elapsed,
            "steps": self.steps,
            "requests_finished": self.requests_finished,
            "requests_cancelled": self.requests_cancelled,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "tokens_per_s": self.generated_tokens / elapsed if elapsed > 0 else 0.0,
            "ttft_s": {"p50": percentile(self.ttft, 50), "p90": percentile(self.ttft, 90),
                       "p99": percentile(self.ttft, 99)},
            "itl_s": {"p50": percentile(self.itl, 50), "p90": percentile(self.itl, 90),
                      "p99": percentile(self.itl, 99)},
        }
