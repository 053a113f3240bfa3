"""OpenAI-compatible generation over HTTP: one :class:`~tasks.generation.Engine` behind the
serving stack of :mod:`tasks.inference.server` (Starlette on uvicorn, its body limits,
bounded heads, graceful shutdown and Prometheus registry).

Endpoints:

- ``POST /v1/completions``: ``prompt`` (a string, or a list of token ids), ``max_tokens``,
  ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``, ``stream`` ... (see
  :mod:`tasks.generation.openai_api`). One JSON answer, or server-sent events
  (``data: {chunk}``, then ``data: [DONE]``); ``usage`` in the answer and in the last chunk.
- ``POST /v1/chat/completions``: ``messages``, for a model whose tokenizer has a chat
  template (``hf:`` folders); otherwise 400 saying so.
- ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text).

Errors are OpenAI's ``{"error": {...}}``: 400 for bad input (empty or too long prompt,
``max_tokens`` <= 0 or over the limit, temperature < 0, ``top_p`` outside (0, 1], unknown
fields), 429 with ``Retry-After`` when the engine's waiting queue is full (the KV pool is
never oversubscribed: admission waits for free blocks), 503 while shutting down. A client
that disconnects, mid-stream or while waiting for its answer, has its request cancelled at
once: its KV blocks go back to the pool. A failed engine step ends its requests with 500
(streams: an ``error`` event, then ``[DONE]``) and the server keeps serving. On SIGTERM the
server stops accepting, answers every accepted request to its end, then exits.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
import time
from typing import AsyncIterator, Callable

import torch
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from storage.errors import ConfigError
from tasks.generation.engine import Engine
from tasks.generation.handle import RequestHandle
from tasks.generation.loading import load_runner
from tasks.generation.openai_api import (OPENAI_DEFAULT_MAX_TOKENS, ApiError, ChatBody, CompletionBody, choice,
                                         chat_messages, completion_prompt, envelope, load_chat_template, parse_body,
                                         sampling, sse, usage)
from tasks.generation.params import QueueFull, Request
from tasks.generation.serve_metrics import GenerationMetrics
from tasks.inference.config import ServeConfig
from tasks.inference.inputs import PayloadError
from tasks.inference.server import JSONResponse, read_body

log = logging.getLogger("swarm.serve")
_ids = itertools.count()


class GenerationService:
    """The engine and what the HTTP front needs of it; the same surface the classifier's
    :class:`~tasks.inference.service.BatchingFront` offers the server (``start``, ``close``,
    ``begin_drain``, ``describe``, ``answered``, ``batch_size_reports``)."""

    def __init__(self, config: ServeConfig):
        low, high = config.replica_bounds
        if config.replicas != 1 or high != 1:
            raise ConfigError(f"a language model is served by one generation engine in this process, which batches "
                              f"every request itself: leave --replicas/--max-replicas at 1 (got {config.replicas}"
                              f"{f', max {high}' if high != config.replicas else ''})")
        if config.max_tokens_per_step < config.max_batch_size:
            raise ConfigError(f"--max-tokens-per-step ({config.max_tokens_per_step}) must be at least --max-batch-size "
                              f"({config.max_batch_size}): every running sequence decodes a token at every step")
        if config.threads_per_replica:
            torch.set_num_threads(config.threads_per_replica)
        runner = load_runner(config.model, config.storage_options)
        runner.model.to(_device(config.device))
        self.config = config
        self.name = config.model
        self.engine = Engine(runner, pool_tokens=config.kv_pool_tokens, block_size=config.kv_block_size,
                             max_batch=config.max_batch_size, max_waiting=config.max_waiting,
                             max_tokens_per_step=config.max_tokens_per_step,
                             max_new_tokens_limit=config.max_new_tokens_limit)
        self.chat = load_chat_template(config.model, config.storage_options)
        self.metrics = GenerationMetrics(self)
        self.draining = False
        self.answered = 0
        self.requests_in_flight = 0
        self.created = int(time.time())

    @property
    def tokenizer(self):
        return self.engine.runner.tokenizer

    async def start(self) -> None:
        self.engine.start()

    def begin_drain(self) -> None:
        self.draining = True

    async def close(self) -> None:
        """After the last connection closed: let the engine finish what it holds, then stop it."""
        self.draining = True
        await asyncio.get_running_loop().run_in_executor(None, self.engine.stop)

    def batch_size_reports(self) -> list:
        return []

    def describe(self) -> dict:
        runner = self.engine.runner
        return {"model": self.name, "kind": "language-model", "context": runner.context,
                "vocab_size": runner.vocab_size, "device": str(runner.device), "tokenizer": self.tokenizer is not None,
                "chat_template": self.chat is not None, "max_new_tokens_limit": self.engine.max_new_tokens_limit,
                "endpoints": ["POST /v1/completions", *(["POST /v1/chat/completions"] if self.chat else []),
                              "GET /v1/models", "GET /health", "GET /metrics"],
                **{k: v for k, v in self.engine.stats().items() if k in ("running", "waiting", "kv_pool")}}

    # --- requests -----------------------------------------------------------------------------
    def check_model(self, body) -> None:
        if body.model is not None and body.model != self.name:
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves {self.name!r}",
                           "model", kind="not_found_error")

    def completion(self, raw: bytes) -> tuple[CompletionBody, Request]:
        body = parse_body(raw, CompletionBody)
        self.check_model(body)
        prompt = completion_prompt(body, self.tokenizer)
        max_tokens = OPENAI_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        return body, Request(prompt, sampling(body, max_tokens), f"{next(_ids)}-{os.getpid()}")

    def chat_completion(self, raw: bytes) -> tuple[ChatBody, Request]:
        body = parse_body(raw, ChatBody)
        self.check_model(body)
        if self.chat is None:
            raise ApiError(400, f"model {self.name!r} has no chat template (only an hf: folder whose tokenizer "
                                f"defines one has): use POST /v1/completions with a prompt", "messages")
        prompt = self.chat.render(chat_messages(body))
        given = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        pool = self.engine.pool
        room = min(self.engine.max_new_tokens_limit, self.engine.runner.context - len(prompt),
                   pool.num_blocks * pool.block_size - len(prompt))
        return body, Request(prompt, sampling(body, given if given is not None else max(room, 1)),
                             f"{next(_ids)}-{os.getpid()}")

    def submit(self, request: Request) -> RequestHandle:
        if self.draining:
            raise ApiError(503, "the server is shutting down and takes no new requests", kind="server_error")
        try:
            return self.engine.submit(request)
        except ConfigError as exc:
            raise ApiError(400, str(exc).replace("max_new_tokens", "max_tokens")) from None
        except QueueFull as exc:
            if self.draining:
                raise ApiError(503, str(exc), kind="server_error") from None
            retry = str(max(1, math.ceil(exc.retry_after_s)))
            raise ApiError(429, f"{exc}; retry after {retry} s", kind="rate_limit_error",
                           headers={"Retry-After": retry}) from None

    def failure(self) -> ApiError:
        return ApiError(500, f"generation failed: {self.engine.last_error}", kind="server_error")

    async def events(self, handle: RequestHandle):
        """The handle's events, each token's latency observed as it is handed on."""
        index = 0
        async for event in handle.stream():
            if event.token_id is not None:
                self.metrics.on_token(handle.arrival, handle.token_times, index)
                index += 1
            yield event


def _device(device: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible here; use --device cpu or auto")
    return "cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------- the app


def create_app(service: GenerationService) -> Starlette:
    def endpoint(chat: bool):
        async def handle_request(request: HttpRequest) -> Response:
            began = time.perf_counter()
            service.requests_in_flight += 1
            streaming = False
            try:
                raw = await read_body(request, service.config.max_body_bytes, "send a shorter prompt")
                body, gen_request = (service.chat_completion if chat else service.completion)(raw)
                handle = service.submit(gen_request)
                if body.stream:
                    streaming = True
                    return EventStream(_chunks(service, handle, body, chat), handle.cancel,
                                       lambda code: _done(service, code, began, streamed=True))
                doc = await _until_disconnect(_answer(service, handle, body, chat), request.receive, handle.cancel)
                _done(service, 200, began)
                return JSONResponse(doc)
            except PayloadError as exc:
                return _failed(service, ApiError(exc.status, str(exc)), began)
            except ApiError as exc:
                return _failed(service, exc, began)
            except ClientGone:
                _done(service, 499, began)
                return Response(status_code=499)
            except Exception as exc:  # noqa: BLE001 - a bug: say so, keep serving
                log.exception("generation failed")
                return _failed(service, ApiError(500, f"internal error: {type(exc).__name__}: {exc}",
                                                 kind="server_error"), began)
            finally:
                if not streaming:
                    service.requests_in_flight -= 1
        return handle_request

    async def models(request: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": service.name, "object": "model",
                                                         "created": service.created, "owned_by": "swarm",
                                                         "max_model_len": service.engine.runner.context}]})

    async def health(request: HttpRequest) -> Response:
        if service.draining:
            return JSONResponse({"status": "draining", "model": service.name}, status_code=503)
        return JSONResponse({"status": "ok", **service.describe(), "requests_in_flight": service.requests_in_flight})

    async def metrics(request: HttpRequest) -> Response:
        return Response(service.metrics.render(), media_type=service.metrics.content_type)

    async def lifespan(app: Starlette):
        await service.start()
        yield
        await service.close()

    from contextlib import asynccontextmanager

    return Starlette(routes=[Route("/v1/completions", endpoint(False), methods=["POST"]),
                             Route("/v1/chat/completions", endpoint(True), methods=["POST"]),
                             Route("/v1/models", models), Route("/health", health), Route("/metrics", metrics)],
                     lifespan=asynccontextmanager(lifespan))


def _done(service: GenerationService, code: int, began: float, streamed: bool = False) -> None:
    service.metrics.request_done(code, time.perf_counter() - began)
    if streamed:
        service.requests_in_flight -= 1
    if code == 200:
        service.answered += 1


def _failed(service: GenerationService, exc: ApiError, began: float) -> Response:
    _done(service, exc.status, began)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _answer(service: GenerationService, handle: RequestHandle, body, chat: bool) -> dict:
    text, tokens, reason = [], [], None
    async for event in service.events(handle):
        text.append(event.text)
        if event.token_id is not None:
            tokens.append(event.token_id)
        reason = event.finish_reason
    if reason == "error":
        raise service.failure()
    return envelope(chat, handle.request_id, int(time.time()), service.name,
                    [choice(chat, "".join(text), tokens, reason, delta=False)], stream=False,
                    usage_doc=usage(handle.prompt_tokens, len(tokens)))


async def _chunks(service: GenerationService, handle: RequestHandle, body, chat: bool) -> AsyncIterator[bytes]:
    created = int(time.time())

    def chunk(text: str, ids: list[int], reason: str | None, usage_doc: dict | None = None) -> bytes:
        return sse(envelope(chat, handle.request_id, created, service.name, [choice(chat, text, ids, reason, True)],
                            stream=True, usage_doc=usage_doc))

    if chat:   # OpenAI's first chat chunk names the role
        first = envelope(chat, handle.request_id, created, service.name,
                         [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                           "finish_reason": None}], stream=True)
        yield sse(first)
    count = 0
    async for event in service.events(handle):
        if event.finished and event.finish_reason == "error":
            yield sse(service.failure().body())   # as vLLM does: an error event, then the end
            break
        if event.finished:
            yield chunk(event.text, [], event.finish_reason, usage(handle.prompt_tokens, count))
            break
        count += 1
        yield chunk(event.text, [event.token_id], None)
    if body.stream_options and body.stream_options.get("include_usage"):
        yield sse(envelope(chat, handle.request_id, created, service.name, [], stream=True,
                           usage_doc=usage(handle.prompt_tokens, count)))
    yield sse("[DONE]")


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


async def _wait_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _until_disconnect(work, receive, on_gone: Callable[[], None]):
    """Run ``work`` unless the client disconnects first: then ``on_gone()`` (cancel the request)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            on_gone()
    if task.cancelled():
        raise ClientGone
    return task.result()


class EventStream(StreamingResponse):
    """Server-sent events that cancel the request as soon as the client is gone, whether it
    left while a chunk was being sent or while the request was waiting for its next token."""

    def __init__(self, chunks: AsyncIterator[bytes], on_gone: Callable[[], None], on_end: Callable[[int], None]):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_gone, self.on_end = on_gone, on_end

    async def __call__(self, scope, receive, send) -> None:
        code = 499
        try:
            await _until_disconnect(self.stream_response(send), receive, self.on_gone)
            code = 200
        except (ClientGone, OSError):   # uvicorn's send raises an OSError once the client is gone
            self.on_gone()
        finally:
            self.on_end(code)
