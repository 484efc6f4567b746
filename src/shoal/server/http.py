"""What every endpoint shares: reading a bounded body, turning a validation failure into shoal's
errors, waiting on work unless the client leaves, and a server-sent event response that stops
when the client does."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TypeVar

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from shoal.errors import (
    MalformedRequestError,
    PayloadTooLargeError,
    ShoalError,
    UnsupportedParameterError,
)

T = TypeVar("T")
JSON_TYPE = "application/json"


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise PayloadTooLargeError(limit)
        except ValueError:
            raise MalformedRequestError("the Content-Length header is not a number") from None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def request_error(exc: ValidationError, *, what: str, fields: str = "") -> ShoalError:
    """The error that reports a body that failed validation: invalid JSON, a parameter shoal
    does not honour (named), or the first few problems. `what` names the request ("chat
    request"); `fields` lists the valid fields for an unknown one."""
    errors = exc.errors(include_url=False, include_input=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return MalformedRequestError(f"the body is not valid JSON: {first['msg']}")
    unknown = [".".join(str(p) for p in e["loc"]) for e in errors if e["type"] == "extra_forbidden"]
    if unknown:
        hint = f"a {what} takes {fields}" if fields else "shoal does not honour them"
        return UnsupportedParameterError(
            f"unsupported parameter(s): {', '.join(unknown)} ({hint})", param=unknown[0]
        )
    for e in errors:
        if e["type"] == "unsupported_parameter":
            ctx = e.get("ctx") or {}
            return UnsupportedParameterError(
                f"unsupported parameter: {e['msg']}", param=str(ctx.get("param", "")) or None
            )
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:5]
    )
    param = ".".join(str(p) for p in first["loc"]) or None
    return MalformedRequestError(f"invalid {what}: {problems}", param=param)


async def disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_gone(receive: Receive, work: Awaitable[T]) -> T:
    """`await work`, cancelled (raising `ClientGone`) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = False

    async def watch() -> None:
        nonlocal gone
        await disconnected(receive)
        gone = True
        task.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if gone:
            raise ClientGone from None
        raise
    finally:
        watcher.cancel()


class EventStreamResponse(Response):
    """An SSE response that closes its event source however the response ends, and stops as
    soon as the client disconnects (not only at its next write)."""

    media_type = "text/event-stream"

    def __init__(
        self,
        body: AsyncGenerator[bytes, None],
        *,
        headers: dict[str, str],
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`on_close` runs once the response has ended, however it ended: a body that never
        started (the client left before the first byte) runs none of its own cleanup."""
        self.body_iterator = body
        self.on_close = on_close
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache", "x-accel-buffering": "no", **headers})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        watcher = asyncio.ensure_future(disconnected(receive))
        try:
            await asyncio.wait((pump, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not pump.done():
                pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await pump
            if self.on_close is not None:
                await self.on_close()

    async def _pump(self, send: Send) -> None:
        async with contextlib.aclosing(self.body_iterator) as body:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in body:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
