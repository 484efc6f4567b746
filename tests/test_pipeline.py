"""Pipelines: validation, orchestration, budget, deadline, retries, fallback, cache, traces."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from shoal import BackendError, ChatRequest, FunctionModel, TokenPrice
from shoal.calls import CallPlan
from shoal.engine import Engine
from shoal.errors import OverloadedError
from shoal.fleet import Fleet
from shoal.pipeline.cache import ResponseCache
from shoal.pipeline.graph import ModelStep, Pipeline, PipelineError, PythonStep
from shoal.pipeline.run import Runner
from shoal.pipeline.spec import dump_yaml, load_yaml
from shoal.traces.store import TraceStore

# One token costs a micro-dollar in and two out: budgets are easy to reason about.
PRICE = TokenPrice(input_per_mtok=1.0, output_per_mtok=2.0)


class Verdict(BaseModel):
    score: int
    reason: str


def shout(text: str) -> str:
    return text.upper()


def count(loud: list[str]) -> int:
    return len(loud)


def words(text: str) -> list[str]:
    return text.split()


def first_score(score: list[Verdict | None]) -> int:
    return next(v.score for v in score if v is not None)


def engine_with(tmp_path: Path, **models: FunctionModel) -> Engine:
    engine = Engine(Fleet(), trace_path=tmp_path / "traces.sqlite")
    for name, model in models.items():
        engine.add_route(name, model)
    return engine


def echo(delay_s: float = 0.0, model_id: str = "echo") -> FunctionModel:
    return FunctionModel(
        lambda r: r.messages[-1].content, model_id=model_id, price=PRICE, delay_s=delay_s
    )


def judge(model_id: str = "judge", delay_s: float = 0.0) -> FunctionModel:
    return FunctionModel(
        lambda r: json.dumps({"score": len(r.messages[-1].content) % 10, "reason": "ok"}),
        model_id=model_id,
        price=PRICE,
        delay_s=delay_s,
    )


# -- validation before anything runs ----------------------------------------------------------


def test_cycles_are_rejected() -> None:
    with pytest.raises(PipelineError, match=r"cycle: (a -> b -> a|b -> a -> b)"):
        Pipeline(
            "loop",
            inputs=["x"],
            steps=[
                ModelStep("a", prompt="{b}", model="m", inputs=("b",)),
                ModelStep("b", prompt="{a}", model="m", inputs=("a",)),
            ],
            output="a",
        )


def test_missing_inputs_and_unknown_template_fields_are_rejected() -> None:
    with pytest.raises(PipelineError) as caught:
        Pipeline(
            "broken",
            inputs=["text"],
            steps=[
                ModelStep("a", prompt="{text} {colour}", model="m", inputs=("text", "nowhere")),
                ModelStep("a", prompt="x", model="m"),
            ],
            output="zzz",
        )
    message = str(caught.value)
    assert "reads 'nowhere'" in message
    assert "{colour}" in message
    assert "'a' is defined twice" in message
    assert "output 'zzz'" in message


def test_python_steps_must_take_their_inputs() -> None:
    with pytest.raises(PipelineError) as caught:
        Pipeline(
            "params",
            inputs=["text", "other"],
            steps=[PythonStep("loud", shout, inputs=("other",))],
            output="loud",
        )
    assert "shout() has no parameter 'other'" in str(caught.value)
    assert "nothing feeds parameter 'text'" in str(caught.value)


def test_schema_mismatches_are_rejected() -> None:
    with pytest.raises(PipelineError, match="produces str, the parameter wants list"):
        Pipeline(
            "types",
            inputs=["text"],
            steps=[
                PythonStep("loud", shout),
                PythonStep("n", count),
            ],
            output="n",
        )
    with pytest.raises(PipelineError, match="maps over 'loud', which is not a list"):
        Pipeline(
            "types",
            inputs=["text"],
            steps=[
                PythonStep("loud", shout),
                ModelStep("each", prompt="{item}", model="m", inputs=("loud",), map_over="loud"),
            ],
            output="each",
        )
    with pytest.raises(PipelineError, match="items of 'vs' are Verdict, its 'item' wants str"):

        def item_text(item: str) -> str:
            return item

        Pipeline(
            "types",
            inputs=["text"],
            steps=[
                PythonStep("split", words),
                ModelStep(
                    "vs",
                    prompt="{item}",
                    model="m",
                    inputs=("split",),
                    map_over="split",
                    output=Verdict,
                ),
                PythonStep("bad", item_text, inputs=("vs",), map_over="vs"),
            ],
            output="bad",
        )


# -- running --------------------------------------------------------------------------------


def fan_out_pipeline(model: str = "judge", fallback: str | None = None) -> Pipeline:
    return Pipeline(
        "fan",
        inputs=["text"],
        steps=[
            PythonStep("split", words),
            ModelStep(
                "score",
                prompt="Score {item}",
                model=model,
                output=Verdict,
                inputs=("split",),
                map_over="split",
                max_tokens=20,
                fallback=fallback,
            ),
            PythonStep("best", first_score),
        ],
        output="best",
    )


async def test_a_pipeline_runs_its_steps_in_order_and_fans_out(tmp_path: Path) -> None:
    engine = engine_with(tmp_path, judge=judge())
    result = await Runner(engine, traces=engine.traces).run(
        fan_out_pipeline(), {"text": "alpha beta gamma delta"}
    )
    assert result.status == "ok", result.stop_reason
    assert [v["score"] for v in result.values["score"]] == [len("Score alpha") % 10, 0, 1, 1]
    assert result.output == len("Score alpha") % 10
    assert result.steps["score"].calls == 4
    calls = engine.traces.calls(result.run_id)
    assert [(c.step, c.item) for c in calls] == [("score", str(i)) for i in range(4)]
    assert result.cost_usd == pytest.approx(sum(c.cost_usd for c in calls))
    run = engine.traces.run(result.run_id or "")
    assert run is not None
    assert run.status == "ok"
    assert run.cost_usd == pytest.approx(result.cost_usd)


async def test_fan_out_runs_concurrently(tmp_path: Path) -> None:
    engine = engine_with(tmp_path, judge=judge(delay_s=0.2))
    result = await Runner(engine, concurrency=8).run(
        fan_out_pipeline(), {"text": " ".join(["w"] * 8)}
    )
    assert result.status == "ok"
    assert result.wall_s < 8 * 0.2 / 2  # far below the sequential 1.6 s


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    n_items=st.integers(1, 30),
    budget=st.floats(0.0, 0.002),
    concurrency=st.integers(1, 16),
    delays=st.lists(st.floats(0.0, 0.01), min_size=1, max_size=5),
)
def test_the_budget_is_never_exceeded_under_concurrent_fan_out(
    tmp_path: Path, n_items: int, budget: float, concurrency: int, delays: list[float]
) -> None:
    turn = iter(range(10**6))

    async def answer(request: ChatRequest) -> str:
        await asyncio.sleep(delays[next(turn) % len(delays)])
        return json.dumps({"score": 3, "reason": "fine " * 3})

    class OnlyJudge(Engine):
        def stand_ins(self, plan: CallPlan) -> list[CallPlan]:
            return []  # no stand-in: the budget alone decides what runs

    async def go() -> None:
        engine = OnlyJudge(Fleet(), traces=TraceStore(":memory:"))
        engine.add_route("judge", FunctionModel(answer, model_id="judge", price=PRICE))
        result = await Runner(engine, traces=engine.traces, concurrency=concurrency).run(
            fan_out_pipeline(), {"text": " ".join(["word"] * n_items)}, budget_usd=budget
        )
        spent = sum(c.cost_usd for c in engine.traces.calls())
        assert spent <= budget + 1e-12
        assert result.cost_usd == pytest.approx(spent)
        if result.steps["score"].items_failed:
            assert result.status != "ok"
            assert result.stop_reason is not None
            assert "budget" in result.stop_reason
        engine.traces.close()

    asyncio.run(go())


async def test_the_deadline_is_honoured_with_a_partial_result(tmp_path: Path) -> None:
    engine = engine_with(tmp_path, judge=judge(delay_s=0.3))
    started = time.monotonic()
    result = await Runner(engine, traces=engine.traces, concurrency=1).run(
        fan_out_pipeline(), {"text": " ".join(["w"] * 20)}, deadline_s=1.0
    )
    assert time.monotonic() - started < 1.5
    assert result.status == "partial"
    assert result.stop_reason is not None
    assert "deadline" in result.stop_reason
    assert "best" not in result.values
    assert result.steps["score"].error == "cancelled at the deadline"
    assert result.steps["best"].status == "skipped"
    calls = engine.traces.calls(result.run_id)
    assert {c.model for c in calls} == {"judge"}  # never swapped for a real model
    assert [c.status for c in calls].count("cancelled") == 1  # the one in flight
    assert 2 <= [c.status for c in calls].count("ok") <= 4
    run = engine.traces.run(result.run_id or "")
    assert run is not None
    assert run.status == "partial"


async def test_retryable_errors_are_retried(tmp_path: Path) -> None:
    failures = iter([True, True, False, False, False, False])

    def flaky(request: ChatRequest) -> str:
        if next(failures):
            raise BackendError("upstream hiccup")
        return json.dumps({"score": 1, "reason": "ok"})

    engine = engine_with(tmp_path, judge=FunctionModel(flaky, model_id="judge", price=PRICE))
    result = await Runner(engine, backoff_s=0.01).run(fan_out_pipeline(), {"text": "a"})
    assert result.status == "ok"
    assert result.steps["score"].calls == 3


def _failing(*errors: Exception) -> FunctionModel:
    """A judge that raises `errors` in turn, then answers."""
    pending = list(errors)

    def answer(request: ChatRequest) -> str:
        if pending:
            raise pending.pop(0)
        return json.dumps({"score": 1, "reason": "ok"})

    return FunctionModel(answer, model_id="judge", price=PRICE)


def _one_call(retries: int) -> Pipeline:
    step = ModelStep(
        "score",
        prompt="Score {text}",
        model="judge",
        output=Verdict,
        inputs=("text",),
        retries=retries,
    )
    return Pipeline("one", inputs=["text"], steps=[step], output="score")


@pytest.mark.parametrize(("jitter", "expected"), [(0.5, [0.5, 1.0, 1.5]), (0.999, [1.0, 2.0, 3.0])])
async def test_retries_back_off_with_full_jitter_under_a_cap(
    tmp_path: Path, jitter: float, expected: list[float]
) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    model = _failing(*(BackendError("hiccup") for _ in range(3)))
    engine = engine_with(tmp_path, judge=model)
    runner = Runner(engine, backoff_s=1.0, backoff_cap_s=3.0, sleep=sleep, jitter=lambda: jitter)
    result = await runner.run(_one_call(retries=3), {"text": "a"})
    assert result.status == "ok"
    # Up to 1, 2, then 4 s capped at 3 s, each scaled by the draw.
    assert slept == pytest.approx(expected, abs=0.01)


async def test_retries_honour_retry_after_and_never_wait_past_the_deadline(
    tmp_path: Path,
) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    busy = OverloadedError("queue full", retry_after_s=2.5)
    engine = engine_with(tmp_path, judge=_failing(busy))
    runner = Runner(engine, backoff_s=0.1, sleep=sleep, jitter=lambda: 0.0)
    assert (await runner.run(_one_call(retries=2), {"text": "a"})).status == "ok"
    assert slept == [2.5]

    # A server that asks for longer than the run has left: not retried, the step fails now.
    slept.clear()
    later = OverloadedError("queue full", retry_after_s=8.0)
    engine = engine_with(tmp_path, judge=_failing(later))
    runner = Runner(engine, backoff_s=0.1, sleep=sleep, jitter=lambda: 0.0)
    started = time.monotonic()
    result = await runner.run(_one_call(retries=2), {"text": "a"}, deadline_s=5.0)
    assert result.status == "failed"
    assert "queue full" in (result.steps["score"].error or "")
    assert slept == []
    assert time.monotonic() - started < 2.0
    # The cap bounds a long retry-after too.
    assert (
        Runner(engine, backoff_cap_s=10.0).retry_delay(1, OverloadedError("x", retry_after_s=60))
        == 10.0
    )


async def test_a_failing_step_falls_back(tmp_path: Path) -> None:
    def down(request: ChatRequest) -> str:
        raise BackendError("gone")

    engine = engine_with(
        tmp_path, judge=FunctionModel(down, model_id="judge", price=PRICE), backup=judge("backup")
    )
    result = await Runner(engine, backoff_s=0.001).run(
        fan_out_pipeline(fallback="backup"), {"text": "a b"}
    )
    assert result.status == "ok"
    assert any("fell back to backup" in note for note in result.steps["score"].degraded)
    errors = [c for c in engine.traces.calls() if c.status == "error"]
    assert errors  # the failures are traced too


async def test_without_a_fallback_the_step_fails_clearly(tmp_path: Path) -> None:
    def down(request: ChatRequest) -> str:
        raise BackendError("gone")

    engine = engine_with(tmp_path, judge=FunctionModel(down, model_id="judge", price=PRICE))
    result = await Runner(engine, backoff_s=0.001).run(fan_out_pipeline(), {"text": "a"})
    assert result.status == "failed"
    assert result.steps["score"].items_failed == 1
    assert result.steps["best"].status == "skipped"
    assert "gone" in (result.steps["score"].error or "")


async def test_malformed_output_is_repaired_or_retried(tmp_path: Path) -> None:
    answers = iter(
        [
            'Sure! {"score": 7, "reason": "nice"} Hope that helps.',  # repaired: prose around JSON
            '{"score": "high"}',  # wrong type: retried with a correction
            '{"score": 4, "reason": "fixed"}',
        ]
    )
    engine = engine_with(
        tmp_path,
        judge=FunctionModel(lambda r: next(answers), model_id="judge", price=PRICE),
    )
    result = await Runner(engine, concurrency=1).run(fan_out_pipeline(), {"text": "a b"})
    assert result.status == "ok", result.steps["score"]
    assert [v["score"] for v in result.values["score"]] == [7, 4]
    assert result.steps["score"].calls == 3


async def test_money_running_low_degrades_to_a_cheaper_model(tmp_path: Path) -> None:
    engine = engine_with(tmp_path)
    pipeline = Pipeline(
        "degrade",
        inputs=["q"],
        steps=[
            ModelStep(
                "answer", prompt="{q}", model="qwen2.5-coder-1.5b", inputs=("q",), max_tokens=8
            )
        ],
        output="answer",
    )
    request = ChatRequest.of("Hi there", max_tokens=8)
    request_budget = (await engine.plan("smollm2-135m", request)).worst_usd
    stand_ins = engine.stand_ins(await engine.plan("qwen2.5-coder-1.5b", request))
    assert [p.name for p in stand_ins] == ["qwen2.5-coder-0.5b", "smollm2-135m"]
    assert engine.stand_ins(await engine.plan("smollm2-135m", request)) == []
    result = await Runner(engine, traces=engine.traces).run(
        pipeline, {"q": "Hi there"}, budget_usd=request_budget * 1.01
    )
    assert result.status == "ok"
    assert result.steps["answer"].degraded == [
        "qwen2.5-coder-1.5b -> smollm2-135m (money running low)"
    ]
    assert [c.model for c in engine.traces.calls(result.run_id)] == ["smollm2-135m"]
    # The call is capped at its hold: the prompt is evaluated in chunks and generation stops
    # before a chunk or a token would pass it; what the run was charged is what its trace says.
    (call,) = engine.traces.calls(result.run_id)
    assert result.cost_usd == pytest.approx(call.cost_usd, abs=1e-12)
    await engine.aclose()


async def test_no_money_at_all_stops_before_any_call(tmp_path: Path) -> None:
    engine = engine_with(tmp_path, judge=judge())
    result = await Runner(engine).run(fan_out_pipeline(), {"text": "a b"}, budget_usd=0.0)
    assert result.status == "partial"
    assert result.output is None
    assert result.stop_reason is not None
    assert "budget exhausted" in result.stop_reason
    assert engine.traces.calls() == []


async def test_identical_calls_are_cached_on_disk(tmp_path: Path) -> None:
    model = judge()
    engine = engine_with(tmp_path, judge=model)
    runner = Runner(engine, traces=engine.traces, cache=ResponseCache(tmp_path / "cache.sqlite"))
    first = await runner.run(fan_out_pipeline(), {"text": "a b c"})
    second = await runner.run(fan_out_pipeline(), {"text": "a b c"})
    assert first.values == second.values
    assert len(model.calls) == 3
    assert second.steps["score"].cached == 3
    assert second.cost_usd == 0
    assert all(c.cached for c in engine.traces.calls(second.run_id))


def test_yaml_spec_round_trips() -> None:
    pipeline = fan_out_pipeline(fallback="backup")
    text = dump_yaml(pipeline)
    again = load_yaml(text)
    assert again.steps == pipeline.steps
    assert (again.inputs, again.output, again.order) == (
        pipeline.inputs,
        pipeline.output,
        pipeline.order,
    )
    assert dump_yaml(again) == text


def test_yaml_spec_errors_say_where() -> None:
    with pytest.raises(PipelineError, match=r"steps\.0\.model\.colour"):
        load_yaml(
            "name: x\ninputs: [a]\noutput: s\n"
            "steps:\n  - {kind: model, name: s, model: m, prompt: '{a}', colour: red}\n"
        )
    with pytest.raises(PipelineError, match="cannot import"):
        load_yaml(
            "name: x\ninputs: [a]\noutput: s\n"
            "steps:\n  - {kind: python, name: s, fn: 'nowhere:fn'}\n"
        )


def test_killing_the_process_mid_run_leaves_committed_traces_intact(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, json
        from shoal import FunctionModel, TokenPrice
        from shoal.engine import Engine
        from shoal.fleet import Fleet
        from shoal.pipeline.graph import ModelStep, Pipeline
        from shoal.pipeline.run import Runner

        async def main():
            engine = Engine(Fleet(), trace_path={str(tmp_path / "traces.sqlite")!r})
            engine.add_route("slow", FunctionModel(lambda r: "ok", model_id="slow",
                             price=TokenPrice(input_per_mtok=1, output_per_mtok=1), delay_s=0.05))
            pipeline = Pipeline("long", inputs=["items"], steps=[
                ModelStep("each", prompt="{{item}}", model="slow", inputs=("items",),
                          map_over="items")], output="each")
            print("started", flush=True)
            await Runner(engine, traces=engine.traces, concurrency=1).run(
                pipeline, {{"items": [str(i) for i in range(10_000)]}})

        asyncio.run(main())
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "started"
    db = tmp_path / "traces.sqlite"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.2)
        with sqlite3.connect(db) as peek:
            if peek.execute("SELECT count(*) FROM calls").fetchone()[0] >= 10:
                break
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stdout.close()
    with sqlite3.connect(db) as check:
        assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    store = TraceStore(db)
    calls = store.calls()
    assert len(calls) >= 10
    assert all(c.status == "ok" and c.model == "slow" and c.cost_usd > 0 for c in calls)
    (run,) = store.runs()
    assert run.status == "running"  # it never finished, and says so
    assert run.cost_usd == pytest.approx(sum(c.cost_usd for c in calls))
    store.close()


def lines_or_fail(text: str) -> list[str]:
    raise ValueError("no lines today")


async def test_a_failed_optional_step_blocks_its_dependents_cleanly(tmp_path: Path) -> None:
    engine = engine_with(tmp_path, judge=judge())
    pipeline = Pipeline(
        "optional",
        inputs=["text"],
        steps=[
            PythonStep("maybe", lines_or_fail, inputs=("text",), optional=True),
            ModelStep("each", prompt="{item}", model="judge", inputs=("maybe",), map_over="maybe"),
        ],
        output="each",
    )
    result = await Runner(engine, traces=engine.traces).run(pipeline, {"text": "a"})
    assert result.status == "failed"
    assert result.steps["maybe"].status == "partial"
    assert "no lines today" in (result.steps["maybe"].error or "")
    assert result.steps["each"].error == "needs maybe, which did not finish"
    run = engine.traces.run(result.run_id or "")
    assert run is not None
    assert run.status == "failed"  # finished, not left 'running'


async def test_cached_answers_are_free_even_with_no_budget_left(tmp_path: Path) -> None:
    engine = engine_with(tmp_path, judge=judge())
    runner = Runner(engine, traces=engine.traces, cache=ResponseCache(tmp_path / "c.sqlite"))
    first = await runner.run(fan_out_pipeline(), {"text": "a b"}, budget_usd=1.0)
    again = await runner.run(fan_out_pipeline(), {"text": "a b"}, budget_usd=0.0)
    assert again.status == "ok", again.stop_reason
    assert again.values == first.values
    assert again.steps["score"].cached == 2


async def test_a_fallback_is_tried_once(tmp_path: Path) -> None:
    def down(request: ChatRequest) -> str:
        raise BackendError("gone")

    engine = engine_with(
        tmp_path,
        judge=FunctionModel(down, model_id="judge", price=PRICE),
        backup=FunctionModel(down, model_id="backup", price=PRICE),
    )
    result = await Runner(engine, backoff_s=0.001).run(
        fan_out_pipeline(fallback="backup"), {"text": "a"}
    )
    assert result.status == "failed"
    models = [c.model for c in engine.traces.calls()]
    assert models.count("backup") == 3  # its own retries, then the step gives up


async def test_a_routed_cascade_shares_one_cost_cap(tmp_path: Path) -> None:
    from shoal.routing.base import RoutedModel
    from shoal.routing.policies import FallbackRouter

    class Escalate(FallbackRouter):
        def accept(self, request, response, earlier=()):  # type: ignore[no-untyped-def]
            return response.model != "a", 0.0  # never keep the first answer

    seen: list[float | None] = []

    def answer(request: ChatRequest) -> str:
        seen.append(request.max_cost_usd)
        return "four words of answer"

    route = RoutedModel(
        "chain",
        Escalate(["a", "b"]),
        [
            FunctionModel(answer, model_id="a", price=PRICE),
            FunctionModel(answer, model_id="b", price=PRICE),
        ],
    )
    response = await route.generate(ChatRequest.of("q", max_cost_usd=0.5))
    (first,) = response.attempts
    assert seen == [0.5, pytest.approx(0.5 - first.cost_usd)]
    assert response.total_cost_usd == pytest.approx(first.cost_usd + response.cost_usd)


async def test_a_cascade_whose_last_stage_is_down_still_pays_for_the_first(
    tmp_path: Path,
) -> None:
    from shoal.errors import BackendUnavailableError
    from shoal.routing.base import RoutedModel
    from shoal.routing.policies import FallbackRouter

    class Escalate(FallbackRouter):
        def accept(self, request, response, earlier=()):  # type: ignore[no-untyped-def]
            return False, 0.0  # never keep the first answer

    def down(request: ChatRequest) -> str:
        raise BackendUnavailableError("the large model's host is down")

    route = RoutedModel(
        "judge",
        Escalate(["small", "large"]),
        [
            FunctionModel(lambda r: '{"score": 3, "reason": "ok"}', model_id="small", price=PRICE),
            FunctionModel(down, model_id="large", price=PRICE),
        ],
    )
    engine = Engine(Fleet(), trace_path=tmp_path / "traces.sqlite")
    engine.add_route("judge", route)
    runner = Runner(engine, traces=engine.traces, backoff_s=0.0)
    result = await runner.run(fan_out_pipeline(), {"text": "alpha"}, budget_usd=1.0)
    assert result.status == "failed"
    calls = engine.traces.calls(result.run_id)
    answered = [c for c in calls if c.status == "ok"]
    # Each try's small answer was computed and paid for, though the large one never came.
    assert [c.model for c in answered] == ["small"] * result.steps["score"].calls
    assert all(c.cost_usd > 0 for c in answered)
    paid = sum(c.cost_usd for c in answered)
    assert result.cost_usd == pytest.approx(paid)
    assert result.steps["score"].cost_usd == pytest.approx(paid)
