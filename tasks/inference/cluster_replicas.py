"""Replicas on Dask workers: placement, health, replacement and autoscaling, for the router.

:class:`ReplicaSet` starts each replica as a Dask actor (:class:`~tasks.inference.replica_host.ReplicaActor`)
pinned to a worker — GPU workers (a ``GPU`` resource) where the cluster has them, the worker
with the fewest replicas first, so replicas land on distinct workers while there are enough —
connects the router to it, and then watches them:

- **Failover.** A replica whose connection breaks (its worker process died), that answers no
  probe for ``probe_timeout_s``, or whose worker left the cluster is taken out of rotation at
  once (its batches go to other replicas, see :mod:`tasks.inference.router`), and a
  replacement is started on a live worker; the time without it is recorded (``gap_s``).
- **Autoscaling** between ``min_replicas`` and ``max_replicas``: the wanted count is the
  outstanding requests (averaged over ``autoscale_window_s``, as Ray Serve's look-back
  period does: under a steady load they still come and go in bursts) over
  ``target_ongoing``; it must stay above the current count for ``upscale_delay_s`` to add replicas, below it for ``downscale_delay_s`` to remove one,
  which first stops taking batches and finishes those it has (drained), then goes.

The Dask client is synchronous and runs in worker threads of this process, so the serving
event loop never waits on the scheduler; only starting and stopping replicas talks to it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import uuid
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from tasks.dask_workers import live_workers
from storage.errors import ConfigError, SwarmError
from tasks.inference.config import ServeConfig
from tasks.inference.router import DRAINING, UP, ReplicaClient, Router

log = logging.getLogger("swarm.serve.replicas")

CLASSIFIER = "tasks.inference.replica_host:classifier_service"


class ReplicaSet:
    def __init__(self, config: ServeConfig, router: Router, ongoing: Callable[[], int],
                 on_answer: Callable[..., None] | None = None, factory: str = CLASSIFIER,
                 factory_kwargs: dict[str, Any] | None = None):
        self.config, self.router, self.ongoing, self.on_answer = config, router, ongoing, on_answer
        self.factory = factory
        self.factory_kwargs = factory_kwargs if factory_kwargs is not None else {
            "config": config.model_dump(exclude={"in_process", "dask_address"})}
        self.low, self.high = config.replica_bounds
        self.target = config.replicas
        self.events: deque[dict] = deque(maxlen=200)  # lost, replaced, scaled up/down
        self.counts: Counter = Counter()
        self.last_gap_s: float | None = None
        self.ongoing_average = 0.0  # outstanding requests over the autoscaling window
        self._actors: dict[int, tuple[Any, Any]] = {}  # index -> (Dask future, actor)
        self._starting: dict[int, str] = {}  # index -> worker, while it loads
        self._next_index = 0
        self._token = uuid.uuid4().hex[:8]
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="swarm-replicas")
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self.address = self._scheduler(config)
        from distributed import Client

        try:
            self.client = Client(self.address, set_as_default=False, timeout="30s")
        except OSError as exc:
            raise ConfigError(f"cannot reach the Dask scheduler at {self.address!r}: {exc}") from None
        self._first: list[tuple[int, dict]] = self._start_first()

    @staticmethod
    def _scheduler(config: ServeConfig) -> str:
        address = config.dask_address or os.environ.get("SWARM_DASK_ADDRESS")
        if not address:  # the caller starts a local cluster (deployments.cluster.with_serving_cluster)
            raise ConfigError("replicas on Dask workers need a scheduler: pass --dask-address ADDR, set "
                              "SWARM_DASK_ADDRESS, or serve --in-process")
        return address if "://" in address else f"tcp://{address}"

    # ------------------------------------------------------------------ starting and stopping

    def _start_first(self) -> list[tuple[int, dict]]:
        """The first replicas, in parallel, before the server listens (their errors are the user's)."""
        self.client.wait_for_workers(1, timeout=60)
        workers = self._workers()
        placed = []
        for _ in range(self.config.replicas):
            index = self._new_index()
            self._starting[index] = self._choose(workers, set())  # counted by the next choice
            placed.append((index, self._starting[index]))
        jobs = [self._pool.submit(self._start_actor, index, worker) for index, worker in placed]
        started, errors = [], []
        for (index, worker), job in zip(placed, jobs):
            try:
                started.append((index, job.result()))
            except Exception as exc:  # noqa: BLE001 - reported together below
                errors.append(f"replica {index} on {worker}: {type(exc).__name__}: {exc}")
        if errors:
            for index, _ in started:
                self._stop_actor(index)
            self.client.close()
            raise ConfigError("model replicas could not start: " + "; ".join(errors))
        return started

    def _new_index(self) -> int:
        index, self._next_index = self._next_index, self._next_index + 1
        return index

    def _workers(self) -> list[str]:
        info = live_workers(self.client)
        gpu = [a for a, w in info.items() if w.get("resources", {}).get("GPU")]
        return sorted(gpu or info)

    def _choose(self, workers: list[str], exclude: set[str]) -> str:
        """The live worker with the fewest replicas (placed or starting)."""
        live = [w for w in workers if w not in exclude] or workers
        if not live:
            raise SwarmError("the Dask cluster has no workers to place a replica on")
        load = Counter(r.worker for r in self.router.replicas if r.state in (UP, DRAINING))
        load.update(self._starting.values())
        worker = min(live, key=lambda w: load[w])
        return worker

    def _start_actor(self, index: int, worker: str) -> dict:
        from tasks.inference.replica_host import ReplicaActor

        self._starting[index] = worker
        try:
            with self.client.as_current():  # Dask's actor proxies need a current client
                future = self.client.submit(
                    ReplicaActor, self.factory, self.factory_kwargs, index, self.config.replica_batches,
                    self.config.threads_per_replica, actor=True, workers=[worker], allow_other_workers=False,
                    pure=False, key=f"swarm-replica-{self._token}-{index}")
                self._actors[index] = (future, None)
                actor = future.result(timeout=self.config.replica_start_timeout_s)
                self._actors[index] = (future, actor)
                return actor.endpoint().result(timeout=60)
        finally:
            self._starting.pop(index, None)

    def _forget_actor(self, index: int) -> None:
        future, _ = self._actors.pop(index, (None, None))
        if future is not None:
            with self.client.as_current():
                future.release()

    def _stop_actor(self, index: int) -> None:
        future, actor = self._actors.pop(index, (None, None))
        with self.client.as_current():
            if actor is not None:
                try:
                    actor.stop().result(timeout=10)
                except Exception:  # noqa: BLE001 - its worker may be gone already
                    pass
            if future is not None:
                future.release()

    async def _thread(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def _connect(self, index: int, endpoint: dict) -> ReplicaClient:
        replica = ReplicaClient(index, endpoint, self.config.replica_batches, on_lost=self._lost,
                                on_answer=self.on_answer)
        await replica.connect()
        self.router.add(replica)
        log.info("replica %d up on %s (pid %s, %s)", index, endpoint["worker"], endpoint.get("pid"), endpoint.get("device"))
        return replica

    async def _add(self, exclude: set[str] = frozenset()) -> ReplicaClient:
        workers = await self._thread(self._workers)
        index = self._new_index()
        worker = self._choose(workers, set(exclude))
        self._starting[index] = worker  # counted by placement decisions made meanwhile
        try:
            endpoint = await self._thread(self._start_actor, index, worker)
        except BaseException:
            await self._thread(self._stop_actor, index)
            raise
        return await self._connect(index, endpoint)

    async def start(self) -> None:
        """Connect the router to the first replicas; start the supervisor (and the autoscaler)."""
        for index, endpoint in self._first:
            await self._connect(index, endpoint)
        self._spawn(self._supervise())
        if self.low != self.high:
            self._spawn(self._autoscale())

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("replica management task %s failed", task.get_name(), exc_info=task.exception())

    async def close(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        for replica in list(self.router.replicas):
            await replica.close()
            self.router.remove(replica)
        await asyncio.gather(*(self._thread(self._stop_actor, i) for i in list(self._actors)), return_exceptions=True)
        await self._thread(self.client.close)
        self._pool.shutdown(wait=False)

    # ------------------------------------------------------------------ failover

    def _lost(self, replica: ReplicaClient, reason: str) -> None:
        self.router.remove(replica)
        if self._closing or replica.index not in self._actors:
            return
        self.counts["lost"] += 1
        self._event("lost", replica=replica.index, worker=replica.worker, reason=reason)
        log.warning("replica %d on %s lost: %s; starting a replacement", replica.index, replica.worker, reason)
        self._spawn(self._replace(replica, time.monotonic()))

    async def _replace(self, replica: ReplicaClient, lost_at: float) -> None:
        self._forget_actor(replica.index)  # no stop() call: its worker may be gone, and Dask would wait for it
        while not self._closing and self._active() < self.target:
            try:
                new = await self._add(exclude={replica.worker})
            except Exception as exc:  # noqa: BLE001 - try again: the cluster may be restarting workers
                log.warning("replacement for replica %d failed: %s; trying again", replica.index, exc)
                await asyncio.sleep(1.0)
                continue
            self.last_gap_s = time.monotonic() - lost_at
            self.counts["replaced"] += 1
            self._event("replaced", replica=replica.index, worker=replica.worker, by=new.index,
                        on=new.worker, gap_s=round(self.last_gap_s, 3))
            return

    def _active(self) -> int:
        return sum(1 for r in self.router.replicas if r.state == UP) + len(self._starting)

    async def _supervise(self) -> None:
        interval, timeout = self.config.probe_interval_s, self.config.probe_timeout_s
        probes: dict[int, asyncio.Task] = {}
        tick = 0
        while True:
            await asyncio.sleep(interval)
            tick += 1
            for replica in list(self.router.replicas):
                if replica.index not in probes or probes[replica.index].done():
                    probes[replica.index] = self._spawn(self._probe(replica, timeout))
            if tick % 2 == 0:
                try:
                    alive = set(await self._thread(self._workers))
                except Exception:  # noqa: BLE001 - the scheduler is busy or away: the probes still run
                    continue
                for replica in list(self.router.replicas):
                    if replica.worker not in alive and replica.state in (UP, DRAINING):
                        replica.lose("its worker left the Dask cluster")

    @staticmethod
    async def _probe(replica: ReplicaClient, timeout: float) -> None:
        try:
            header = await asyncio.wait_for(replica.ping(), timeout)
        except asyncio.TimeoutError:
            replica.lose(f"it answered no probe within {timeout:g} s")
        except ConnectionError:
            pass  # lost already
        else:
            if header.get("report") is not None:
                replica.report = header["report"]

    # ------------------------------------------------------------------ autoscaling

    def wanted(self, ongoing: float | None = None) -> int:
        ongoing = self.ongoing() if ongoing is None else ongoing
        return min(self.high, max(self.low, math.ceil(ongoing / self.config.target_ongoing)))

    async def _autoscale(self, tick: float = 0.05) -> None:
        over_since = under_since = None
        samples: deque[tuple[float, int]] = deque()
        while True:
            await asyncio.sleep(tick)
            now, current = time.monotonic(), self.target
            samples.append((now, self.ongoing()))
            while samples[0][0] < now - self.config.autoscale_window_s:
                samples.popleft()
            self.ongoing_average = sum(n for _, n in samples) / len(samples)
            wanted = self.wanted(self.ongoing_average)
            if wanted > current:
                under_since = None
                over_since = over_since or now
                if now - over_since >= self.config.upscale_delay_s:
                    await self._scale_up(wanted - current, now - over_since)
                    over_since = None
            elif wanted < current:
                over_since = None
                under_since = under_since or now
                if now - under_since >= self.config.downscale_delay_s:
                    under_since = None
                    await self._scale_down()
            else:
                over_since = under_since = None

    async def _scale_up(self, count: int, over_for_s: float) -> None:
        before, self.target = self.target, self.target + count
        self.counts["scale_up"] += 1
        self._event("scale_up", replicas_from=before, to=self.target, ongoing=round(self.ongoing_average, 2),
                    over_target_for_s=round(over_for_s, 3))
        log.info("scaling up from %d to %d replicas (%.1f requests outstanding)", before, self.target, self.ongoing_average)
        results = await asyncio.gather(*(self._add() for _ in range(count)), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            self.target -= len(failed)
            log.warning("%d replica(s) could not start: %s", len(failed), failed[0])

    async def _scale_down(self) -> None:
        candidates = self.router.up()
        if len(candidates) <= self.low:
            return
        victim = min(candidates, key=lambda r: (r.load(), -r.index))
        before, self.target = self.target, self.target - 1
        victim.state = DRAINING
        self.router.changed()
        self.counts["scale_down"] += 1
        self._event("scale_down", replicas_from=before, to=self.target, replica=victim.index, worker=victim.worker,
                    ongoing=round(self.ongoing_average, 2))
        log.info("scaling down from %d to %d replicas: draining replica %d", before, self.target, victim.index)
        while victim.outstanding_batches and victim.state == DRAINING:
            await asyncio.sleep(0.01)
        index = victim.index
        await victim.close()
        self.router.remove(victim)
        await self._thread(self._stop_actor, index)

    def _event(self, kind: str, **fields) -> None:
        self.events.append({"time": round(time.time(), 3), "event": kind, **fields})

    def placement(self) -> list[dict]:
        out = [{"replica": r.index, "state": r.state, "worker": r.worker, "host": r.endpoint.get("host"),
                "pid": r.endpoint.get("pid"), "device": r.endpoint.get("device"), "kernel": r.endpoint.get("kernel"),
                "load_rows": r.load(), "batches": r.batches} for r in self.router.replicas]
        out += [{"replica": i, "state": "starting", "worker": w} for i, w in self._starting.items()]
        return sorted(out, key=lambda p: p["replica"])
