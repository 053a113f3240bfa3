"""The online inference service with its replicas on Dask workers, behind the router.

``ClusterInferenceService(config)`` checks the checkpoint here (user errors raise before
anything starts), starts ``config.replicas`` replicas on the cluster's workers
(:mod:`tasks.inference.cluster_replicas`) and forms batches in this process as the
in-process service does (:class:`~tasks.inference.batcher.MicroBatcher`, the same limits
and 429), handing each whole batch to the router (:mod:`tasks.inference.router`), which
sends it straight to a replica. ``/health`` lists the replicas and where they run;
``/metrics`` adds per-replica latency, the router's choices and retries, and scale and
failover events to the in-process server's metrics.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tasks.inference.batcher import BatchPolicy, MicroBatcher
from tasks.inference.cluster_replicas import ReplicaSet
from tasks.inference.config import ServeConfig
from tasks.inference.metrics import LATENCY_BUCKETS, ServeMetrics, StateCollector
from tasks.inference.model_replica import load_served_model
from tasks.inference.router import Router
from tasks.inference.service import BatchingFront


class ClusterInferenceService(BatchingFront):
    def __init__(self, config: ServeConfig):
        served = load_served_model(config)
        self.config = config
        self.name, self.url = served.loaded.name, served.loaded.url
        self.max_batch_size = config.max_batch_size
        self.spec = served.spec
        del served  # the model runs on the replicas; here only its input spec is needed
        self.router = Router(wait_for_replica_s=config.replica_start_timeout_s)
        self.metrics = ServeMetrics(self, config.max_batch_size, state=ClusterStateCollector(self))
        self.replica_latency = Histogram("swarm_serve_replica_batch_latency_seconds",
                                         "Round trip of a batch to a replica and back, per replica", ["replica"],
                                         buckets=LATENCY_BUCKETS, registry=self.metrics.registry)
        self.replica_compute = Counter("swarm_serve_replica_compute_seconds", "Batch compute time reported by replicas",
                                       ["replica"], registry=self.metrics.registry)
        policy = BatchPolicy(config.max_batch_size, config.max_wait_s, config.max_queue_rows)
        self.batcher = MicroBatcher(self.router, policy, on_batch=self.metrics.batch_started)
        self.router.on_change.append(self.batcher.poke)
        self._init_front()
        self.replicas = ReplicaSet(config, self.router, ongoing=lambda: self.requests_in_flight,
                                   on_answer=self._answered)

    def _answered(self, replica, rows: int, compute_s: float, round_trip_s: float) -> None:
        self.metrics.batch_done(rows, compute_s)
        self.replica_latency.labels(str(replica.index)).observe(round_trip_s)

    async def start(self) -> None:
        await self.replicas.start()
        self.batcher.start()

    async def close(self) -> None:
        self.begin_drain()
        await self.batcher.close()
        await self.replicas.close()

    def batch_size_reports(self) -> list:
        return [r.report for r in sorted(self.router.replicas, key=lambda r: r.index)]

    def placement(self) -> list[dict]:
        return self.replicas.placement()

    def describe(self) -> dict[str, Any]:
        low, high = self.config.replica_bounds
        return {
            "model": self.name,
            "checkpoint": self.url,
            "input": self.spec.describe(),
            "replicas": len(self.router.up()),
            "replica_bounds": [low, high],
            "placement": self.placement(),
            "scheduler": self.replicas.address,
            "max_batch_size": self.max_batch_size,
            "max_wait_ms": self.config.max_wait_ms,
            "batch_sizes": self.batch_size_reports(),
            "kernels": [p.get("kernel") for p in self.placement() if p.get("kernel")],
            "router": {"choices": dict(self.router.choices), "retries": self.router.retries},
            "events": list(self.replicas.events)[-20:],
            "last_failover_gap_s": self.replicas.last_gap_s,
        }


class ClusterStateCollector(StateCollector):
    """Each replica on the cluster as the router sees it, where it runs, and the router's own state."""

    def replicas(self) -> Iterator:
        s = self.service
        replicas = sorted(s.router.replicas, key=lambda r: r.index)
        per_replica = {
            "swarm_serve_replica_in_flight_rows": (GaugeMetricFamily, "Rows sent to a replica and not answered yet",
                                                   lambda r: r.load()),
            "swarm_serve_replica_batches": (CounterMetricFamily, "Batches a replica ran", lambda r: r.batches),
            "swarm_serve_replica_rows": (CounterMetricFamily, "Rows a replica ran", lambda r: r.rows),
            "swarm_serve_replica_busy_seconds": (CounterMetricFamily, "Seconds a replica spent computing",
                                                 lambda r: r.busy_s),
            "swarm_serve_replica_batch_size_limit": (GaugeMetricFamily, "Batch size a replica runs at most (adaptive)",
                                                     lambda r: (r.report or {}).get("size", s.max_batch_size)),
            "swarm_serve_replica_out_of_memory": (CounterMetricFamily, "Out-of-memory back-offs of a replica",
                                                  lambda r: len((r.report or {}).get("out_of_memory_at", []))),
            "swarm_serve_router_choices": (CounterMetricFamily, "Batches the router sent to a replica",
                                           lambda r: s.router.choices[r.index]),
        }
        for name, (family, doc, value) in per_replica.items():
            metric = family(name, doc, labels=["replica"])
            for replica in replicas:
                metric.add_metric([str(replica.index)], value(replica))
            yield metric
        info = GaugeMetricFamily("swarm_serve_replica_info", "Where a replica runs (1 per replica)",
                                 labels=["replica", "state", "worker", "host", "pid", "device", "kernel"])
        for p in s.placement():
            info.add_metric([str(p["replica"]), p["state"], p.get("worker") or "", p.get("host") or "",
                             str(p.get("pid") or ""), p.get("device") or "", p.get("kernel") or ""], 1)
        yield info
        yield GaugeMetricFamily("swarm_serve_replicas_up", "Replicas taking batches", value=len(s.router.up()))
        yield CounterMetricFamily("swarm_serve_router_retries", "Batches sent again after their replica was lost",
                                  value=s.router.retries)
        events = CounterMetricFamily("swarm_serve_replica_events", "Replica events: lost, replaced, scale_up, scale_down",
                                     labels=["event"])
        for event in ("lost", "replaced", "scale_up", "scale_down"):
            events.add_metric([event], s.replicas.counts[event])
        yield events
        gap = s.replicas.last_gap_s
        yield GaugeMetricFamily("swarm_serve_failover_gap_seconds",
                                "Time from the last lost replica to its replacement taking batches",
                                value=gap if gap is not None else float("nan"))
