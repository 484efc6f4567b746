"""Any OpenAI-compatible `/v1/chat/completions` endpoint (OpenAI, vLLM, Ollama, llama.cpp's
server, another shoal), over async HTTP with streaming, timeouts and bounded concurrency.

The request it sends, the completion it reads and the stream's chunks are translated by
`shoal.openai_wire`, the same module the server answers with. The stream is read as server-sent
events (`SSEDecoder`), up to OpenAI's `data: [DONE]`.

What a call costs: the card's price for the usage the upstream reports. When the upstream is
another shoal gateway (its answer carries a `shoal` object), the answer keeps the upstream's
route decision and whether its usage was estimated, and when the card has no token price of its
own (both prices 0), the cost the upstream reported is the call's cost: the upstream priced the
models it called, cascades included.

When the upstream reports no usage (some servers ignore `stream_options.include_usage`), shoal
estimates it: the prompt as the card's estimator counts it (`estimate_tokens`), and one token per
content chunk of a stream (about 4 characters per token of a whole completion); the answer is
flagged `usage_estimated`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from pydantic import ValidationError

from shoal.cards import ModelCard, TokenPrice, estimate_tokens
from shoal.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    ConfigError,
    OverloadedError,
    UpstreamHTTPError,
)
from shoal.messages import ChatRequest, ChatResponse, Completed, StreamEvent, Usage
from shoal.models.base import Model
from shoal.models.output import check_json
from shoal.money import whole_pico
from shoal.openai_wire import (
    STREAM_DONE,
    ChatCompletion,
    ChatCompletionChunk,
    ChunkReader,
    JsonSchemaStyle,
    ShoalInfo,
    error_message,
    from_chat_request,
    read_chunk,
    response_of,
)

log = logging.getLogger(__name__)


class OpenAICompatModel(Model):
    def __init__(
        self,
        card: ModelCard,
        *,
        base_url: str,
        upstream_model: str | None = None,
        api_key_env: str | None = None,
        timeout_s: float = 60.0,
        max_concurrency: int = 16,
        max_queue: int = 256,
        schema_style: JsonSchemaStyle = "openai",
    ) -> None:
        self.card = card
        self.base_url = base_url.rstrip("/")
        self.upstream_model = upstream_model or card.id
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.schema_style = schema_style
        self._session: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting = 0

    # -- connection and admission ------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise ConfigError(
                    f"{self.id}: environment variable {self.api_key_env} (its API key) is not set"
                )
            headers["authorization"] = f"Bearer {key}"
        return headers

    def _bind(self) -> tuple[aiohttp.ClientSession, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        if self._session is None or self._slots is None or self._loop is not loop:
            if self._session is not None:
                _abandon(self._session)
            self._loop = loop
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=min(10.0, self.timeout_s)),
                connector=aiohttp.TCPConnector(limit=self.max_concurrency),
            )
            self._slots = asyncio.Semaphore(self.max_concurrency)
        return self._session, self._slots

    async def _admit(self, slots: asyncio.Semaphore) -> None:
        if slots.locked():
            if self._waiting >= self.max_queue:
                raise OverloadedError(
                    f"{self.id}: {self.max_concurrency} calls running and {self._waiting} waiting"
                )
            self._waiting += 1
            try:
                await slots.acquire()
            finally:
                self._waiting -= 1
        else:
            await slots.acquire()

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is None or session.closed:
            return
        if self._loop is asyncio.get_running_loop():
            await session.close()
        else:
            _abandon(session)

    async def _post(self, session: aiohttp.ClientSession, body: dict[str, Any]) -> Any:
        try:
            response = await session.post(
                f"{self.base_url}/chat/completions", json=body, headers=self._headers()
            )
        except aiohttp.ClientConnectionError as exc:
            raise BackendUnavailableError(
                f"{self.id}: cannot reach {self.base_url}: {exc}"
            ) from exc
        if response.status >= 400:
            text = await response.text(errors="replace")
            response.release()
            raise UpstreamHTTPError(response.status, error_message(text))
        return response

    # -- calls -------------------------------------------------------------------------------

    def _body(self, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        wire = from_chat_request(
            request, self.upstream_model, stream=stream, schema_style=self.schema_style
        )
        return wire.body()

    async def generate(self, request: ChatRequest) -> ChatResponse:
        session, slots = self._bind()
        body = self._body(request, stream=False)
        await self._admit(slots)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                response = await self._post(session, body)
                async with response:
                    raw = await response.read()
        except TimeoutError as exc:
            raise BackendTimeoutError(f"{self.id}: no answer within {self.timeout_s} s") from exc
        except aiohttp.ClientError as exc:
            raise BackendError(f"{self.id}: broken response from {self.base_url}: {exc}") from exc
        finally:
            slots.release()
        latency = time.perf_counter() - started
        try:
            completion = ChatCompletion.model_validate_json(raw)
        except ValidationError as exc:
            raise BackendError(
                f"{self.id}: response from {self.base_url} is not a chat completion: {exc}"
            ) from exc
        reported = response_of(completion)
        return self._answer(
            request,
            reported,
            usage_missing=completion.usage is None,
            output_tokens=-(-len(reported.text) // 4),
            upstream=completion.shoal,
            latency=latency,
            ttft=latency,
        )

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        session, slots = self._bind()
        body = self._body(request, stream=True)
        await self._admit(slots)
        started = time.perf_counter()
        reader = ChunkReader()
        ttft: float | None = None
        try:
            # The timeout bounds the wait for the upstream (headers, then each event), never
            # the time the consumer spends between events.
            async with asyncio.timeout(self.timeout_s):
                response = await self._post(session, body)
            async with response, contextlib.aclosing(self._chunks(response)) as chunks:
                while True:
                    async with asyncio.timeout(self.timeout_s):
                        chunk = await anext(chunks, None)
                    if chunk is None:
                        break
                    for delta in reader.read(chunk):
                        ttft = ttft if ttft is not None else time.perf_counter() - started
                        yield delta
        except TimeoutError as exc:
            raise BackendTimeoutError(f"{self.id}: no answer within {self.timeout_s} s") from exc
        except aiohttp.ClientError as exc:
            raise BackendError(f"{self.id}: stream from {self.base_url} broke: {exc}") from exc
        finally:
            slots.release()
        latency = time.perf_counter() - started
        yield Completed(
            response=self._answer(
                request,
                reader.response(),
                usage_missing=reader.usage is None,
                output_tokens=reader.deltas,
                upstream=reader.shoal,
                latency=latency,
                ttft=ttft,
            )
        )

    async def _chunks(
        self, response: aiohttp.ClientResponse
    ) -> AsyncGenerator[ChatCompletionChunk, None]:
        """The chunks of an OpenAI stream, up to `[DONE]`; an error event raises."""
        decoder = SSEDecoder()
        async for data in response.content.iter_any():
            for event in decoder.feed(data):
                if event.event == "error":
                    message = error_message(event.data)
                    raise BackendError(f"{self.id}: upstream error in stream: {message}")
                if event.event != "message":
                    log.debug("%s: skipped a stream event of type %r", self.id, event.event)
                    continue
                if event.data == STREAM_DONE:
                    return
                try:
                    chunk = read_chunk(event.data)
                except ValueError as exc:
                    raise BackendError(
                        f"{self.id}: malformed event in stream: {event.data[:200]!r}"
                    ) from exc
                yield chunk
        raise BackendError(f"{self.id}: the stream ended before [DONE]")

    def _answer(
        self,
        request: ChatRequest,
        reported: ChatResponse,
        *,
        usage_missing: bool,
        output_tokens: int,
        upstream: ShoalInfo | None,
        latency: float,
        ttft: float | None,
    ) -> ChatResponse:
        """The response to `request` from what the upstream reported, timed and costed here."""
        usage = reported.usage
        if usage_missing:
            log.warning("%s: the answer carried no usage; token counts are estimated", self.id)
            usage = Usage(input_tokens=estimate_tokens(request).input, output_tokens=output_tokens)
        if upstream is not None and _unpriced(self.card):
            cost = whole_pico(upstream.cost_usd)
        else:
            cost = self.card.cost(usage, latency)
        response = reported.model_copy(
            update={
                "model": self.id,
                "usage": usage,
                "latency_s": latency,
                "compute_s": latency,
                "ttft_s": ttft,
                "cost_usd": cost,
                "logprobs": (reported.logprobs or ()) if request.logprobs else None,
            }
        )
        if request.wants_json:
            check_json(request, response)
        return response


def _unpriced(card: ModelCard) -> bool:
    """Whether a card has no token price of its own (an upstream shoal prices its own calls)."""
    price = card.price
    return isinstance(price, TokenPrice) and price.input_per_mtok == price.output_per_mtok == 0


def _abandon(session: aiohttp.ClientSession) -> None:
    """Drop a session whose event loop is gone (a second `asyncio.run`, say) without warnings.

    Its connections belong to the old loop and cannot be closed from this one; the OS reclaims
    their sockets when the transports are collected.
    """
    connector = session.connector
    session.detach()
    if connector is not None:
        # `close()` is a coroutine for the connector's own loop; `_close()` (aiohttp 3.14, pinned)
        # does the same work synchronously and copes with a closed loop.
        with contextlib.suppress(RuntimeError):
            connector._close()


@dataclass(frozen=True)
class ServerSentEvent:
    """One event of a stream: its type ("message" unless named) and its data."""

    event: str
    data: str


_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"
MAX_EVENT_BYTES = 16 << 20
"""The most one server-sent event (or one line of it) may hold."""


class SSEDecoder:
    """Server-sent events from a stream of bytes, parsed as the HTML standard says.

    Lines end at CRLF, LF or CR, wherever the bytes are split. A blank line ends an event; its
    `data:` lines are joined with "\n"; `event:` names it ("message" when not named); a line
    starting with ":" is a comment. An event without data is not dispatched, nor one the stream
    ends in the middle of. `id:` and `retry:` serve reconnection, which a call never does, and
    are ignored. Bytes that are not UTF-8 raise `BackendError` (an answer is never garbled), as
    does an event over `MAX_EVENT_BYTES`.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._after_cr = False
        self._first = True
        self._event = ""
        self._data: list[str] = []
        self._size = 0

    def feed(self, data: bytes) -> list[ServerSentEvent]:
        """The events that `data`, the next bytes of the stream, completes."""
        if not data:
            return []
        if self._after_cr and data.startswith(b"\n"):
            data = data[1:]  # the LF of a CRLF split across two reads
        self._buffer += data
        events: list[ServerSentEvent] = []
        start = 0
        for end in _LINE_END.finditer(self._buffer):
            event = self._line(self._buffer[start : end.start()])
            start = end.end()
            if event is not None:
                events.append(event)
        self._after_cr = self._buffer.endswith(b"\r") and start == len(self._buffer)
        self._buffer = self._buffer[start:]
        if len(self._buffer) + self._size > MAX_EVENT_BYTES:
            raise BackendError(f"a stream event is over {MAX_EVENT_BYTES} bytes")
        return events

    def _line(self, raw: bytes) -> ServerSentEvent | None:
        if self._first:
            raw = raw.removeprefix(_BOM)
            self._first = False
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BackendError(f"the stream is not UTF-8: {raw[:200]!r}") from exc
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._size += len(raw)
        elif name == "event":
            self._event = value
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        data, event = self._data, self._event or "message"
        self._data, self._event, self._size = [], "", 0
        if not data:
            return None
        return ServerSentEvent(event=event, data="\n".join(data))
