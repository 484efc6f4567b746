"""The engine: calls by name, traced to SQLite."""

from __future__ import annotations

from contextlib import aclosing
from pathlib import Path

import pytest

from shoal import ChatRequest, FakeModel, Fleet, TextDelta, UnknownModelError
from shoal.engine import Engine
from shoal.errors import BackendError, ConfigError
from shoal.messages import RouteDecision
from shoal.models.base import Model
from shoal.models.fake import FunctionModel
from shoal.traces.store import TraceStore


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    return Engine(Fleet(), trace_path=tmp_path / "traces.sqlite")


async def test_calls_are_traced_with_their_run_and_step(engine: Engine) -> None:
    run_id = engine.traces.start_run("demo", budget_usd=0.01)
    response = await engine.generate(
        "smollm2-135m", ChatRequest.of("Hi!", max_tokens=4), run_id=run_id, step="greet"
    )
    (call,) = engine.traces.calls(run_id)
    assert (call.model, call.step, call.status) == ("smollm2-135m", "greet", "ok")
    assert call.output_tokens == response.usage.output_tokens
    assert call.cost_usd == pytest.approx(response.cost_usd)
    run = engine.traces.run(run_id)
    assert run is not None
    assert run.cost_usd == pytest.approx(response.cost_usd)
    await engine.aclose()


async def test_routes_are_called_by_name_and_every_attempt_is_traced(engine: Engine) -> None:
    decision = RouteDecision(route="cheap-first", models=("a", "b"), reason="test")
    first = await FakeModel(["unsure"], model_id="a").generate(ChatRequest.of("q"))

    async def answer(request: ChatRequest) -> str:
        return "sure"

    class Routed(FunctionModel):
        stream = Model.stream  # answers through `generate`

        async def generate(self, request: ChatRequest):  # type: ignore[no-untyped-def]
            final = await super().generate(request)
            return final.model_copy(update={"decision": decision, "attempts": (first,)})

    engine.add_route("cheap-first", Routed(answer, model_id="b"))
    assert "cheap-first" in engine.names
    response = await engine.generate("cheap-first", ChatRequest.of("q"))
    assert response.total_cost_usd == pytest.approx(first.cost_usd + response.cost_usd)
    calls = engine.traces.calls()
    assert [(c.model, c.route) for c in calls] == [("a", "cheap-first"), ("b", "cheap-first")]
    assert calls[0].decision is not None
    assert calls[0].decision["reason"] == "test"
    with pytest.raises(ConfigError):
        engine.add_route("smollm2-135m", FakeModel())
    await engine.aclose()


async def test_unknown_name_lists_models_and_routes(engine: Engine) -> None:
    engine.add_route("fast", FakeModel())
    with pytest.raises(UnknownModelError) as caught:
        engine.model("nope")
    assert "fast" in caught.value.known
    assert "smollm2-135m" in caught.value.known
    await engine.aclose()


async def test_failures_and_abandoned_streams_are_traced(engine: Engine) -> None:
    def broken(request: ChatRequest) -> str:
        raise BackendError("upstream died")

    engine.add_route("broken", FunctionModel(broken, model_id="broken"))
    with pytest.raises(BackendError):
        await engine.generate("broken", ChatRequest.of("q"))
    engine.add_route("chatty", FakeModel(["many words in this answer"]))
    plan = await engine.plan("chatty", ChatRequest.of("q"))
    async with aclosing(engine.stream(plan)) as events:
        async for event in events:
            assert isinstance(event, TextDelta)
            break
    statuses = [(c.route, c.model, c.status) for c in engine.traces.calls()]
    assert statuses == [("broken", "broken", "error"), ("chatty", "fake", "cancelled")]
    assert "upstream died" in (engine.traces.calls()[0].error or "")
    await engine.aclose()


def test_the_trace_file_is_readable_by_another_connection(tmp_path: Path) -> None:
    store = TraceStore(tmp_path / "t.sqlite")
    run_id = store.start_run("r")
    from shoal.traces.store import CallRecord

    store.record_call(CallRecord(model="m", run_id=run_id, cost_usd=0.5))
    reader = TraceStore(tmp_path / "t.sqlite")
    assert [c.cost_usd for c in reader.calls(run_id)] == [0.5]
    store.finish_run(run_id, "done", {"items": 3})
    run = reader.run(run_id)
    assert run is not None
    assert (run.status, run.detail, run.cost_usd) == ("done", {"items": 3}, 0.5)
    store.close()
    reader.close()
