"""The gateway on Ray: the Starlette app as a Serve ingress with two replicas behind Serve's proxy,
and one key's budget kept exact across them. On a real local Ray cluster, inside a loopback-only
namespace (`tests/test_ray.py`); the model is a fast fake OpenAI-compatible upstream, so the
budget, not a model, is what is under test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from ray_support import LocalCluster, inside_namespace
from server_support import fake_upstream, make_key

from shoal.cards import TokenPrice
from shoal.fleet import Fleet
from shoal.ledger import to_pico
from shoal.messages import ChatRequest, Message
from shoal.server.ray_gateway import GatewayHandle, run_gateway
from shoal.settings import (
    FleetSettings,
    GGUFModelSpec,
    OpenAIModelSpec,
    RayPlacement,
    ServerSettings,
)
from shoal.traces.store import TraceStore

pytestmark = inside_namespace

# $1,000 per million tokens: the fake upstream's 5 + 5 tokens cost exactly $0.01 a call.
PRICE = TokenPrice(input_per_mtok=1000.0, output_per_mtok=1000.0)
CALL_PUSD = to_pico(0.01)
CALLS_PAID = 30  # the budget: 30 calls past one worst case; 64 ask
CONCURRENCY = 64
TINY_ON_RAY = "tiny-behind-gateway"


@dataclass
class Gateway:
    base_url: str
    handle: GatewayHandle
    key: str
    folder: Path
    budget_pusd: int
    worst_pusd: int
    open_key: str  # no budget


def ask(i: int) -> ChatRequest:
    return ChatRequest(messages=[Message(role="user", content=f"call {i}")], max_tokens=5)


@pytest.fixture(scope="module")
def gateway(
    ray_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory, tiny_path: Path
) -> Iterator[Gateway]:
    folder = tmp_path_factory.mktemp("gateway")
    keys_path = folder / "keys.sqlite"
    with fake_upstream() as upstream:
        spec = OpenAIModelSpec(
            kind="openai", id="fake", base_url=upstream, price=PRICE, context=4096
        )
        tiny = GGUFModelSpec(
            id=TINY_ON_RAY,
            path=tiny_path,
            context=2048,
            backend="ray",
            ray=RayPlacement(replicas=1, num_cpus=0.25),
        )
        fleet = FleetSettings(include_default=False, cache_dir=folder, models=(spec, tiny))
        # What each call holds while it runs: its worst case, as the server plans it.
        worst_usd = Fleet(fleet).card("fake").worst_case_cost(ask(10))
        budget_usd = worst_usd + CALLS_PAID * 0.01
        key = make_key(keys_path, "shared", budget=budget_usd)
        open_key = make_key(keys_path, "open")
        handle = run_gateway(
            fleet,
            ServerSettings(keys_path=keys_path),
            replicas=2,
            num_cpus=0.25,
            trace_path=folder / "traces.sqlite",
        )
        try:
            yield Gateway(
                f"http://127.0.0.1:{ray_cluster.http_port}/v1",
                handle,
                key,
                folder,
                to_pico(budget_usd),
                to_pico(worst_usd),
                open_key,
            )
        finally:
            handle.stop()


def _replicas_running() -> int:
    from ray import serve

    app = serve.status().applications["shoal-gateway"]
    return int(app.deployments["gateway"].replica_states.get("RUNNING", 0))


async def _until_answered(client: openai.AsyncOpenAI, i: int) -> int:
    """One call, asked again while the key's budget is only held by calls in flight (429)."""
    for _ in range(400):
        try:
            await client.chat.completions.create(
                model="fake", messages=[{"role": "user", "content": f"call {i}"}], max_tokens=5
            )
        except openai.APIStatusError as exc:
            if exc.status_code == 429:
                await asyncio.sleep(0.02)
                continue
            return exc.status_code
        return 200
    return 429


def test_two_gateway_replicas_never_overspend_one_key(gateway: Gateway) -> None:
    assert _replicas_running() == 2
    client = openai.AsyncOpenAI(
        base_url=gateway.base_url, api_key=gateway.key, max_retries=0, timeout=60
    )

    async def all_at_once() -> list[int]:
        async with client:
            calls = (_until_answered(client, i) for i in range(CONCURRENCY))
            return list(await asyncio.gather(*calls))

    statuses = asyncio.run(all_at_once())
    import ray

    ledger: Any = gateway.handle.ledger
    deadline = time.monotonic() + 10
    while True:  # settlements are sent without waiting: let the last ones land
        spent, held, budget = ray.get(ledger.spent_pusd.remote("shared"))
        if held == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    answered = statuses.count(200)
    assert set(statuses) <= {200, 402}, statuses
    assert budget == gateway.budget_pusd
    assert held == 0
    assert spent <= budget  # zero overspend
    assert spent == answered * CALL_PUSD  # each answer charged once, nothing else
    # Drained: calls were refused only when the rest could not cover one worst case. (Each
    # replica keeping its own copy of the budget would have answered nearly all 64.)
    assert budget - spent < gateway.worst_pusd
    assert CALLS_PAID <= answered < CONCURRENCY
    assert ray.get(ledger.overrun_pusd.remote()) == 0
    traces = TraceStore(gateway.folder / "traces.sqlite")
    try:
        deadline = time.monotonic() + 10
        while True:  # each replica commits its trace rows a moment after its responses
            rows = [c for c in traces.calls() if c.key == "shared"]
            if len(rows) >= answered or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        traces.close()
    assert len(rows) == answered  # traced once each, by whichever replica served it
    assert sum(to_pico(r.cost_usd) for r in rows) == spent


def test_a_bad_key_is_refused_by_every_replica(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=gateway.base_url, api_key="sk-shoal-wrong", max_retries=0)
    for _ in range(4):
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(
                model="fake", messages=[{"role": "user", "content": "hi"}], max_tokens=5
            )


def test_the_gateway_calls_a_model_deployed_on_ray(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=gateway.base_url, api_key=gateway.open_key, max_retries=0)
    reply = client.chat.completions.with_raw_response.create(
        model=TINY_ON_RAY, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=6
    )
    answer = reply.parse()
    assert answer.choices[0].message.content
    assert answer.usage is not None
    assert answer.usage.completion_tokens > 0
    assert reply.headers["x-shoal-model"] == TINY_ON_RAY
    assert float(reply.headers["x-shoal-cost-usd"]) > 0  # costed in the model's replica
