"""Local models as Ray Serve deployments, on a real local Ray cluster (head + second node), with
the real tiny model (SmolLM2-135M) in the replicas. Run inside a loopback-only namespace by
`tests/test_ray.py`; skipped elsewhere."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import openai
import psutil
import pytest
from ray_support import LocalCluster, inside_namespace
from server_support import serving

from shoal import Fleet
from shoal.backends.ray_model import RayModel, app_name
from shoal.engine import Engine
from shoal.errors import NoReplicaError, OverloadedError
from shoal.ledger import Account
from shoal.messages import ChatRequest, ChatResponse, Completed, Message, TextDelta
from shoal.models.base import Model
from shoal.pipeline.graph import ModelStep, Pipeline, PythonStep
from shoal.pipeline.run import Runner
from shoal.server.app import create_app
from shoal.settings import (
    FleetSettings,
    GGUFModelSpec,
    RayPlacement,
    ServerSettings,
)

pytestmark = inside_namespace

TINY = "smollm2-135m"
NARROW = "tiny-narrow"  # one replica that takes one call and queues one more
GONE = "tiny-gone"  # deleted under its callers


def ask(text: str, max_tokens: int = 12) -> ChatRequest:
    return ChatRequest(messages=[Message(role="user", content=text)], max_tokens=max_tokens)


@pytest.fixture(scope="module")
def fleet(ray_cluster: LocalCluster, tiny_path: Path) -> Iterator[Fleet]:
    narrow = GGUFModelSpec(
        id=NARROW,
        path=tiny_path,
        context=2048,
        backend="ray",
        ray=RayPlacement(replicas=1, num_cpus=0.25, max_ongoing_requests=1, max_queued_requests=1),
    )
    gone = GGUFModelSpec(
        id=GONE,
        path=tiny_path,
        context=2048,
        backend="ray",
        ray=RayPlacement(replicas=1, num_cpus=0.25),
    )
    settings = FleetSettings(
        backend="ray",
        ray=RayPlacement(replicas=2, num_cpus=0.5, max_ongoing_requests=16),
        models=(narrow, gone),
    )
    fleet = Fleet(settings)
    yield fleet
    from ray import serve

    for model_id in (TINY, NARROW, GONE):
        serve.delete(app_name(model_id))


@pytest.fixture(scope="module")
def engine(fleet: Fleet, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return Engine(fleet, trace_path=tmp_path_factory.mktemp("traces") / "traces.sqlite")


async def test_a_model_on_ray_answers_as_in_process(fleet: Fleet, tiny: Model) -> None:
    model = fleet.model(TINY)
    assert isinstance(model, RayModel)
    assert fleet.card(TINY).where == "llama.cpp on ray"
    request = ask("Name a colour.")
    on_ray = await model.generate(request)
    here = await tiny.generate(request)
    assert on_ray.text == here.text  # greedy: the same tokens from the same weights
    assert on_ray.usage == here.usage
    # Costed in the replica, from the compute it measured there.
    assert on_ray.compute_s > 0
    assert on_ray.cost_usd == fleet.card(TINY).cost(on_ray.usage, on_ray.compute_s)
    assert on_ray.latency_s >= on_ray.compute_s


async def test_a_stream_on_ray_is_the_answer_in_pieces(fleet: Fleet) -> None:
    model = fleet.model(TINY)
    request = ask("Say hello to Ada.")
    pieces, last = [], None
    async for event in model.stream(request):
        if isinstance(event, TextDelta):
            pieces.append(event.text)
        elif isinstance(event, Completed):
            last = event.response
    assert last is not None
    assert len(pieces) > 1
    assert "".join(pieces) == last.text == (await model.generate(request)).text


async def test_the_engine_charges_and_traces_a_ray_call_once(engine: Engine) -> None:
    account = Account.usd("run", 1.0)
    request = ask("Count to three.")
    plan = await engine.plan(TINY, request)
    hold = account.reserve(plan.worst_usd)
    response = await engine.execute(plan, hold=hold, run_id=None, step="ray-once")
    rows = [c for c in engine.traces.calls() if c.step == "ray-once"]
    assert len(rows) == 1
    assert rows[0].status == "ok"
    assert rows[0].model == TINY
    assert rows[0].cost_usd == pytest.approx(response.cost_usd, abs=1e-12)
    assert account.spent_usd == pytest.approx(response.cost_usd, abs=1e-12)
    assert account.held_pusd == 0


async def test_a_caller_that_leaves_stops_the_replica(fleet: Fleet) -> None:
    model = fleet.model(NARROW)  # one replica taking one call: a runaway call would block it
    long = ask("Write a long story about the sea.", max_tokens=400)
    stream = model.stream(long)
    assert isinstance(stream, AsyncIterator)
    async for event in stream:
        assert isinstance(event, TextDelta)
        break
    await stream.aclose()  # type: ignore[attr-defined]
    started = time.perf_counter()
    short = await model.generate(ask("Hi", max_tokens=2))
    # 400 tokens take seconds here; the short call did not wait for them.
    assert time.perf_counter() - started < 0.5 * 400 / 64 + 1.0
    assert short.usage.output_tokens <= 2


def _busy_replica(pids: set[int]) -> int:
    """The replica process that is computing (a generation keeps a core busy; the other one
    idles), waiting for it to show on a busy machine."""
    procs = {pid: psutil.Process(pid) for pid in pids}
    for _ in range(20):
        for proc in procs.values():
            proc.cpu_percent(None)
        time.sleep(0.3)
        load = {pid: proc.cpu_percent(None) for pid, proc in procs.items()}
        busy = max(load, key=lambda pid: load[pid])
        if load[busy] >= 20 and all(v < load[busy] / 2 for p, v in load.items() if p != busy):
            return busy
    raise AssertionError(f"no replica stood out as computing: {load}")


async def test_a_call_whose_replica_dies_is_retried_and_charged_once(
    fleet: Fleet, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    model = fleet.model(TINY)
    assert isinstance(model, RayModel)
    await model.load()
    handle = model.handle()
    pids: set[int] = set()
    for _ in range(40):
        pids.add(await handle.pid.remote())
        if len(pids) == 2:
            break
    assert len(pids) == 2, "two replicas answer"
    request = ask("Write a long story about a lighthouse keeper.", max_tokens=240)
    plan = await engine.plan(TINY, request)
    account = Account.usd("faults", 1.0)
    call = asyncio.ensure_future(
        engine.execute(plan, hold=account.reserve(plan.worst_usd), step="ray-fault")
    )
    await asyncio.sleep(0.8)  # the generation is under way
    victim = await asyncio.to_thread(_busy_replica, pids)
    assert not call.done()
    os.kill(victim, signal.SIGKILL)
    with caplog.at_level(logging.WARNING, logger="shoal.backends.ray_model"):
        response = await asyncio.wait_for(call, timeout=90)
    assert "a replica was lost mid-call; trying another" in caplog.text  # it was retried
    assert response.usage.output_tokens > 0
    rows = [c for c in engine.traces.calls() if c.step == "ray-fault"]
    assert len(rows) == 1  # traced once
    assert account.spent_usd == pytest.approx(response.cost_usd, abs=1e-12)  # charged once
    assert account.held_pusd == 0


def test_a_full_queue_on_ray_is_503_with_retry_after(engine: Engine) -> None:
    app = create_app(engine, ServerSettings(auth=False))
    with serving(app) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120)

        def one(i: int) -> int | str:
            try:
                client.chat.completions.create(
                    model=NARROW,
                    messages=[{"role": "user", "content": f"Story number {i}."}],
                    max_tokens=60,
                )
            except openai.APIStatusError as exc:
                return f"{exc.status_code}:{exc.response.headers.get('retry-after')}"
            return 200

        async def all_at_once() -> list[int | str]:
            return list(await asyncio.gather(*(asyncio.to_thread(one, i) for i in range(6))))

        outcomes = asyncio.run(all_at_once())
    refused = [o for o in outcomes if o != 200]
    assert 200 in outcomes
    assert refused, "one replica taking one call and queueing one cannot take six"
    assert all(isinstance(o, str) and o.startswith("503:") for o in refused)
    assert all(o.split(":")[1] not in ("", "None") for o in refused)  # type: ignore[union-attr]


async def test_a_call_whose_every_replica_dies_ends_charged_and_traced_once(
    fleet: Fleet, engine: Engine
) -> None:
    """The one replica killed mid-call: the call is tried again while Serve starts another, and
    either answers or fails with `NoReplicaError`, in bounded time; never Ray's exception."""
    model = fleet.model(GONE)
    assert isinstance(model, RayModel)
    await model.load()
    victim = await model.handle().pid.remote()
    request = ask("Write a long story about a lighthouse keeper.", max_tokens=240)
    plan = await engine.plan(GONE, request)
    account = Account.usd("every-replica", 1.0)
    call = asyncio.ensure_future(
        engine.execute(plan, hold=account.reserve(plan.worst_usd), step="ray-all-lost")
    )
    await asyncio.sleep(0.8)  # the generation is under way
    assert not call.done()
    os.kill(victim, signal.SIGKILL)
    outcome = (await asyncio.wait_for(asyncio.gather(call, return_exceptions=True), 90))[0]
    assert isinstance(outcome, ChatResponse | NoReplicaError), repr(outcome)
    charged = outcome.cost_usd if isinstance(outcome, ChatResponse) else 0.0
    rows = [c for c in engine.traces.calls() if c.step == "ray-all-lost"]
    assert len(rows) == 1  # traced once
    assert rows[0].cost_usd == pytest.approx(charged, abs=1e-12)
    assert account.spent_usd == pytest.approx(charged, abs=1e-12)  # charged once
    assert account.held_pusd == 0


