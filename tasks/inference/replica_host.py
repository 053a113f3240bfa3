"""A replica on a Dask worker: an actor that keeps a service loaded and answers batches directly.

:class:`ReplicaActor` is created by the router's side as a Dask actor pinned to one worker
(``client.submit(ReplicaActor, ..., actor=True, workers=[w])``): Dask places it, keeps it
alive while the router holds its future and tells the router when its worker leaves. The
batches themselves do not go through Dask: a Dask actor call costs ~1.3 ms here (scheduler
bookkeeping, msgpack, tornado), more than the router's whole latency budget, so the actor
starts :class:`ReplicaHost`, a small asyncio server on a thread of the worker, and the
router connects to it once and streams whole batches over it (:mod:`tasks.inference.wire`).

A replica runs a *service*: anything with ``run(batch) -> outputs`` (one output row per
input row), ``report()`` (its adaptive batch size report, or None) and ``describe()``
(where and how it runs), built on the worker by a factory named by import path, so other
kinds of model (generation) can be served by the same replicas. :func:`classifier_service`
is the one for ``swarm serve``'s models. Each replica runs its batches one at a time on its
own compute thread (:class:`~tasks.inference.replicas.Replica`), holds at most
``max_batches`` (more are refused with ``busy``: the router then sends them elsewhere) and
answers ``ping`` probes from its event loop while a batch computes.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import threading
import weakref
from typing import Any, Callable, Protocol

import numpy as np

from tasks.inference import wire
from tasks.inference.adaptive import is_out_of_memory
from tasks.inference.replicas import Replica

log = logging.getLogger("swarm.serve.replica")


class BatchService(Protocol):
    threads: int | None  # torch threads for the compute thread (None: leave as is)

    def run(self, batch: np.ndarray) -> np.ndarray: ...

    def report(self) -> dict[str, Any] | None: ...

    def describe(self) -> dict[str, Any]: ...


class ClassifierService:
    """A checkpoint's model as a replica's service: adaptive batch size, memory cap, CPU kernel path."""

    def __init__(self, config: dict[str, Any], threads: int | None):
        import torch

        from tasks.inference.config import ServeConfig
        from tasks.inference.model_replica import build_replica, load_served_model

        cfg = ServeConfig(**config)
        served = load_served_model(cfg)
        gpu = cfg.device != "cpu" and torch.cuda.is_available()
        self.device = "cuda" if gpu else "cpu"  # a GPU worker sees its own GPU as cuda:0
        replica = build_replica(served, served.loaded.model, cfg, self.device, threads)
        self.run, self.controller, self.kernel, self.threads = replica.predict, replica.controller, replica.kernel, replica.threads

    def report(self) -> dict[str, Any] | None:
        return self.controller.report() if self.controller else None

    def report_version(self) -> tuple:
        c = self.controller
        return () if c is None else (len(c.tried), len(c.changes), c.settled, len(c.oom_sizes), c.candidate, c.current)

    def describe(self) -> dict[str, Any]:
        return {"device": self.device, "kernel": self.kernel, "threads": self.threads}


def classifier_service(config: dict[str, Any], threads: int | None) -> ClassifierService:
    return ClassifierService(config, threads)


def _factory(path: str) -> Callable[..., BatchService]:
    module, _, name = path.partition(":")
    if not module.startswith("tasks."):
        raise ValueError(f"replica service factory {path!r} is not one of this project's (tasks.*)")
    return getattr(importlib.import_module(module), name)


class ReplicaHost:
    """The service behind an asyncio server on its own thread; :meth:`stop` from any thread."""

    def __init__(self, service: BatchService, host: str, max_batches: int, index: int = 0):
        self.service, self.max_batches = service, max_batches
        self.replica = Replica(index, service.run, service.threads, max_in_flight=max_batches)
        self._version = getattr(service, "report_version", lambda: None)
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._main, args=(host, ready), name=f"swarm-replica-host-{index}",
                                        daemon=True)
        self._thread.start()
        ready.wait(60)
        if self._server is None:
            raise RuntimeError(f"the replica could not listen on {host}")
        self.host, self.port = host, self._server.sockets[0].getsockname()[1]

    def _main(self, host: str, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._server = self._loop.run_until_complete(asyncio.start_server(self._connection, host, 0))
        finally:
            ready.set()
        self._loop.run_forever()

    def load(self) -> dict[str, int]:
        return {"rows": self.replica.in_flight_rows, "batches": self.replica.in_flight_batches}

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        sent_version: list = [None]  # the report version this connection has seen
        tasks: set[asyncio.Task] = set()
        try:
            while True:
                header, array = await wire.read(reader)
                if header.get("op") == "predict" and array is not None:
                    task = asyncio.ensure_future(self._predict(writer, header["id"], array, sent_version))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                else:
                    self._reply(writer, {"id": header.get("id"), "ok": True, "load": self.load(),
                                         "report": self.service.report(), "describe": self.service.describe()})
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the router went away (or stopped this replica)
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _predict(self, writer: asyncio.StreamWriter, ident: int, rows: np.ndarray, sent_version: list) -> None:
        if not self.replica.has_room():
            self._reply(writer, {"id": ident, "ok": False, "busy": True, "error": "the replica's queue is full"})
            return
        try:
            outputs = await self.replica.run(rows)
        except Exception as exc:  # noqa: BLE001 - the batch failed: the router reports it
            self._reply(writer, {"id": ident, "ok": False, "oom": is_out_of_memory(exc),
                                 "error": f"{type(exc).__name__}: {exc}"})
            return
        header = {"id": ident, "ok": True, "load": self.load(), "seconds": self.replica.last_batch_s}
        version = self._version()
        if version != sent_version[0]:
            sent_version[0] = version
            header["report"] = self.service.report()
        self._reply(writer, header, outputs)

    @staticmethod
    def _reply(writer: asyncio.StreamWriter, header: dict, array: np.ndarray | None = None) -> None:
        if not writer.is_closing():
            writer.write(wire.encode(header, array))

    def stop(self) -> None:
        if not self._loop.is_closed() and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            self._thread.join(30)
        self.replica.close()

    async def _shutdown(self) -> None:
        """Close the listener and every connection (their routers see it at once), then stop."""
        try:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()
            await asyncio.sleep(0)  # the aborts' and cancellations' callbacks run before the loop stops
        finally:
            self._loop.stop()


class ReplicaActor:
    """A Dask actor: builds ``factory(**kwargs, threads=...)`` on its worker and serves it
    (see the module docstring). ``endpoint()`` says where to connect and where it runs."""

    def __init__(self, factory: str, kwargs: dict[str, Any], index: int, max_batches: int,
                 threads: int | None = None):
        from distributed import get_worker

        worker = get_worker()
        self.worker = worker.address
        host = self.worker.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
        service = _factory(factory)(**kwargs, threads=threads or worker.state.nthreads)
        self._host = ReplicaHost(service, host, max_batches, index)
        self._finalizer = weakref.finalize(self, self._host.stop)  # Dask dropped the actor: stop serving

    def endpoint(self) -> dict[str, Any]:
        return {"host": self._host.host, "port": self._host.port, "worker": self.worker, "pid": os.getpid(),
                **self._host.service.describe()}

    def stop(self) -> bool:
        self._finalizer()
        return True
