"""The HTTP front of online inference: a Starlette app on uvicorn, with graceful shutdown.

Endpoints:

- ``POST /predict`` with ``{"inputs": [[...row...], ...], "probabilities": false}``. Each row
  is the model's input as the dataset stored it (see :mod:`tasks.inference.inputs`).
  Answers ``{"model": ..., "predictions": [class id per row], "probabilities": [[...]]}``
  (probabilities only when asked). Bad payloads get 400 (not JSON, missing or unknown
  fields, wrong shape, not numbers) or 413 (body or row count over the limit), a full
  queue 429, a server shutting down 503 — each with ``{"error": "<what to fix>"}``.
- ``GET /health``: 200 ``{"status": "ok", ...}``, 503 ``{"status": "draining"}`` on shutdown.
- ``GET /metrics``: Prometheus text format.

A language model is served for generation instead (OpenAI's ``/v1/completions``), by
:mod:`tasks.generation.http` on this same server: see :func:`make_service`.

Shutdown (SIGINT/SIGTERM, or :meth:`ServingServer.request_shutdown`): stop accepting
connections, run the waiting rows without waiting for batch deadlines, answer every
accepted request, then stop the replicas. A second SIGINT forces the exit.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Callable

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from storage.errors import ConfigError
from tasks.inference.adaptive import is_out_of_memory
from tasks.inference.batcher import BatcherClosed, QueueFull
from tasks.inference.config import ServeConfig
from tasks.inference.inputs import PayloadError
from tasks.inference.router import NoReplica
from tasks.inference.service import BatchingFront, InferenceService

log = logging.getLogger("swarm.serve")
FIELDS = ("inputs", "probabilities")


def make_service(config: ServeConfig):
    """A language model: one generation engine in this process (:mod:`tasks.generation.http`);
    a classifier: thread replicas in this process (``in_process``), else replicas on Dask workers."""
    from tasks.generation.loading import is_language_model

    if is_language_model(config.model, config.storage_options):
        from tasks.generation.http import GenerationService

        return GenerationService(config)
    if config.in_process:
        return InferenceService(config)
    from tasks.inference.cluster_service import ClusterInferenceService

    return ClusterInferenceService(config)


def create_app(service: BatchingFront) -> Starlette:
    config = service.config

    async def predict(request: Request) -> Response:
        began = time.perf_counter()
        code, rows = 500, 0
        try:
            body = await read_body(request, config.max_body_bytes)
            inputs, probabilities = _parse(body)
            x = service.spec.parse(inputs, config.max_request_rows)
            logits = await service.predict(x)
            code, rows = 200, len(x)
            return JSONResponse({"model": service.name, **service.spec.answer(logits, probabilities)})
        except PayloadError as exc:
            code = exc.status
            return _error(code, str(exc))
        except QueueFull as exc:
            code = 429
            return _error(code, f"{exc}; retry later", headers={"Retry-After": "1"})
        except (BatcherClosed, NoReplica) as exc:
            code = 503
            return _error(code, str(exc))
        except Exception as exc:  # noqa: BLE001 - the batch failed: say why, keep serving
            if is_out_of_memory(exc):
                code = 503
                return _error(code, f"the model ran out of memory even on one row: {exc}")
            log.exception("prediction failed")
            return _error(code, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            service.metrics.request_done(code, time.perf_counter() - began, rows)

    async def health(request: Request) -> Response:
        if service.draining:
            return JSONResponse({"status": "draining", "model": service.name}, status_code=503)
        return JSONResponse({"status": "ok", **service.describe(),
                             "queue_rows": service.batcher.queued_rows,
                             "requests_in_flight": service.requests_in_flight})

    async def metrics(request: Request) -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    @asynccontextmanager
    async def lifespan(app: Starlette):
        await service.start()
        yield
        await service.close()

    return Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/health", health),
                             Route("/metrics", metrics)], lifespan=lifespan)


async def read_body(request: Request, limit: int, hint: str = "send fewer rows per request") -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadError(f"the body is {int(declared):,} bytes; at most {limit:,} ({hint})", 413)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadError(f"the body is over {limit:,} bytes ({hint})", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(body: bytes) -> tuple[object, bool]:
    usage = 'send {"inputs": [[...row...], ...]} (optionally "probabilities": true)'
    try:
        doc = orjson.loads(body)
    except ValueError as exc:
        raise PayloadError(f"the body is not JSON ({exc}); {usage}") from None
    if not isinstance(doc, dict):
        raise PayloadError(f"the body is a JSON {type(doc).__name__}, not an object; {usage}")
    unknown = sorted(set(doc) - set(FIELDS))
    if unknown:
        raise PayloadError(f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(FIELDS)}")
    if "inputs" not in doc:
        raise PayloadError(f'the body has no "inputs" field; {usage}')
    probabilities = doc.get("probabilities", False)
    if not isinstance(probabilities, bool):
        raise PayloadError(f'"probabilities" must be true or false, not {probabilities!r}')
    return doc["inputs"], probabilities


class JSONResponse(Response):
    """JSON by orjson (NumPy arrays included): parsing and rendering are a good part of
    the per-request cost in the event loop, and orjson is ~10x faster than json."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)


