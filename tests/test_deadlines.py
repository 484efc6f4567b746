"""Deadlines planned on the speeds models show lately: a step that cannot fit the time left is
changed before it starts (a cheaper model, its fallback, or skipped), never started and cut."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from shoal import ChatRequest, ChatResponse, Fleet, FunctionModel, TokenPrice, Usage
from shoal import speeds as speeds_module
from shoal.calls import CallPlan
from shoal.engine import Engine
from shoal.errors import PipelineError
from shoal.pipeline.graph import ModelStep, Pipeline, PythonStep
from shoal.pipeline.run import Runner
from shoal.routing.base import RoutedModel
from shoal.routing.policies import FallbackRouter, LatencySLORouter
from shoal.speeds import LiveSpeeds

PRICE = TokenPrice(input_per_mtok=1.0, output_per_mtok=2.0)
PROMPT = " ".join(["word"] * 60)


def answered(model: str, *, prompt_s: float, tokens: int = 200) -> ChatResponse:
    """A response as a local model that evaluated `tokens` prompt tokens in `prompt_s` gives."""
    return ChatResponse(
        model=model,
        text="x " * 20,
        finish_reason="stop",
        usage=Usage(input_tokens=tokens, output_tokens=21),
        latency_s=prompt_s + 1.5,
        compute_s=prompt_s + 1.0,
        ttft_s=prompt_s,
    )


def test_live_speeds_follow_recent_calls_and_persist(tmp_path: Path) -> None:
    speeds = LiveSpeeds(tmp_path / "speeds.json")
    speeds.observe(answered("m", prompt_s=30.0))  # a first call also read the weights: left out
    assert speeds.get("m") is None
    speeds.observe(answered("m", prompt_s=2.0))
    first = speeds.get("m")
    assert first is not None
    assert first.prompt_tok_s == pytest.approx(100.0)
    assert first.gen_tok_s == pytest.approx(20.0)
    assert first.wait_s == pytest.approx(0.5)
    speeds.observe(answered("m", prompt_s=4.0))  # slower now: the average moves toward it
    second = speeds.get("m")
    assert second is not None
    assert 50.0 < (second.prompt_tok_s or 0) < 100.0
    speeds.save()
    again = LiveSpeeds(tmp_path / "speeds.json").get("m")  # a new process starts from them
    assert again == second._replace(wait_s=0.0)  # with an empty queue
    saved = json.loads((tmp_path / "speeds.json").read_text())
    saved["m"]["at"] -= speeds_module.MAX_AGE_S + 1  # saved long ago: the load has likely gone
    (tmp_path / "speeds.json").write_text(json.dumps(saved))
    assert LiveSpeeds(tmp_path / "speeds.json").get("m") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert LiveSpeeds(tmp_path / "bad.json").get("m") is None  # unreadable: ignored


async def test_plans_use_the_speeds_a_model_has_shown(tmp_path: Path) -> None:
    engine = Engine(Fleet(), trace_path=tmp_path / "traces.sqlite")
    request = ChatRequest.of(PROMPT, max_tokens=16)
    idle = await engine.plan("smollm2-135m", request)
    for _ in range(2):  # the first call of a process is left out
        engine.speeds.observe(answered("smollm2-135m", prompt_s=20.0))  # a busy machine
    busy = await engine.plan("smollm2-135m", request)
    assert busy.expected_s > 5 * idle.expected_s
    assert busy.worst_usd > idle.worst_usd  # the hold grows with the time it may take
    await engine.aclose()
    reopened = Engine(Fleet(), trace_path=tmp_path / "traces.sqlite")
    # A new process plans with the speeds shown, its own queue empty (the 0.5 s waited is not
    # carried over).
    assert (await reopened.plan("smollm2-135m", request)).expected_s == pytest.approx(
        busy.expected_s - 0.5
    )
    await reopened.aclose()


def slow_engine(tmp_path: Path) -> tuple[Engine, FunctionModel, FunctionModel]:
    engine = Engine(Fleet(), trace_path=tmp_path / "traces.sqlite")
    slow = FunctionModel(lambda r: "slow answer", model_id="slow", price=PRICE)
    quick = FunctionModel(lambda r: "quick answer", model_id="quick", price=PRICE)
    engine.add_route("slow", slow)
    engine.add_route("quick", quick)
    # The slow model has lately taken ten seconds for a prompt like this one.
    for _ in range(2):  # the first call of a process is left out
        engine.speeds.observe(answered("slow", prompt_s=10.0, tokens=20))
    return engine, slow, quick


def one_step(**step: object) -> Pipeline:
    fields = {"name": "answer", "prompt": "{q}", "model": "slow", "inputs": ("q",), **step}
    return Pipeline(
        "deadline",
        inputs=["q"],
        steps=[ModelStep(**fields)],  # type: ignore[arg-type]
        output="answer",
    )


async def test_a_step_that_cannot_fit_runs_on_its_fallback_before_it_starts(
    tmp_path: Path,
) -> None:
    engine, slow, quick = slow_engine(tmp_path)
    pipeline = one_step(fallback="quick", on_deadline="fallback")
    result = await Runner(engine, traces=engine.traces).run(pipeline, {"q": PROMPT}, deadline_s=5.0)
    assert result.status == "ok"
    assert result.output == "quick answer"
    assert result.steps["answer"].degraded == ["slow -> quick (time running low)"]
    assert (len(slow.calls), len(quick.calls)) == (0, 1)
    await engine.aclose()


async def test_an_optional_step_that_cannot_fit_is_skipped_and_the_run_answers(
    tmp_path: Path,
) -> None:
    engine, slow, _ = slow_engine(tmp_path)
    pipeline = Pipeline(
        "refine",
        inputs=["q"],
        steps=[
            ModelStep("draft", prompt="{q}", model="quick", inputs=("q",)),
            ModelStep(
                "polish",
                prompt="{draft}",
                model="slow",
                inputs=("draft",),
                optional=True,
                on_deadline="skip",
            ),
        ],
        output="draft",
    )
    result = await Runner(engine, traces=engine.traces).run(pipeline, {"q": PROMPT}, deadline_s=5.0)
    assert result.status == "ok"
    assert result.output == "quick answer"
    polish = result.steps["polish"]
    assert (polish.status, polish.skipped_for_time) == ("skipped", True)
    assert polish.degraded[0].startswith("skipped: slow expected to take")
    assert slow.calls == []
    await engine.aclose()


async def test_a_step_that_cannot_fit_runs_on_a_cheaper_model(tmp_path: Path) -> None:
    engine, slow, quick = slow_engine(tmp_path)

    def stand_ins(plan: CallPlan) -> list[CallPlan]:
        return [CallPlan("quick", plan.request, ("quick",), plan.worst_usd / 2, 0.01)]

    engine.stand_ins = stand_ins  # type: ignore[method-assign]
    result = await Runner(engine, traces=engine.traces).run(
        one_step(), {"q": PROMPT}, deadline_s=5.0
    )
    assert result.status == "ok"
    assert result.steps["answer"].degraded == ["slow -> quick (time running low)"]
    assert (len(slow.calls), len(quick.calls)) == (0, 1)
    await engine.aclose()


async def test_with_no_path_that_fits_the_step_is_not_started(tmp_path: Path) -> None:
    engine, slow, _ = slow_engine(tmp_path)
    engine.stand_ins = lambda plan: []  # type: ignore[method-assign]  # nothing cheaper
    result = await asyncio.wait_for(
        Runner(engine, traces=engine.traces).run(one_step(), {"q": PROMPT}, deadline_s=5.0), 2.0
    )
    assert result.status == "partial"
    assert "deadline near" in (result.stop_reason or "")
    assert slow.calls == []
    await engine.aclose()


def test_on_deadline_must_be_possible() -> None:
    with pytest.raises(PipelineError, match="names no fallback"):
        one_step(on_deadline="fallback")
    with pytest.raises(PipelineError, match="only an optional step"):
        one_step(on_deadline="skip")


async def test_a_skipped_fan_out_leaves_a_gap_per_item(tmp_path: Path) -> None:
    engine, slow, _ = slow_engine(tmp_path)

    def split(q: str) -> list[str]:
        return q.split()[:3]

    def first_note(notes: list[str | None]) -> str:
        return next((n for n in notes if n), "no notes")

    pipeline = Pipeline(
        "notes",
        inputs=["q"],
        steps=[
            PythonStep("words", split, inputs=("q",)),
            ModelStep(
                "notes",
                prompt="{item}",
                model="slow",
                inputs=("words",),
                map_over="words",
                optional=True,
                on_deadline="skip",
            ),
            PythonStep("summary", first_note, inputs=("notes",)),
        ],
        output="summary",
    )
    result = await Runner(engine, traces=engine.traces).run(pipeline, {"q": PROMPT}, deadline_s=5.0)
    assert result.status == "ok", result.stop_reason
    assert result.values["notes"] == [None, None, None]
    assert result.output == "no notes"
    assert result.steps["notes"].skipped_for_time
    assert slow.calls == []
    await engine.aclose()


async def test_a_route_with_a_deadline_judges_models_at_their_recent_speed(
    tmp_path: Path,
) -> None:
    engine = Engine(Fleet(), trace_path=tmp_path / "traces.sqlite")
    slow = FunctionModel(lambda r: "slow answer", model_id="slow", price=PRICE)
    quick = FunctionModel(lambda r: "quick answer", model_id="quick", price=PRICE)
    router = LatencySLORouter(FallbackRouter(["slow", "quick"]), deadline_s=2.0)
    engine.add_route("r", RoutedModel("r", router, [slow, quick]))
    request = ChatRequest.of(PROMPT, max_tokens=8)
    first = (await engine.plan("r", request)).decision
    assert first is not None
    assert (first.models, first.target_met) == (("slow",), False)  # nothing known yet: says so
    for _ in range(2):  # the first call of a process is left out
        engine.speeds.observe(answered("slow", prompt_s=10.0, tokens=20))
        engine.speeds.observe(answered("quick", prompt_s=0.1, tokens=20))
    then = (await engine.plan("r", request)).decision
    assert then is not None
    assert (then.models, then.target_met) == (("quick",), True)
    assert "too slow for the 2 s deadline: slow" in then.reason
    await engine.aclose()
