"""Closed-loop streaming clients of ``/v1/completions``, run as their own process by
``generate_bench.py`` (so the server's process pays for serving only).

Reads ``{"url", "clients", "work": [[prompt ids, max_tokens], ...]}`` on stdin; each of
``clients`` asyncio workers sends its next request (greedy, ``stream: true``) when its last
one ended. Prints one JSON object: per request, time to first chunk, the token ids, and the
finish reason.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx


async def one(client: httpx.AsyncClient, prompt: list[int], n: int) -> dict:
    began, first, ids, reason = time.perf_counter(), None, [], None
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            if first is None and choice["token_ids"]:
                first = time.perf_counter() - began
            ids += choice["token_ids"]
            reason = choice["finish_reason"] or reason
    return {"ttft_s": first, "tokens": ids, "finish_reason": reason}


async def main() -> None:
    job = json.load(sys.stdin)
    todo = list(enumerate(job["work"]))
    results: dict[int, dict] = {}
    limits = httpx.Limits(max_connections=job["clients"], max_keepalive_connections=job["clients"])
    async with httpx.AsyncClient(base_url=job["url"], timeout=600, limits=limits) as client:
        async def worker():
            while todo:
                i, (prompt, n) = todo.pop(0)
                results[i] = await one(client, prompt, n)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(job["clients"])))
        wall = time.perf_counter() - began
    print(json.dumps({"wall_s": wall, "results": [results[i] for i in range(len(job["work"]))]}))


if __name__ == "__main__":
    asyncio.run(main())