def test_a_deployment_with_no_replica_left_is_a_503_charged_and_traced_once(
    engine: Engine,
) -> None:
    """Deleted under its callers: the call fails at once with `NoReplicaError` (503 with
    `Retry-After` at the server), is traced once and charged nothing (nothing came back); the
    next call deploys the model again."""
    from ray import serve

    async def once(step: str, account: Account) -> object:
        plan = await engine.plan(GONE, ask("Hi", max_tokens=4))
        try:
            return await engine.execute(plan, hold=account.reserve(plan.worst_usd), step=step)
        except NoReplicaError as exc:
            return exc

    account = Account.usd("gone", 1.0)
    assert not isinstance(asyncio.run(once("gone-before", account)), Exception)
    spent = account.spent_usd
    serve.delete(app_name(GONE))  # every replica goes with it
    started = time.perf_counter()
    failed = asyncio.run(once("gone-engine", account))
    assert time.perf_counter() - started < 10  # at once: no wait for a replica
    assert isinstance(failed, NoReplicaError)
    assert failed.retryable
    assert failed.retry_after_s > 0
    assert "deployment on Ray is gone" in str(failed)
    assert failed.__cause__ is not None  # Ray's error is the cause, never what the caller sees
    rows = [c for c in engine.traces.calls() if c.step == "gone-engine"]
    assert len(rows) == 1  # traced once
    assert rows[0].status != "ok"
    assert rows[0].cost_usd == 0
    assert account.spent_usd == spent  # charged nothing: nothing came back
    again = asyncio.run(once("gone-again", account))  # deployed again, then answered
    assert not isinstance(again, Exception)
    assert account.held_pusd == 0

    serve.delete(app_name(GONE))
    app = create_app(engine, ServerSettings(auth=False))
    with serving(app) as base_url:
        client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=60)
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(
                model=GONE, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
            )
    assert caught.value.status_code == 503
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert "deployment on Ray is gone" in caught.value.message


