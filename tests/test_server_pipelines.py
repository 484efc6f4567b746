"""Pipeline runs over a real socket: start, poll, follow the events, and every refusal (unknown
pipeline or run, bad inputs, a budget the key cannot cover, too many runs at once).

The pipeline's model steps are `FunctionModel` stand-ins served as routes: fast and
deterministic.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from multidict import CIMultiDict
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from server_support import make_key, serving, shout, shout_pipeline
from starlette.applications import Starlette

from shoal import FunctionModel, TokenPrice
from shoal.engine import Engine
from shoal.errors import UnknownPipelineError
from shoal.ledger import to_pico
from shoal.pipeline.graph import ModelStep, Pipeline
from shoal.server import create_app
from shoal.server.keys import KeyStore
from shoal.server.openapi import openapi_spec
from shoal.server.state import ServerState
from shoal.settings import ServerSettings

PRICE = TokenPrice(input_per_mtok=1.0, output_per_mtok=2.0)
BUDGET = 0.01


def slow_pipeline() -> Pipeline:
    return Pipeline(
        "slow",
        inputs=["text"],
        output="late",
        steps=[ModelStep("late", model="sleeper", prompt="{text}", inputs=("text",))],
    )


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    traces = tmp_path_factory.mktemp("traces") / "traces.sqlite"
    engine = Engine(trace_path=traces)
    engine.add_route("shouter", FunctionModel(shout, model_id="shouter", price=PRICE))
    engine.add_route(
        "sleeper", FunctionModel(lambda r: "late", model_id="sleeper", price=PRICE, delay_s=30)
    )
    yield engine
    asyncio.run(engine.aclose())


@pytest.fixture(scope="module")
def key(keys_path: Path) -> str:
    return make_key(keys_path, "runner", budget=1.0)


@pytest.fixture(scope="module")
def app(engine: Engine, keys_path: Path) -> Starlette:
    pipelines = {"shout": shout_pipeline(), "slow": slow_pipeline()}
    return create_app(engine, ServerSettings(keys_path=keys_path), pipelines=pipelines, max_runs=3)


@pytest.fixture(scope="module")
def root(app: Starlette) -> Iterator[str]:
    with serving(app) as url:
        yield url.removesuffix("/v1")


@pytest.fixture
async def client(root: str, key: str) -> AsyncIterator[aiohttp.ClientSession]:
    headers = {"authorization": f"Bearer {key}"}
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(root, headers=headers, timeout=timeout) as session:
        yield session


class Reply:
    """What came back, read whole."""

    def __init__(self, status: int, headers: CIMultiDict[str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


async def call(
    client: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    body: Any = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    sent = {"content-type": "application/json", **(headers or {})}
    async with client.request(method, url, data=data, headers=sent) as reply:
        return Reply(reply.status, CIMultiDict(reply.headers), await reply.read())


async def start(
    client: aiohttp.ClientSession, body: dict[str, Any], pipeline: str = "shout"
) -> Reply:
    return await call(client, "POST", f"/v1/pipelines/{pipeline}/runs", body=body)


async def wait_done(
    client: aiohttp.ClientSession, run_id: str, pipeline: str = "shout"
) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        reply = await call(client, "GET", f"/v1/pipelines/{pipeline}/runs/{run_id}")
        assert reply.status == 200, reply.body
        info: dict[str, Any] = reply.json()
        if info["status"] != "running":
            return info
        assert time.monotonic() < deadline, "the run did not finish"
        await asyncio.sleep(0.02)


def error_of(reply: Reply, status: int) -> dict[str, Any]:
    assert reply.status == status, reply.body
    error: dict[str, Any] = reply.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    return error


async def test_a_run_starts_at_once_and_finishes_with_its_result(
    client: aiohttp.ClientSession, app: Starlette, engine: Engine
) -> None:
    reply = await start(client, {"inputs": {"text": "hello big world"}, "budget_usd": BUDGET})
    assert reply.status == 202, reply.body
    started = reply.json()
    assert started["pipeline"] == "shout"
    assert started["status"] == "running"
    run_id = started["id"]
    assert reply.headers["location"] == f"/v1/pipelines/shout/runs/{run_id}"
    # Readable at once, before it has had a chance to run.
    assert (await call(client, "GET", f"/v1/pipelines/shout/runs/{run_id}")).status == 200
    info = await wait_done(client, run_id)
    assert info["status"] == "ok"
    result = info["result"]
    assert result["run_id"] == run_id
    assert result["status"] == "ok"
    assert result["output"] == "HELLO!-BIG!-WORLD!"
    assert result["values"]["each"] == ["HELLO!", "BIG!", "WORLD!"]
    assert result["budget_usd"] == BUDGET
    assert 0 < result["cost_usd"] <= BUDGET
    # The run is in the trace store under the same id, and the key paid what it cost.
    record = engine.traces.run(run_id)
    assert record is not None
    assert record.status == "ok"
    assert len(engine.traces.calls(run_id)) == 4
    state: ServerState = app.state.shoal
    assert state.keys is not None
    runner = state.keys.record("runner")
    assert runner is not None
    assert round(runner.spent_usd * 1e12) >= to_pico(result["cost_usd"]) - 1


async def events_of(client: aiohttp.ClientSession, url: str) -> list[dict[str, Any]]:
    events = []
    async with client.get(url) as reply:
        assert reply.status == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        async for line in reply.content:
            if line.startswith(b"data: "):
                events.append(json.loads(line.removeprefix(b"data: ")))
    return events


async def test_the_events_stream_in_order_and_end_with_the_result(
    client: aiohttp.ClientSession,
) -> None:
    reply = await start(client, {"inputs": {"text": "one two"}, "budget_usd": BUDGET})
    run_id = reply.json()["id"]
    url = f"/v1/pipelines/shout/runs/{run_id}/events"
    live = await events_of(client, url)
    kinds = [(e["kind"], e["step"]) for e in live]
    assert kinds == [
        ("step_started", "loud"),
        ("item_done", "loud"),
        ("step_done", "loud"),
        ("step_started", "words"),
        ("item_done", "words"),
        ("step_done", "words"),
        ("step_started", "each"),
        ("item_done", "each"),
        ("item_done", "each"),
        ("step_done", "each"),
        ("step_started", "joined"),
        ("item_done", "joined"),
        ("step_done", "joined"),
        ("run_done", None),
    ]
    last = live[-1]
    assert last["detail"] == {"status": "ok"}
    assert last["result"]["output"] == "ONE!-TWO!"
    assert all(e["result"] is None for e in live[:-1])
    # A finished run replays the same stream.
    assert await events_of(client, url) == live


async def test_unknown_pipeline_is_a_404_listing_the_valid_names(
    client: aiohttp.ClientSession,
) -> None:
    error = error_of(await start(client, {"inputs": {}}, pipeline="nope"), 404)
    assert error["code"] == "pipeline_not_found"
    assert "shout" in error["message"]
    assert "slow" in error["message"]
    error_of(await call(client, "GET", "/v1/pipelines/nope/runs/x"), 404)


async def test_unknown_run_is_a_404(client: aiohttp.ClientSession, keys_path: Path) -> None:
    for url in ("/v1/pipelines/shout/runs/nope", "/v1/pipelines/shout/runs/nope/events"):
        assert error_of(await call(client, "GET", url), 404)["code"] == "run_not_found"
    reply = await start(client, {"inputs": {"text": "mine"}, "budget_usd": BUDGET})
    run_id = reply.json()["id"]
    await wait_done(client, run_id)
    # Another pipeline's path, or another key, does not find it.
    error_of(await call(client, "GET", f"/v1/pipelines/slow/runs/{run_id}"), 404)
    other = make_key(keys_path, "other")
    url = f"/v1/pipelines/shout/runs/{run_id}"
    error_of(await call(client, "GET", url, headers={"authorization": f"Bearer {other}"}), 404)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"", None),
        (b'{"inputs": {}, "budget_usd": 0.01}', "inputs"),
        (b'{"inputs": {"text": "a", "extra": 1}, "budget_usd": 0.01}', "inputs"),
        (b'{"inputs": {"text": "a"}, "budget_usd": 0.01, "model": "x"}', "model"),
        (b'{"inputs": {"text": "a"}, "budget_usd": -1}', "budget_usd"),
        (b'{"inputs": {"text": "a"}}', "budget_usd"),  # required when keys are on
        (b'{"inputs": "text"}', "inputs"),
    ],
)
async def test_bad_bodies_and_inputs_are_400s(
    client: aiohttp.ClientSession, body: bytes, param: str | None
) -> None:
    reply = await call(client, "POST", "/v1/pipelines/shout/runs", raw=body)
    assert error_of(reply, 400)["param"] == param


async def test_no_key_is_a_401(client: aiohttp.ClientSession) -> None:
    body = {"inputs": {"text": "a"}, "budget_usd": BUDGET}
    reply = await call(
        client, "POST", "/v1/pipelines/shout/runs", body=body, headers={"authorization": ""}
    )
    error_of(reply, 401)


async def test_a_budget_over_the_keys_remaining_budget_is_a_402(
    client: aiohttp.ClientSession, keys_path: Path
) -> None:
    poor = make_key(keys_path, "poor", budget=0.001)
    body = {"inputs": {"text": "a"}, "budget_usd": 0.002}
    auth = {"authorization": f"Bearer {poor}"}
    reply = await call(client, "POST", "/v1/pipelines/shout/runs", body=body, headers=auth)
    assert error_of(reply, 402)["code"] == "budget_exceeded"


def test_no_generated_run_request_gets_a_server_error(root: str, key: str, app: Starlette) -> None:
    spec = openapi_spec(names=[], auth=True, pipelines=["shout"])
    paths = spec["paths"]
    spec["paths"] = {path: ops for path, ops in paths.items() if "/pipelines/" in path}
    for ops in spec["paths"].values():
        for op in ops.values():
            op["parameters"][0]["schema"] = {"type": "string", "enum": ["shout"]}
    headers = {"authorization": f"Bearer {key}"}
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        for result in schemathesis.openapi.from_dict(spec).get_all_operations():
            operation = result.ok()  # type: ignore[union-attr]

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=20,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                database=None,
            )
            def call(case: Any) -> None:
                case.call_and_validate(
                    base_url=root, headers=headers, checks=[not_a_server_error], timeout=10
                )

            call()
    state: ServerState = app.state.shoal
    assert state.runs.running <= state.runs.max_runs


async def test_too_many_runs_at_once_is_a_429(
    client: aiohttp.ClientSession, app: Starlette
) -> None:
    state: ServerState = app.state.shoal
    assert state.runs.running == 0
    body = {"inputs": {"text": "zzz"}, "budget_usd": BUDGET}
    ids = [(await start(client, body, pipeline="slow")).json()["id"] for _ in range(3)]
    reply = await start(client, body, pipeline="slow")
    assert error_of(reply, 429)["code"] == "rate_limit_exceeded"
    assert int(reply.headers["retry-after"]) >= 1
    for run_id in ids:
        info = (await call(client, "GET", f"/v1/pipelines/slow/runs/{run_id}")).json()
        assert info["status"] == "running"
    assert state.runs.running == 3


async def test_runs_in_flight_are_cancelled_and_settled_when_the_server_stops(
    engine: Engine, tmp_path: Path
) -> None:
    keys_path = tmp_path / "keys.sqlite"  # its own: the module's server holds the module's file
    app = create_app(
        engine, ServerSettings(keys_path=keys_path), pipelines={"slow": slow_pipeline()}
    )
    key = make_key(keys_path, "stopper", budget=1.0)
    body = {"inputs": {"text": "a"}, "budget_usd": BUDGET}
    with serving(app) as url:
        headers = {"authorization": f"Bearer {key}"}
        async with aiohttp.ClientSession(url.removesuffix("/v1"), headers=headers) as client:
            run_id = (await start(client, body, pipeline="slow")).json()["id"]
    state: ServerState = app.state.shoal
    assert state.runs.running == 0
    info = state.runs.runs[run_id].info()
    assert info.status == "failed"
    assert info.result is not None
    assert info.result.stop_reason == "cancelled: the server stopped"
    record = engine.traces.run(run_id)
    assert record is not None
    assert record.status == "failed"
    store = KeyStore(keys_path)
    try:
        stopper = store.record("stopper")
    finally:
        store.close()
    assert stopper is not None
    # The call cut short is charged the time it ran, and the key pays what the trace says.
    traced = sum(to_pico(c.cost_usd) for c in engine.traces.calls(run_id))
    assert traced > 0
    assert to_pico(stopper.spent_usd) == traced


async def test_the_openapi_document_lists_the_run_endpoints(
    client: aiohttp.ClientSession,
) -> None:
    spec = (await call(client, "GET", "/openapi.json")).json()
    runs = spec["paths"]["/v1/pipelines/{name}/runs"]["post"]
    assert set(runs["responses"]) >= {"202", "400", "401", "402", "404", "429"}
    assert runs["parameters"][0]["schema"]["examples"] == ["shout", "slow"]
    assert "/v1/pipelines/{name}/runs/{run_id}/events" in spec["paths"]


def test_the_default_app_serves_no_pipeline_and_leaves_the_engine_alone(tmp_path: Path) -> None:
    engine = Engine(trace_path=tmp_path / "traces.sqlite")
    try:
        routes = list(engine.route_names)
        app = create_app(engine, ServerSettings(auth=False))
        state: ServerState = app.state.shoal
        assert state.runs.pipelines == {}
        assert list(engine.route_names) == routes
    finally:
        asyncio.run(engine.aclose())


def test_the_app_serves_the_pipelines_the_operator_names(tmp_path: Path) -> None:
    """A registered name (its routes added to the engine) and a YAML file."""
    (tmp_path / "shout.yaml").write_text(SHOUT_YAML, "utf-8")
    engine = Engine(trace_path=tmp_path / "traces.sqlite")
    try:
        settings = ServerSettings(auth=False, pipelines=("rental", str(tmp_path / "shout.yaml")))
        app = create_app(engine, settings)
        state: ServerState = app.state.shoal
        assert sorted(state.runs.pipelines) == ["rental", "shout"]
        assert "rental-criteria" in engine.route_names
        with pytest.raises(UnknownPipelineError, match="nope"):
            create_app(engine, ServerSettings(auth=False, pipelines=("nope",)))
    finally:
        asyncio.run(engine.aclose())


async def test_a_pipeline_from_yaml_runs_over_http(tmp_path: Path) -> None:
    (tmp_path / "shout.yaml").write_text(SHOUT_YAML, "utf-8")
    engine = Engine(trace_path=tmp_path / "traces.sqlite")
    settings = ServerSettings(auth=False, pipelines=(str(tmp_path / "shout.yaml"),))
    with serving(create_app(engine, settings)) as url:
        async with aiohttp.ClientSession(url.removesuffix("/v1")) as client:
            run_id = (await start(client, {"inputs": {"text": "hi"}})).json()["id"]
            info = await wait_done(client, run_id)
    await engine.aclose()
    assert info["status"] == "ok", info
    assert info["result"]["output"] == "HI!"


SHOUT_YAML = """\
name: shout
inputs: [text]
output: loud
steps:
  - name: loud
    kind: python
    fn: test_server_pipelines:loud
    inputs: [text]
"""


def loud(text: str) -> str:
    return text.upper() + "!"
