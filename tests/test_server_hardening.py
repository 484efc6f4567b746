"""The server under hostile or heavy use, over a real socket: no request stalls the others, every
call is charged what it cost (plain, streamed, truncated, failed, cancelled), a stream's headers
leave at once, and the compiled-grammar cache stays bounded."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from server_support import make_key, serving

from shoal import ChatRequest, ChatResponse, Fleet, FunctionModel, TokenPrice
from shoal.cli.serve import quiet_garbage_collector
from shoal.engine import Engine
from shoal.errors import BackendError, OutputTruncatedError
from shoal.messages import Completed, StreamEvent, TextDelta
from shoal.money import to_pico
from shoal.server import create_app
from shoal.server.keys import KeyStore
from shoal.settings import ServerSettings

PRICE = TokenPrice(input_per_mtok=10.0, output_per_mtok=30.0)
DEFAULT_THRESHOLDS = gc.get_threshold()


def big_schema(properties: int) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            f"field_{i}": {"type": "string", "description": "a property of a large schema"}
            for i in range(properties)
        },
    }


class Truncating(FunctionModel):
    """Answers JSON cut short by max_tokens: the work is done and paid for, the answer is not."""

    def __init__(self) -> None:
        super().__init__(lambda r: '{"a": "b', model_id="truncating", price=PRICE)

    async def generate(self, request: ChatRequest) -> ChatResponse:
        response = await super().generate(request)
        raise OutputTruncatedError("cut short", text=response.text, response=response)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        response = await super().generate(request)
        yield TextDelta(text=response.text)
        raise OutputTruncatedError("cut short", text=response.text, response=response)


class Slow(FunctionModel):
    """Says nothing for `wait_s`, then streams its answer (a prompt being evaluated)."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(lambda r: "late but here", model_id="slow", price=PRICE)
        self.wait_s = wait_s

    async def generate(self, request: ChatRequest) -> ChatResponse:
        await asyncio.sleep(self.wait_s)
        return await super().generate(request)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        response = await self.generate(request)
        yield TextDelta(text=response.text)
        yield Completed(response=response)


def broken(request: ChatRequest) -> str:
    raise BackendError("the backend fell over")


@pytest.fixture
def keys_path(tmp_path: Path) -> Path:
    return tmp_path / "keys.sqlite"


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = Engine(Fleet(), trace_path=tmp_path / "traces.sqlite")
    engine.add_route("words", FunctionModel(lambda r: "five words of an answer", price=PRICE))
    engine.add_route("truncating", Truncating())
    engine.add_route("broken", FunctionModel(broken, model_id="broken", price=PRICE))
    engine.add_route("slow", Slow(wait_s=1.5))
    yield engine
    asyncio.run(engine.aclose())


@pytest.fixture
def url(engine: Engine, keys_path: Path) -> Iterator[str]:
    app = create_app(engine, ServerSettings(keys_path=keys_path), pipelines={})
    with serving(app) as base:
        yield base


def chat(model: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi there"}], **fields}


async def post(
    session: aiohttp.ClientSession, url: str, key: str, body: dict[str, Any] | bytes
) -> tuple[int, bytes]:
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post(f"{url}/chat/completions", data=data, headers=headers) as reply:
        return reply.status, await reply.read()


@pytest.fixture
def quiet_collector() -> Iterator[None]:
    """As `shoal serve` does: what the process holds already is frozen out of collections (in
    a test process, that is every earlier test's objects, whose full collection takes ~0.1 s)."""
    quiet_garbage_collector()
    yield
    gc.unfreeze()
    gc.set_threshold(*DEFAULT_THRESHOLDS)


async def test_huge_schemas_from_refused_keys_never_stall_the_server(
    url: str, keys_path: Path, quiet_collector: None
) -> None:
    limited = make_key(keys_path, "limited", rpm=1)
    empty = make_key(keys_path, "empty", budget=1e-12)
    rich = make_key(keys_path, "rich", budget=1.0)
    schema = big_schema(12_000)
    huge = chat(
        "words",
        response_format={"type": "json_schema", "json_schema": {"name": "big", "schema": schema}},
    )
    huge_body = json.dumps(huge).encode()  # encoded once: the client does no work meanwhile
    assert len(huge_body) > 700_000
    root = url.removesuffix("/v1")
    async with aiohttp.ClientSession() as session:
        assert (await post(session, url, limited, chat("words")))[0] == 200
        worst = 0.0
        stop = False

        async def probe() -> None:
            nonlocal worst
            while not stop:
                started = time.perf_counter()
                async with session.get(f"{root}/healthz") as reply:
                    assert reply.status == 200
                worst = max(worst, time.perf_counter() - started)
                await asyncio.sleep(0.005)

        prober = asyncio.ensure_future(probe())
        replies = await asyncio.gather(
            post(session, url, limited, huge_body),
            post(session, url, empty, huge_body),
            post(session, url, rich, huge_body),
            post(session, url, limited, huge_body),
        )
        stop = True
        await prober
    statuses = [status for status, _ in replies]
    assert statuses == [429, 402, 400, 429]
    assert b"json_schema" in replies[2][1]  # over the schema size limit: names the field
    assert worst < 0.05, f"/healthz waited {worst * 1000:.0f} ms"


async def test_every_call_is_charged_what_its_trace_says(
    url: str, keys_path: Path, engine: Engine
) -> None:
    key = make_key(keys_path, "ledger", budget=1.0)
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    json_format = {"type": "json_schema", "json_schema": {"name": "o", "schema": schema}}
    async with aiohttp.ClientSession() as session:
        for model in ("words", "truncating", "broken", "slow"):
            for stream in (False, True):
                body = chat(model, stream=stream, response_format=json_format)
                if model == "slow":  # cancelled: the client leaves while the model works
                    with pytest.raises(asyncio.TimeoutError):
                        await asyncio.wait_for(post(session, url, key, body), 0.3)
                else:
                    await post(session, url, key, body)
    await asyncio.sleep(1.5)  # the cancelled calls settle as they unwind
    store = KeyStore(keys_path)
    try:
        record = store.record("ledger")
    finally:
        store.close()
    assert record is not None
    traced = engine.traces.calls()
    by_model = {c.model for c in traced}
    assert {"truncating", "broken"} <= by_model
    charged = sum(to_pico(c.cost_usd) for c in traced)
    assert charged > 0
    assert to_pico(record.spent_usd) == charged
    truncated = [c for c in traced if c.model == "truncating"]
    assert all(c.cost_usd > 0 for c in truncated)  # paid for, though not answered


async def test_a_stream_sends_its_headers_and_keep_alives_before_the_first_token(
    url: str, keys_path: Path
) -> None:
    key = make_key(keys_path, "patient", budget=1.0)
    headers = {"authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession() as session:
        started = time.perf_counter()
        async with session.post(
            f"{url}/chat/completions", json=chat("slow", stream=True), headers=headers
        ) as reply:
            assert reply.status == 200
            assert time.perf_counter() - started < 0.5  # headers at once, not after 1.5 s
            first = await reply.content.readline()
            assert first.startswith(b":")  # a comment: the connection is alive
            body = await reply.read()
    assert b"late but here" in body
    assert body.rstrip().endswith(b"data: [DONE]")


def test_keep_alive_comments_are_ignored_by_the_openai_client(url: str, keys_path: Path) -> None:
    import openai

    key = make_key(keys_path, "client", budget=1.0)
    with openai.OpenAI(base_url=url, api_key=key, max_retries=0) as client:
        chunks = list(
            client.chat.completions.create(
                model="slow",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
            )
        )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        "late but here"
    )
