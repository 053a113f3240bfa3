"""A fault-injecting reverse proxy for S3: transient 5xx, throttling, timeouts, dropped connections.

It sits between our code and moto's server and, for about ``rate`` of requests, answers
with a fault instead of forwarding. Faults are drawn from a seeded RNG so a scenario is
reproducible; counters say how many of each were injected.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import Counter

from aiohttp import ClientSession, web

FAULTS = ("500", "503-slowdown", "timeout", "drop")

_ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{msg}</Message></Error>'
)


class FaultProxy:
    def __init__(self, upstream: str, rate: float = 0.1, seed: int = 0, timeout_s: float = 3.0,
                 faults: tuple[str, ...] = FAULTS):
        self.upstream = upstream.rstrip("/")
        self.rate = rate
        self.rng = random.Random(seed)
        self.timeout_s = timeout_s
        self.faults = faults
        self.injected: Counter = Counter()
        self.forwarded = 0
        self.enabled = True
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._started.wait(10)

    @property
    def storage_options(self) -> dict:
        # Short timeouts so an injected hang costs seconds; retries as a user would configure.
        return {"endpoint_url": self.endpoint,
                "config_kwargs": {"read_timeout": self.timeout_s - 1, "connect_timeout": 2,
                                  "retries": {"max_attempts": 10, "mode": "standard"}}}

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        port = site._server.sockets[0].getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self._session = ClientSession(loop=self._loop, auto_decompress=False)
        self._started.set()
        self._loop.run_forever()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if self.enabled and self.rng.random() < self.rate:
            fault = self.rng.choice(self.faults)
            self.injected[fault] += 1
            if fault == "500":
                return web.Response(status=500, text=_ERROR_BODY.format(code="InternalError", msg="injected"),
                                    content_type="application/xml")
            if fault == "503-slowdown":
                return web.Response(status=503, text=_ERROR_BODY.format(code="SlowDown", msg="injected"),
                                    content_type="application/xml")
            if fault == "timeout":
                await asyncio.sleep(self.timeout_s + 1)
                return web.Response(status=500, text="late")
            if fault == "drop":
                request.transport.close()
                raise web.HTTPInternalServerError()
        self.forwarded += 1
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.request(request.method, self.upstream + request.rel_url.human_repr(),
                                         headers=headers, data=body, allow_redirects=False) as up:
            payload = await up.read()
            drop = ("transfer-encoding", "content-encoding", "connection")
            if request.method != "HEAD":
                drop += ("content-length",)  # recomputed for the body; HEAD must keep the object's size
            out_headers = {k: v for k, v in up.headers.items() if k.lower() not in drop}
            if request.method == "HEAD":
                resp = web.StreamResponse(status=up.status, headers=out_headers)
                resp.content_length = int(up.headers.get("Content-Length", 0))
                await resp.prepare(request)
                return resp
            return web.Response(status=up.status, body=payload, headers=out_headers)

    def stop(self) -> None:
        async def _close():
            await self._session.close()
            await self._runner.cleanup()

        asyncio.run_coroutine_threadsafe(_close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
