"""Any OpenAI-compatible `/v1/chat/completions` endpoint (OpenAI, vLLM, Ollama, llama.cpp's
server, another shoal), over async HTTP with streaming, timeouts and bounded concurrency.

OpenAI's field names live here and nowhere below the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import aiohttp

from shoal.cards import ModelCard
from shoal.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    ConfigError,
    OverloadedError,
    UpstreamHTTPError,
)
from shoal.messages import (
    ChatRequest,
    ChatResponse,
    Completed,
    FinishReason,
    StreamEvent,
    TextDelta,
    TokenLogprob,
    Usage,
)
from shoal.models.base import Model
from shoal.models.output import check_json

log = logging.getLogger(__name__)

JsonSchemaStyle = Literal["openai", "llama_cpp"]


def request_body(
    request: ChatRequest, model: str, *, stream: bool, schema_style: JsonSchemaStyle = "openai"
) -> dict[str, Any]:
    """Translate a `ChatRequest` into an OpenAI chat-completions body."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": m.role, "content": m.content} for m in request.messages],
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "stream": stream,
    }
    if request.stop:
        body["stop"] = list(request.stop)
    if request.seed is not None:
        body["seed"] = request.seed
    if request.logprobs:
        body["logprobs"] = True
        if request.top_logprobs:
            body["top_logprobs"] = request.top_logprobs
    if request.json_schema is not None:
        if schema_style == "llama_cpp":
            # llama.cpp's server ignores `json_schema`; it constrains with this form instead.
            body["response_format"] = {"type": "json_object", "schema": request.json_schema}
        else:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": request.json_schema, "strict": True},
            }
    elif request.json_object:
        body["response_format"] = {"type": "json_object"}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def parse_logprobs(data: Any) -> tuple[TokenLogprob, ...]:
    if not isinstance(data, dict) or not data.get("content"):
        return ()
    return tuple(
        TokenLogprob(
            token=item["token"],
            logprob=float(item["logprob"]),
            top=tuple((t["token"], float(t["logprob"])) for t in item.get("top_logprobs") or ()),
        )
        for item in data["content"]
    )


def _finish(value: Any) -> FinishReason:
    return "length" if value == "length" else "stop"


def _usage(data: Any) -> Usage | None:
    if not isinstance(data, dict):
        return None
    return Usage(
        input_tokens=int(data.get("prompt_tokens") or 0),
        output_tokens=int(data.get("completion_tokens") or 0),
    )


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
            raise UpstreamHTTPError(response.status, _error_message(text))
        return response

    # -- calls -------------------------------------------------------------------------------

    async def generate(self, request: ChatRequest) -> ChatResponse:
        session, slots = self._bind()
        body = request_body(
            request, self.upstream_model, stream=False, schema_style=self.schema_style
        )
        await self._admit(slots)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                response = await self._post(session, body)
                async with response:
                    data = await response.json(content_type=None)
        except TimeoutError as exc:
            raise BackendTimeoutError(f"{self.id}: no answer within {self.timeout_s} s") from exc
        except (aiohttp.ClientError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BackendError(f"{self.id}: broken response from {self.base_url}: {exc}") from exc
        finally:
            slots.release()
        latency = time.perf_counter() - started
        try:
            choice = data["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise BackendError(f"{self.id}: response has no choices[0].message") from exc
        finish = _finish(choice.get("finish_reason"))
        usage = _usage(data.get("usage")) or Usage()
        response = ChatResponse(
            model=self.id,
            text=text,
            finish_reason=finish,
            usage=usage,
            latency_s=latency,
            compute_s=latency,
            ttft_s=latency,
            cost_usd=self.card.cost(usage, latency),
            logprobs=parse_logprobs(choice.get("logprobs")) if request.logprobs else None,
        )
        if request.wants_json:
            check_json(request, response)
        return response

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        session, slots = self._bind()
        body = request_body(
            request, self.upstream_model, stream=True, schema_style=self.schema_style
        )
        await self._admit(slots)
        started = time.perf_counter()
        parts: list[str] = []
        logprobs: list[TokenLogprob] = []
        ttft: float | None = None
        finish: FinishReason = "stop"
        usage: Usage | None = None
        chunks = 0
        try:
            # The timeout bounds the wait for the upstream (headers, then each event), never
            # the time the consumer spends between events.
            async with asyncio.timeout(self.timeout_s):
                response = await self._post(session, body)
            async with response:
                events = _sse_events(response)
                while True:
                    async with asyncio.timeout(self.timeout_s):
                        data = await anext(events, None)
                    if data is None:
                        break
                    if (found := _usage(data.get("usage"))) is not None:
                        usage = found
                    for choice in data.get("choices") or ():
                        delta = (choice.get("delta") or {}).get("content") or ""
                        pieces = parse_logprobs(choice.get("logprobs"))
                        if choice.get("finish_reason"):
                            finish = _finish(choice["finish_reason"])
                        if delta or pieces:
                            chunks += 1
                            ttft = ttft if ttft is not None else time.perf_counter() - started
                            parts.append(delta)
                            logprobs.extend(pieces)
                            yield TextDelta(text=delta, logprobs=pieces)
        except TimeoutError as exc:
            raise BackendTimeoutError(f"{self.id}: no answer within {self.timeout_s} s") from exc
        except aiohttp.ClientError as exc:
            raise BackendError(f"{self.id}: stream from {self.base_url} broke: {exc}") from exc
        finally:
            slots.release()
        latency = time.perf_counter() - started
        text = "".join(parts)
        estimated = usage is None
        if usage is None:
            # The upstream ignored stream_options.include_usage: count one token per content
            # chunk (how OpenAI-compatible servers stream) and ~4 characters per prompt token.
            log.warning("%s: stream carried no usage; token counts are estimated", self.id)
            prompt_chars = sum(len(m.content) for m in request.messages)
            usage = Usage(input_tokens=-(-prompt_chars // 4), output_tokens=chunks)
        response = ChatResponse(
            model=self.id,
            text=text,
            finish_reason=finish,
            usage=usage,
            latency_s=latency,
            compute_s=latency,
            ttft_s=ttft,
            cost_usd=self.card.cost(usage, latency),
            logprobs=tuple(logprobs) if request.logprobs else None,
            usage_estimated=estimated,
        )
        if request.wants_json:
            check_json(request, response)
        yield Completed(response=response)


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


async def _sse_events(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON payloads of a server-sent event stream, up to `[DONE]`."""
    saw_done = False
    async for raw in response.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        payload = line[5:].strip()
        if payload == b"[DONE]":
            saw_done = True
            break
        try:
            data = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BackendError(f"malformed event in stream: {payload[:200]!r}") from exc
        if isinstance(data, dict) and "error" in data:
            raise BackendError(f"upstream error in stream: {_error_message(json.dumps(data))}")
        if isinstance(data, dict):
            yield data
    if not saw_done:
        raise BackendError("the stream ended before [DONE]")


def _error_message(text: str) -> str:
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return text[:500]
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])[:500]
        if isinstance(error, str):
            return error[:500]
    return text[:500]