def _error(code: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=code, headers=headers)


class ServingServer(uvicorn.Server):
    """uvicorn's server, draining the batcher as soon as shutdown begins."""

    def __init__(self, config: uvicorn.Config, service: BatchingFront, on_ready: Callable[[], None] | None = None):
        super().__init__(config)
        self.service = service
        self.on_ready = on_ready
        self.loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started and self.on_ready is not None:
            self.on_ready()

    def request_shutdown(self) -> None:
        """Begin a graceful shutdown; safe from any thread."""
        self.should_exit = True
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.service.begin_drain)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Unlike uvicorn's own, the signal is not raised again after the shutdown: a
        # drained server exits normally.
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.request_shutdown()


#: A request's head (request line and headers) at most: h11's bound, which httptools lacks.
MAX_HEAD_BYTES = 16 * 1024


def _http_protocol():
    """uvicorn's httptools protocol with the head bounded as h11 bounds it, or h11 where
    httptools is not installed.

    httptools (llhttp) takes a header of any size: a 1 MB header was served with 200. Here a
    head whose request line and headers pass :data:`MAX_HEAD_BYTES` gets 431 and the
    connection is closed, whether it came in one read (checked when the head is complete)
    or in many (bytes fed while it is incomplete are counted), so a head costs at most the
    bound plus one read.
    """
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return "h11"

    class HeadTooLarge(Exception):
        pass

    class BoundedHttpToolsProtocol(HttpToolsProtocol):
        _in_head = False
        _head_bytes = 0
        _too_large = False

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._head_bytes = True, 0

        def on_headers_complete(self) -> None:
            self._in_head = False
            if len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers) > MAX_HEAD_BYTES:
                self._too_large = True
                raise HeadTooLarge  # the parser stops; uvicorn answers through send_400_response
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._in_head and not self.transport.is_closing():
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD_BYTES:
                    self._too_large = True
                    self.send_400_response("")

        def send_400_response(self, msg: str) -> None:
            if not self._too_large:
                super().send_400_response(msg)
                return
            message = f"request line and headers over {MAX_HEAD_BYTES:,} bytes".encode()
            self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
                                 b"content-type: text/plain; charset=utf-8\r\n"
                                 b"content-length: " + str(len(message)).encode() + b"\r\n"
                                 b"connection: close\r\n\r\n" + message)
            self.transport.close()

    return BoundedHttpToolsProtocol


def bind(host: str, port: int) -> socket.socket:
    # The protocol must be given: asyncio sets TCP_NODELAY only on sockets whose proto is
    # IPPROTO_TCP, and without it every response (headers, then body) waits out the
    # client's delayed ACK, ~40 ms.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port, or 0 for a free one") from None
    sock.set_inheritable(True)
    return sock


@dataclass
class Served:
    url: str
    answered: int
    seconds: float
    batch_sizes: list  # each replica's adaptive batch size report (None without --adaptive)
    generated_tokens: int | None = None  # a language model's


def _server(config: ServeConfig, on_ready: Callable[[str, dict], None] | None = None):
    # Bound first: a port in use is found before replicas start on a cluster.
    sock = bind(config.host, config.port)
    try:
        service = make_service(config)
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    uv_config = uvicorn.Config(_app(service), http=_http_protocol(), log_level="warning", access_log=False,
                               lifespan="on", timeout_keep_alive=30, backlog=4096,
                               h11_max_incomplete_event_size=MAX_HEAD_BYTES)
    server = ServingServer(uv_config, service, (lambda: on_ready(url, service.describe())) if on_ready else None)
    return server, sock, url


def _app(service) -> Starlette:
    if isinstance(service, BatchingFront):
        return create_app(service)
    from tasks.generation.http import create_app as generation_app

    return generation_app(service)


def serve(config: ServeConfig, on_ready: Callable[[str, dict], None] | None = None) -> Served:
    """Serve until SIGINT/SIGTERM, then drain; ``on_ready(url, description)`` once it accepts
    requests (the description is ``/health``'s: replicas, their placement ...)."""
    server, sock, url = _server(config, on_ready)
    # Everything loaded so far (torch, prefect, the model: ~250k objects) lives as long as
    # the process; taken out of the collector's view, a full collection no longer stalls
    # every in-flight request for ~100 ms.
    gc.collect()
    gc.freeze()
    began = time.monotonic()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    service = server.service
    engine = getattr(service, "engine", None)
    return Served(url, service.answered, time.monotonic() - began, service.batch_size_reports(),
                  engine.stats()["generated_tokens"] if engine is not None else None)


class BackgroundServer:
    """A server on a background thread (tests, notebooks, benchmarks); ``stop()`` drains it."""

    def __init__(self, config: ServeConfig, timeout: float = 60.0):
        ready = threading.Event()
        self.server, self._sock, self.url = _server(config, lambda _url, _description: ready.set())
        self.service = self.server.service
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name="swarm-serve", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            self.stop()
            raise RuntimeError(f"the server did not start within {timeout} s")

    def stop(self, timeout: float = 60.0) -> None:
        self.server.request_shutdown()
        self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
