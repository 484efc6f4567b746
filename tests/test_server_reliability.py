"""The server under stress, over real loopback sockets: budgets under concurrency, an upstream
that dies mid-stream, clients that walk away, generated inputs (schemathesis), and 100 clients
at once against a fast fake upstream. Every loop here is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import psutil  # type: ignore[import-untyped]
import pytest
import schemathesis
from conftest import free_port
from hypothesis import HealthCheck, given, settings
from openai.types.chat import ChatCompletionMessageParam
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from server_support import DYING, fake_upstream, make_key, serving

from shoal import FakeModel, Fleet, FunctionModel, TokenPrice
from shoal.cards import estimate_tokens
from shoal.engine import Engine
from shoal.ledger import to_pico
from shoal.messages import ChatRequest, ChatResponse, Completed, StreamEvent, TextDelta, Usage
from shoal.models.fake import fake_card
from shoal.routing.base import RoutedModel
from shoal.routing.policies import FixedRouter
from shoal.server import create_app
from shoal.server.openapi import openapi_spec
from shoal.server.state import ServerState
from shoal.settings import FleetSettings, OpenAIModelSpec, ServerSettings

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there shoal"}]
CENT_A_TOKEN = TokenPrice(input_per_mtok=0.0, output_per_mtok=10_000.0)
UPSTREAM_PRICE = TokenPrice(input_per_mtok=1.0, output_per_mtok=2.0)


class SlowStream(FunctionModel):
    """Streams one word every 20 ms for ten seconds; says when its stream was closed."""

    def __init__(self) -> None:
        super().__init__(lambda r: "", model_id="slow-stream")
        self.closed_flag = False

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        try:
            for _ in range(500):
                yield TextDelta(text="word ")
                await asyncio.sleep(0.02)
            response = ChatResponse(
                model=self.id, text="", finish_reason="stop", usage=Usage(), latency_s=10.0
            )
            yield Completed(response=response)
        finally:
            self.closed_flag = True


def upstream_fleet(url: str) -> Fleet:
    def spec(model_id: str, upstream: str) -> OpenAIModelSpec:
        return OpenAIModelSpec(
            kind="openai",
            id=model_id,
            base_url=url,
            model=upstream,
            price=UPSTREAM_PRICE,
            context=4096,
            timeout_s=5.0,
        )

    models = (spec("upstream", "fast"), spec("upstream-dying", DYING))
    return Fleet(FleetSettings(include_default=False, models=models))


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with fake_upstream() as url:
        yield url


@pytest.fixture(scope="module")
def slow_stream() -> SlowStream:
    return SlowStream()


@pytest.fixture(scope="module")
def engine(
    upstream: str, slow_stream: SlowStream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Engine]:
    traces = tmp_path_factory.mktemp("traces") / "traces.sqlite"
    engine = Engine(upstream_fleet(upstream), trace_path=traces)
    engine.add_route(
        "priced",
        FunctionModel(lambda r: "a b c d", model_id="priced", price=CENT_A_TOKEN, delay_s=0.05),
    )
    engine.add_route("slow-stream", slow_stream)
    engine.add_route("slow-call", FunctionModel(lambda r: "late", model_id="slow-call", delay_s=10))
    engine.add_route("echo", FakeModel())
    upstream_model = engine.fleet.model("upstream")
    engine.add_route("routed", RoutedModel("routed", FixedRouter("upstream"), [upstream_model]))
    yield engine
    asyncio.run(engine.aclose())


def spent(state: ServerState, name: str) -> tuple[int, int]:
    """A key's settled spend (picodollars) and count of settled requests, as the server wrote
    them to its keys file."""
    assert state.keys is not None
    record = state.keys.record(name)
    assert record is not None
    return round(record.spent_usd * 1e12), record.requests


@pytest.fixture(scope="module")
def app_and_url(engine: Engine, keys_path: Path) -> Iterator[tuple[Any, str]]:
    # The server closes the engine when it stops: its upstream connections belong to its loop.
    app = create_app(engine, ServerSettings(keys_path=keys_path), close_engine=True)
    with serving(app) as url:
        yield app, url


@pytest.fixture(scope="module")
def base_url(app_and_url: tuple[Any, str]) -> str:
    return app_and_url[1]


@pytest.fixture(scope="module")
def state(app_and_url: tuple[Any, str]) -> ServerState:
    state = app_and_url[0].state.shoal
    assert isinstance(state, ServerState)
    return state


async def eventually(condition: Any, timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# -- budgets under concurrency ---------------------------------------------------------------


async def test_64_concurrent_requests_never_overspend_a_key(
    base_url: str, keys_path: Path, engine: Engine, state: ServerState
) -> None:
    # Each call may cost (and costs) 4 output tokens at a cent each: $1.00 pays for 25.
    key = make_key(keys_path, "crowd", budget=1.0)
    statuses: list[int] = []
    costs: list[float] = []

    async with openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0) as client:

        async def one(i: int) -> None:
            try:
                if i % 2:
                    chunks = [
                        c
                        async for c in await client.chat.completions.create(
                            model="priced",
                            messages=USER,
                            max_tokens=4,
                            stream=True,
                            stream_options={"include_usage": True},
                        )
                    ]
                    costs.append(chunks[-1].model_extra["shoal"]["cost_usd"])  # type: ignore[index]
                else:
                    reply = await client.chat.completions.with_raw_response.create(
                        model="priced", messages=USER, max_tokens=4
                    )
                    costs.append(float(reply.headers["x-shoal-cost-usd"]))
                statuses.append(200)
            except openai.APIStatusError as exc:
                statuses.append(exc.status_code)

        await asyncio.gather(*(one(i) for i in range(64)))

    assert len(statuses) == 64
    assert statuses.count(200) == 25
    assert set(statuses) <= {200, 402, 429}
    settled, requests = spent(state, "crowd")
    assert requests == 25
    assert settled == sum(to_pico(c) for c in costs) == to_pico(1.0)
    traced = [c for c in engine.traces.calls() if c.model == "priced" and c.status == "ok"]
    assert sum(to_pico(c.cost_usd) for c in traced[-25:]) == settled


def test_a_route_reserves_and_is_charged_what_its_models_cost(
    base_url: str, keys_path: Path, state: ServerState
) -> None:
    # The route's own card prices nothing; its answers are costed by the model that gave them.
    key = make_key(keys_path, "routed", budget=1.0)
    with openai.OpenAI(base_url=base_url, api_key=key, max_retries=0) as client:
        reply = client.chat.completions.with_raw_response.create(
            model="routed", messages=USER, max_tokens=16
        )
    cost = float(reply.headers["x-shoal-cost-usd"])
    assert json.loads(reply.headers["x-shoal-route"])["models"] == ["upstream"]
    assert cost == pytest.approx((5 * 1.0 + 5 * 2.0) / 1e6)
    assert spent(state, "routed") == (to_pico(cost), 1)
    assert state.keys is not None
    assert state.keys.overrun_pusd == 0
    # A budget below what the route's models may cost is refused before the call.
    poor = make_key(keys_path, "routed-poor", budget=1e-6)
    with (
        openai.OpenAI(base_url=base_url, api_key=poor, max_retries=0) as client,
        pytest.raises(openai.APIStatusError) as caught,
    ):
        client.chat.completions.create(model="routed", messages=USER, max_tokens=16)
    assert caught.value.status_code == 402


# -- failures mid-way ------------------------------------------------------------------------


def test_upstream_dying_mid_stream_is_a_clean_error_event_and_is_accounted(
    base_url: str, keys_path: Path, engine: Engine, state: ServerState
) -> None:
    key = make_key(keys_path, "dying", budget=1.0)
    received: list[str] = []
    with openai.OpenAI(base_url=base_url, api_key=key, max_retries=0) as client:
        stream = client.chat.completions.create(model="upstream-dying", messages=USER, stream=True)
        with pytest.raises(openai.APIError) as caught:
            for chunk in stream:
                received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "hello from"
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "upstream_error"
    # Charged what it delivered: the prompt (as the card estimates it) and two streamed tokens.
    prompt_tokens = estimate_tokens(ChatRequest.of("hello there shoal")).input
    expected = (
        prompt_tokens * UPSTREAM_PRICE.input_per_mtok + 2 * UPSTREAM_PRICE.output_per_mtok
    ) / 1e6
    assert spent(state, "dying") == (to_pico(expected), 1)
    last = engine.traces.calls()[-1]
    assert (last.model, last.status) == ("upstream-dying", "error")
    failed = {"name": "upstream-dying", "route": "", "model": "", "status": "upstream_error"}
    assert state.metrics.sample("shoal_requests_total", **failed) == 1
    assert state.metrics.in_flight == 0


async def test_client_leaving_a_stream_closes_the_generation(
    base_url: str, keys_path: Path, slow_stream: SlowStream, engine: Engine, state: ServerState
) -> None:
    key = make_key(keys_path, "leaver", budget=1.0)
    body = {"model": "slow-stream", "messages": USER, "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{base_url}/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
        ) as reply,
    ):
        assert reply.status == 200
        first = await reply.content.readline()
        assert first.startswith(b"data: ")
    await eventually(lambda: slow_stream.closed_flag)
    await eventually(
        lambda: any(
            c.route == "slow-stream" and c.status == "cancelled" for c in engine.traces.calls()
        )
    )
    await eventually(lambda: spent(state, "leaver")[1] == 1)
    assert state.metrics.in_flight == 0


async def test_client_leaving_a_call_cancels_it(
    base_url: str, keys_path: Path, engine: Engine, state: ServerState
) -> None:
    key = make_key(keys_path, "impatient", budget=1.0)
    body = {"model": "slow-call", "messages": USER}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as session:
        with pytest.raises(TimeoutError):
            await session.post(
                f"{base_url}/chat/completions",
                json=body,
                headers={"authorization": f"Bearer {key}"},
            )
    await eventually(
        lambda: any(
            c.route == "slow-call" and c.status == "cancelled" for c in engine.traces.calls()
        )
    )
    await eventually(lambda: spent(state, "impatient")[1] == 1)
    assert state.metrics.in_flight == 0


def test_partial_cost_of_a_host_priced_model_is_its_time() -> None:
    card = fake_card("local")
    cost = card.partial_cost(ChatRequest.of("hi"), delivered=3, seconds=3600.0)
    assert cost == pytest.approx(card.price.per_hour)  # type: ignore[union-attr]


# -- generated inputs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_key(keys_path: Path) -> str:
    return make_key(keys_path, "fuzz")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_generated_input_gets_a_server_error(
    base_url: str, fuzz_key: str, mode: GenerationMode
) -> None:
    spec = openapi_spec(names=["echo"], auth=True)
    # Generated requests call the fake route (a random model name is only ever a 404).
    request_schema = spec["components"]["schemas"]["ChatCompletionRequest"]
    request_schema["properties"]["model"] = {"type": "string", "enum": ["echo"]}
    gateway = schemathesis.openapi.from_dict(spec)
    headers = {"authorization": f"Bearer {fuzz_key}"}
    root = base_url.removesuffix("/v1")
    for result in gateway.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]
        if mode is GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # nothing to break in a request without parameters

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None
        )
        def call(case: Any) -> None:
            case.call_and_validate(
                base_url=root, headers=headers, checks=[not_a_server_error], timeout=10
            )

        call()


# -- many clients at once --------------------------------------------------------------------


def _serve(upstream: str, tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    fleet = tmp / "fleet.yaml"
    fleet.write_text(
        json.dumps(
            {
                "include_default": False,
                "cache_dir": str(tmp / "cache"),
                "models": [
                    {
                        "id": "upstream",
                        "kind": "openai",
                        "base_url": upstream,
                        "price": UPSTREAM_PRICE.model_dump(exclude={"kind"}),
                        "context": 4096,
                    }
                ],
            }
        )
    )
    port = free_port()
    command = [sys.executable, "-m", "shoal.cli.main", "serve", "--fleet", str(fleet)]
    command += ["--port", str(port), "--no-auth", "--traces", str(tmp / "traces.sqlite")]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    return process, f"http://127.0.0.1:{port}/v1"


async def _load(upstream: str, tmp: Path, seconds: float, clients: int = 100) -> None:
    process, base_url = _serve(upstream, tmp)
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=clients),
            timeout=aiohttp.ClientTimeout(total=30),
        ) as session:
            deadline = time.monotonic() + 20
            while True:
                try:
                    async with session.get(f"{base_url.removesuffix('/v1')}/healthz") as reply:
                        if reply.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                assert process.poll() is None, (
                    process.stderr.read().decode() if process.stderr else ""
                )
                assert time.monotonic() < deadline, "shoal serve did not start"
                await asyncio.sleep(0.1)
            server = psutil.Process(process.pid)
            errors: list[str] = []
            done = 0
            stop = time.monotonic() + seconds

            async def client(i: int) -> None:
                nonlocal done
                n = 0
                while time.monotonic() < stop:
                    stream = (i + n) % 4 == 0
                    body = {
                        "model": "upstream",
                        "messages": USER,
                        "max_tokens": 16,
                        "stream": stream,
                    }
                    async with session.post(f"{base_url}/chat/completions", json=body) as reply:
                        data = await reply.read()
                        if reply.status != 200 or (
                            stream and not data.endswith(b"data: [DONE]\n\n")
                        ):
                            errors.append(f"{reply.status}: {data[:200]!r}")
                    n += 1
                    done += 1

            async def sample(memory: list[float]) -> None:
                while time.monotonic() < stop:
                    memory.append(server.memory_info().rss / 2**20)
                    await asyncio.sleep(0.25)

            memory: list[float] = []
            await asyncio.gather(sample(memory), *(client(i) for i in range(clients)))
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()
    assert errors == []
    assert done >= clients * 2, f"only {done} requests in {seconds} s"
    # Flat: after the first second of warm-up, resident memory grows by less than 25 MB.
    warm = memory[len(memory) // 5 :]
    assert max(warm) - statistics.median(warm[:4]) < 25, f"RSS MB over time: {memory}"


async def test_100_concurrent_clients_briefly(upstream: str, tmp_path: Path) -> None:
    await _load(upstream, tmp_path, seconds=5.0)


@pytest.mark.slow
async def test_100_concurrent_clients_for_30_seconds(upstream: str, tmp_path: Path) -> None:
    await _load(upstream, tmp_path, seconds=30.0)


async def test_a_stream_whose_client_left_before_its_first_byte_still_ends_its_call() -> None:
    # The ASGI server's first send yields to the loop and the client is gone by then: the
    # response's body never starts, and the call must still be closed, charged and counted.
    model = SlowStream()
    engine = Engine(upstream_fleet("http://127.0.0.1:9"), trace_path=":memory:")
    engine.add_route("slow-stream", model)
    app = create_app(engine, ServerSettings(auth=False), pipelines={})
    state: ServerState = app.state.shoal
    body = json.dumps({"model": "slow-stream", "messages": USER, "stream": True}).encode()
    started = asyncio.Event()
    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": body, "more_body": False}
        if not started.is_set():  # still waiting for the first event: the client is there
            await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            started.set()
            await asyncio.sleep(0.01)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
        "app": app,
    }
    await app(scope, receive, send)
    await eventually(lambda: model.closed_flag)
    assert [c.status for c in engine.traces.calls()] == ["cancelled"]
    assert state.metrics.in_flight == 0
    await engine.aclose()


async def test_a_stream_cancelled_before_the_engine_starts_gives_its_hold_back(
    engine: Engine,
) -> None:
    from shoal.ledger import Account
    from shoal.server.routes import Call

    app = create_app(engine, ServerSettings(auth=False), pipelines={})
    state: ServerState = app.state.shoal
    plan = await engine.plan("echo", ChatRequest.of("hi", max_tokens=4))
    account = Account.usd("key 'k'", 1.0)
    call = Call(state, plan, account.reserve(plan.worst_usd))
    call.begin()
    engine.stream(plan, hold=call.hold)  # made, never started: the client left at once
    call.end("cancelled")
    assert (account.held_pusd, account.spent_pusd) == (0, 0)
    assert state.metrics.in_flight == 0
