"""A submitted request as its caller sees it: a stream of tokens, then a result.

The engine's thread pushes events; the caller iterates them (``for event in handle``, or
``async for event in handle.stream()`` in an event loop, which holds no thread while it
waits) or waits for the whole result. Text is decoded incrementally with the model's tokenizer and
held back while it could still be the start of a stop string (or ends in half a character),
so a streamed answer never shows text that the stop string later removes.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator


@dataclass
class TokenEvent:
    token_id: int | None        # None on the final event of a request that ended without a new token
    text: str                   # new text since the previous event ("" without a tokenizer)
    finished: bool = False
    finish_reason: str | None = None   # "stop", "length", "cancelled" or "error" (the engine's step failed)


@dataclass
class GenerationResult:
    request_id: str
    prompt_tokens: int
    tokens: list[int]
    text: str | None
    finish_reason: str
    ttft_s: float | None
    token_times: list[float] = field(default_factory=list)   # perf_counter of each token

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


class RequestHandle:
    def __init__(self, request_id: str, prompt_tokens: int, stop: tuple[str, ...],
                 decode: Callable[[list[int]], str] | None, cancel: Callable[[str], None]):
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.arrival = time.perf_counter()
        self.tokens: list[int] = []
        self.token_times: list[float] = []
        self.finish_reason: str | None = None
        self._stop = stop
        self._decode = decode
        self._cancel = cancel
        self._text = ""
        self._emitted = 0
        self._events: queue.Queue[TokenEvent] = queue.Queue()
        self._done = threading.Event()
        self._wake: Callable[[], None] | None = None   # set by stream(): wakes its event loop

    # called by the engine, under its lock
    def push(self, token: int) -> bool:
        """Record a token; True when it completed a stop string (the text then ends before it)."""
        self.tokens.append(token)
        self.token_times.append(time.perf_counter())
        if self._decode is None:
            self._put(TokenEvent(token, ""))
            return False
        self._text = self._decode(self.tokens)
        hit = min((i for i in (self._text.find(s) for s in self._stop) if i >= 0), default=-1)
        if hit >= 0:
            self._text = self._text[:hit]
            return True
        safe = len(self._text) - max((len(s) - 1 for s in self._stop), default=0)
        while safe > self._emitted and self._text[safe - 1] == "\ufffd":
            safe -= 1
        delta = self._text[self._emitted:max(safe, self._emitted)]
        self._emitted += len(delta)
        self._put(TokenEvent(token, delta))
        return False

    def close(self, reason: str) -> None:
        self.finish_reason = reason
        rest = self._text[self._emitted:] if self._decode else ""
        self._emitted = len(self._text)
        self._done.set()
        self._put(TokenEvent(None, rest, finished=True, finish_reason=reason))

    def _put(self, event: TokenEvent) -> None:
        self._events.put(event)
        wake = self._wake
        if wake is not None:
            wake()

    # called by the caller
    @property
    def done(self) -> bool:
        return self._done.is_set()

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            event = self._events.get()
            yield event
            if event.finished:
                return

    async def stream(self) -> AsyncIterator[TokenEvent]:
        """The events, for a caller in an asyncio event loop: the engine's thread wakes the loop."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:   # the loop has closed: nobody listens any more
                pass

        self._wake = wake
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                await ready.wait()
                ready.clear()
                continue
            yield event
            if event.finished:
                return

    def result(self, timeout: float | None = None) -> GenerationResult:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        ttft = self.token_times[0] - self.arrival if self.token_times else None
        return GenerationResult(self.request_id, self.prompt_tokens, list(self.tokens),
                                self._text if self._decode else None, self.finish_reason or "", ttft,
                                list(self.token_times))

    def cancel(self) -> None:
        """Stop generating; the request's cache blocks go back to the pool at once."""
        self._cancel(self.request_id)
