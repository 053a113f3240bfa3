"""What both HTTP apps (classifier predictions, :mod:`tasks.inference.server`, and language-model
generation, :mod:`tasks.generation.http`) read and write: a size-capped request body and
orjson responses. Its own module so neither app imports the other."""

from __future__ import annotations

import orjson
from starlette.requests import Request
from starlette.responses import Response

from tasks.inference.inputs import PayloadError


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


class JSONResponse(Response):
    """JSON by orjson (NumPy arrays included): parsing and rendering are a good part of
    the per-request cost in the event loop, and orjson is ~10x faster than json."""

    media_type = "application/json"

    def render(self, content) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