async def test_the_queue_limit_is_an_overloaded_error(fleet: Fleet) -> None:
    model = fleet.model(NARROW)
    calls = [model.generate(ask(f"Story {i}", max_tokens=40)) for i in range(5)]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, Exception)]
    assert refused
    assert all(isinstance(o, OverloadedError) for o in refused)
    assert all(o.retryable and o.before_work for o in refused)


def shout(item: str) -> list[object]:
    """A Python step's item, in the process that ran it."""
    return [item.upper(), os.getpid()]


def words(text: str) -> list[str]:
    return text.split()


def dawdle(item: str) -> str:
    time.sleep(60)
    return item


@pytest.fixture
def steps_by_value() -> None:
    """The Ray workers cannot import this test module: its step functions travel by value
    (an application's steps live in an installed package, which the workers import)."""
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.mark.usefixtures("steps_by_value")
async def test_a_pipeline_fans_out_on_ray_within_its_budget(engine: Engine) -> None:
    pipeline = Pipeline(
        "ray-fan-out",
        inputs=("text",),
        steps=[
            PythonStep("words", words),
            PythonStep("shout", shout, inputs=("words",), map_over="words", executor="ray"),
            ModelStep(
                "say",
                "Say {item} politely.",
                model=TINY,
                inputs=("words",),
                map_over="words",
                max_tokens=6,
            ),
        ],
        output="shout",
    )
    result = await Runner(engine, traces=engine.traces).run(
        pipeline, {"text": "red green blue"}, budget_usd=0.01
    )
    assert result.status == "ok", result.stop_reason
    assert [v[0] for v in result.values["shout"]] == ["RED", "GREEN", "BLUE"]
    assert all(v[1] != os.getpid() for v in result.values["shout"])  # Ray tasks, elsewhere
    calls = engine.traces.calls(result.run_id)
    assert sorted(c.item or "" for c in calls) == ["0", "1", "2"]  # the model step, on Ray
    assert result.cost_usd == pytest.approx(sum(c.cost_usd for c in calls))
    assert 0 < result.cost_usd <= 0.01


@pytest.mark.usefixtures("steps_by_value")
async def test_a_ray_step_past_the_deadline_is_cancelled(engine: Engine) -> None:
    pipeline = Pipeline(
        "ray-deadline",
        inputs=("text",),
        steps=[
            PythonStep("words", words),
            PythonStep("slow", dawdle, inputs=("words",), map_over="words", executor="ray"),
        ],
        output="slow",
    )
    started = time.perf_counter()
    result = await Runner(engine).run(pipeline, {"text": "a b"}, deadline_s=2.0)
    assert time.perf_counter() - started < 10
    assert result.status != "ok"
    assert "deadline" in (result.stop_reason or "")
