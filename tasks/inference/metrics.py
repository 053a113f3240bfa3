"""``/metrics`` in the Prometheus text format, one registry per server (no globals).

Events (requests, batches) go into counters and histograms as they happen; state
(queue depth, in-flight work, each replica's load and adaptive batch size) is read from
the service when scraped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from tasks.inference.service import InferenceService

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RequestMetrics:
    """A server's registry: requests by status code, their latency, and a collector of the
    server's state read when scraped. Classifier serving and generation both build on it."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, state):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("swarm_serve_requests", "HTTP requests by status code", ["code"],
                                registry=self.registry)
        self.latency = Histogram("swarm_serve_request_latency_seconds", "Request latency in the server (answered)",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(state)

    def request_done(self, code: int, seconds: float) -> None:
        self.requests.labels(str(code)).inc()
        if code == 200:
            self.latency.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ServeMetrics(RequestMetrics):
    def __init__(self, service: "InferenceService", max_batch_size: int, state: "StateCollector | None" = None):
        super().__init__(state or StateCollector(service))
        size_buckets = sorted({2**i for i in range(max_batch_size.bit_length())} | {max_batch_size})
        self.rows = Counter("swarm_serve_rows", "Rows predicted", registry=self.registry)
        self.batch_size = Histogram("swarm_serve_batch_size", "Rows per batch", buckets=size_buckets,
                                    registry=self.registry)
        self.batch_requests = Histogram("swarm_serve_batch_requests", "Requests per batch", buckets=size_buckets,
                                        registry=self.registry)
        self.batch_seconds = Histogram("swarm_serve_batch_compute_seconds", "Model compute time per batch",
                                       buckets=LATENCY_BUCKETS, registry=self.registry)

    def request_done(self, code: int, seconds: float, rows: int = 0) -> None:
        super().request_done(code, seconds)
        if code == 200:
            self.rows.inc(rows)

    def batch_started(self, rows: int, requests: int) -> None:
        self.batch_size.observe(rows)
        self.batch_requests.observe(requests)

    def batch_done(self, rows: int, seconds: float) -> None:
        self.batch_seconds.observe(seconds)


class StateCollector:
    """The front's state (queue, in-flight work) and each thread replica's, read when scraped."""

    def __init__(self, service: "InferenceService"):
        self.service = service

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator:
        s = self.service
        yield gauge("swarm_serve_queue_rows", "Rows waiting for a batch", s.batcher.queued_rows)
        yield gauge("swarm_serve_requests_in_flight", "Requests accepted and not yet answered", s.requests_in_flight)
        yield gauge("swarm_serve_batches_in_flight", "Batches running on replicas", s.batcher.in_flight_batches)
        yield gauge("swarm_serve_draining", "1 while shutting down", int(s.draining))
        yield from self.replicas()

    def replicas(self) -> Iterator:
        s = self.service
        per_replica = {
            "swarm_serve_replica_in_flight_rows": (GaugeMetricFamily, "Rows running or queued on a replica",
                                                   lambda r, c: r.in_flight_rows),
            "swarm_serve_replica_batches": (CounterMetricFamily, "Batches a replica ran", lambda r, c: r.batches),
            "swarm_serve_replica_rows": (CounterMetricFamily, "Rows a replica ran", lambda r, c: r.rows),
            "swarm_serve_replica_busy_seconds": (CounterMetricFamily, "Seconds a replica spent computing",
                                                 lambda r, c: r.busy_s),
            "swarm_serve_replica_batch_size_limit": (GaugeMetricFamily, "Batch size a replica runs at most (adaptive)",
                                                     lambda r, c: c.size if c else s.max_batch_size),
            "swarm_serve_replica_out_of_memory": (CounterMetricFamily, "Out-of-memory back-offs of a replica",
                                                  lambda r, c: len(c.oom_sizes) if c else 0),
        }
        for name, (family, doc, value) in per_replica.items():
            metric = family(name, doc, labels=["replica"])
            for replica, controller in zip(s.pool.replicas, s.controllers):
                metric.add_metric([str(replica.index)], value(replica, controller))
            yield metric


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)
