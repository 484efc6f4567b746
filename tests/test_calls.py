"""A call's life: planned once, run as planned, charged once.

Every path that calls a route (Python generate and stream, a pipeline step plain and fanned out,
HTTP plain and streamed, a cascade's stages) decides once per call; generate and stream run the
same decision with the same attempts, cost-cap splits and charge; and for every way a call ends,
the trace, the ledger and the run's cost agree to the picodollar.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from contextlib import aclosing
from pathlib import Path

import numpy as np
import openai
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from server_support import serving

from shoal import ChatRequest, Fleet, FunctionModel, TokenPrice
from shoal.cards import ModelCard
from shoal.engine import Engine
from shoal.errors import (
    BackendError,
    BackendTimeoutError,
    BudgetExceededError,
    OutputInvalidError,
    OverloadedError,
    RateLimitedError,
)
from shoal.ledger import Account, to_pico
from shoal.messages import ChatResponse, Completed, Escalated, RouteDecision, TextDelta
from shoal.models.embedder import HashEmbedder
from shoal.pipeline.graph import ModelStep, Pipeline
from shoal.pipeline.run import Runner
from shoal.routing.base import RoutedModel, Router, RouteStats
from shoal.routing.cascade import AgreementSignal, CascadeRouter, ConfidenceSignal
from shoal.routing.policies import FallbackRouter, FixedRouter, LatencySLORouter
from shoal.routing.predictive import Featurizer, KNNPredictor, PredictiveRouter
from shoal.server import create_app
from shoal.settings import ServerSettings

PRICE = TokenPrice(input_per_mtok=100.0, output_per_mtok=400.0)


class Counting(Router):
    """Wraps a router and counts its decisions."""

    def __init__(self, inner: Router) -> None:
        self.inner = inner
        self.choices = 0
        self.blocking = inner.blocking

    def choose(
        self, request: ChatRequest, candidates: Sequence[ModelCard], stats: RouteStats
    ) -> RouteDecision:
        self.choices += 1
        return self.inner.choose(request, candidates, stats)

    def accept(
        self, request: ChatRequest, response: ChatResponse, earlier: Sequence[ChatResponse] = ()
    ) -> tuple[bool, float]:
        return self.inner.accept(request, response, earlier)

    def prepare(self, request: ChatRequest) -> ChatRequest:
        return self.inner.prepare(request)

    def rename(self, name: str) -> None:
        self.name = name
        self.inner.rename(name)


class Never(ConfidenceSignal):
    """Trusts no answer: a cascade always escalates to its last model."""

    def confidence(
        self, request: ChatRequest, response: ChatResponse, earlier: Sequence[ChatResponse]
    ) -> float:
        return 0.0


class CountingEmbedder(HashEmbedder):
    def __init__(self) -> None:
        super().__init__(dim=32)
        self.texts = 0

    def embed(self, texts: Sequence[str]):  # type: ignore[no-untyped-def]
        self.texts += len(texts)
        return super().embed(texts)


def model(model_id: str, answer: str = "an answer of five words") -> FunctionModel:
    return FunctionModel(lambda r: answer, model_id=model_id, price=PRICE)


def cascade(signal: ConfidenceSignal | None = None) -> Counting:
    return Counting(CascadeRouter(["cheap", "strong"], signal or Never(), 0.5))


def engine_with(tmp_path: Path, routers: dict[str, Router]) -> Engine:
    engine = Engine(Fleet(), trace_path=tmp_path / "traces.sqlite")
    for name, router in routers.items():
        engine.add_route(name, RoutedModel(name, router, [model("cheap"), model("strong")]))
    return engine


def predictive_router(embedder: CountingEmbedder) -> Counting:
    features = Featurizer(embedder)
    x = features(["short question"] * 4 + ["a long and difficult question"] * 4)
    y = np.array([[1.0, 1.0]] * 4 + [[0.0, 1.0]] * 4)
    knn = KNNPredictor(k=3, prior_weight=0.1, embed_dim=32).fit(x, y)
    return Counting(
        PredictiveRouter(["cheap", "strong"], features, knn, lam=0.1, cost_mode="known")
    )


# -- one decision per call -----------------------------------------------------------------------


async def test_every_python_and_pipeline_path_decides_once_per_call(tmp_path: Path) -> None:
    fixed, chain, esc = Counting(FixedRouter("cheap")), cascade(), cascade()
    embedder = CountingEmbedder()
    smart = predictive_router(embedder)
    embedder.texts = 0  # fitting embedded the training set
    engine = engine_with(tmp_path, {"fixed": fixed, "esc": esc, "smart": smart, "chain": chain})
    request = ChatRequest.of("short question", max_tokens=16)
    for name, router in (("fixed", fixed), ("esc", esc), ("smart", smart)):
        await engine.generate(name, request)
        assert router.choices == 1, name
        plan = await engine.plan(name, request)
        async with aclosing(engine.stream(plan)) as events:
            assert isinstance([e async for e in events][-1], Completed)
        assert router.choices == 2, name
    assert embedder.texts == 2  # the predictive route embeds each query once
    # A pipeline step: one call, then a fan-out of three calls.
    pipeline = Pipeline(
        "once",
        inputs=["q", "items"],
        steps=[
            ModelStep("one", prompt="{q}", model="chain", inputs=("q",), max_tokens=8),
            ModelStep("many", prompt="{item}", model="chain", inputs=("items",), map_over="items"),
        ],
        output="many",
    )
    result = await Runner(engine, traces=engine.traces).run(
        pipeline, {"q": "hello", "items": ["a", "b", "c"]}, budget_usd=1.0
    )
    assert result.status == "ok"
    assert chain.choices == 4
    await engine.aclose()


def test_http_plain_and_streamed_decide_once(tmp_path: Path) -> None:
    fixed, esc = Counting(FixedRouter("cheap")), cascade()
    engine = engine_with(tmp_path, {"fixed": fixed, "esc": esc})
    app = create_app(engine, ServerSettings(auth=False), pipelines={})
    user = [{"role": "user", "content": "hello"}]
    with serving(app) as url, openai.OpenAI(base_url=url, api_key="none") as client:
        for name, router in (("fixed", fixed), ("esc", esc)):
            reply = client.chat.completions.create(model=name, messages=user, max_tokens=8)  # type: ignore[arg-type]
            assert reply.choices[0].message.content
            assert router.choices == 1, name
            chunks = list(
                client.chat.completions.create(
                    model=name,
                    messages=user,  # type: ignore[arg-type]
                    max_tokens=8,
                    stream=True,
                )
            )
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert router.choices == 2, name
    asyncio.run(engine.aclose())


async def test_a_cascade_decides_once_and_announces_each_escalation(tmp_path: Path) -> None:
    esc = cascade()
    engine = engine_with(tmp_path, {"esc": esc})
    plan = await engine.plan("esc", ChatRequest.of("q", max_tokens=8))
    assert plan.models == ("cheap", "strong")
    assert plan.decision is not None
    events = [e async for e in engine.stream(plan)]
    escalated = [e.response.model for e in events if isinstance(e, Escalated)]
    final = events[-1]
    assert isinstance(final, Completed)
    assert escalated == ["cheap"]
    assert [a.model for a in final.response.attempts] == ["cheap"]
    assert final.response.decision == plan.decision
    assert esc.choices == 1
    await engine.aclose()


# -- generate and stream are one path ------------------------------------------------------------


class Recording(FunctionModel):
    """Records the cost cap each call was given; optionally fails its first `fail` calls."""

    def __init__(self, model_id: str, answer: str, fail: type[Exception] | None = None) -> None:
        super().__init__(self._answer_or_fail, model_id=model_id, price=PRICE)
        self.text = answer
        self.fail = fail
        self.caps: list[float | None] = []

    def _answer_or_fail(self, request: ChatRequest) -> str:
        self.caps.append(request.max_cost_usd)
        if self.fail is not None:
            raise self.fail(f"{self.id} is down")
        return self.text


def build_route(kind: str, answers: tuple[str, str, str]) -> RoutedModel:
    names = ("tiny", "cheap", "strong")
    fail = BackendError if kind == "fallback" else None
    models = [
        Recording(names[0], answers[0], fail=fail),
        Recording(names[1], answers[1]),
        Recording(names[2], answers[2]),
    ]
    router: Router
    if kind == "fixed":
        router = FixedRouter("cheap")
    elif kind == "fallback":
        router = FallbackRouter(names)
    elif kind == "slo":
        router = LatencySLORouter(FixedRouter("strong"), deadline_s=10.0)
    elif kind == "agree":
        router = CascadeRouter(names, AgreementSignal(), 0.5)
    else:
        router = CascadeRouter(names, Never(), 0.5)
    return RoutedModel(kind, router, models)


def trace_of(route: RoutedModel) -> list[list[float | None]]:
    return [m.caps for m in route._models.values()]  # type: ignore[attr-defined]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    kind=st.sampled_from(["fixed", "fallback", "slo", "agree", "never"]),
    answers=st.tuples(*[st.sampled_from(["yes", "no", "yes it is so"])] * 3),
    max_tokens=st.integers(1, 64),
    cap=st.one_of(st.none(), st.floats(1e-7, 1e-3)),
    prompt=st.text(min_size=1, max_size=60),
)
def test_generate_and_stream_run_the_same_call(
    tmp_path: Path,
    kind: str,
    answers: tuple[str, str, str],
    max_tokens: int,
    cap: float | None,
    prompt: str,
) -> None:
    request = ChatRequest.of(prompt, max_tokens=max_tokens, max_cost_usd=cap)

    async def run(streamed: bool) -> tuple[object, ...]:
        route = build_route(kind, answers)
        engine = Engine(Fleet(), trace_path=tmp_path / f"{uuid.uuid4().hex}.sqlite")
        engine.add_route(kind, route)
        account = Account("test")
        plan = await engine.plan(kind, request)
        hold = account.reserve(plan.worst_usd)
        if streamed:
            events = [e async for e in engine.stream(plan, hold=hold)]
            last = events[-1]
            assert isinstance(last, Completed)
            response = last.response
        else:
            response = await engine.execute(plan, hold=hold)
        traced = sum(to_pico(c.cost_usd) for c in engine.traces.calls())
        await engine.aclose()
        assert traced == account.spent_pusd == hold.charged_pusd
        decision = response.decision
        assert decision is not None
        return (
            decision.models,
            decision.reason,
            response.model,
            response.text,
            [a.model for a in response.attempts],
            trace_of(route),
            account.spent_pusd,
        )

    assert asyncio.run(run(streamed=False)) == asyncio.run(run(streamed=True))


# -- the trace, the ledger and the run agree ---------------------------------------------------


async def test_trace_ledger_and_run_cost_agree_however_calls_end(tmp_path: Path) -> None:
    async def slow(request: ChatRequest) -> str:
        await asyncio.sleep(5)
        return "never"

    def wrong(request: ChatRequest) -> str:
        raise OutputInvalidError(
            "not JSON",
            text="{oops",
            response=ChatResponse(
                model="wrong",
                text="{oops",
                finish_reason="stop",
                usage={"input_tokens": 3, "output_tokens": 2},  # type: ignore[arg-type]
                latency_s=0.01,
                cost_usd=7e-6,
            ),
        )

    def busy(request: ChatRequest) -> str:
        raise OverloadedError("queue full")

    def timeout(request: ChatRequest) -> str:
        raise BackendTimeoutError("no answer in time")

    engine = Engine(Fleet(), trace_path=tmp_path / "traces.sqlite")
    engine.add_route("ok", model("ok"))
    engine.add_route("slow", FunctionModel(slow, model_id="slow", price=PRICE))
    engine.add_route("wrong", FunctionModel(wrong, model_id="wrong", price=PRICE))
    engine.add_route("busy", FunctionModel(busy, model_id="busy", price=PRICE))
    engine.add_route("timeout", FunctionModel(timeout, model_id="timeout", price=PRICE))
    engine.add_route("esc", RoutedModel("esc", cascade(), [model("cheap"), model("strong")]))
    account = Account.usd("run", 1.0)
    request = ChatRequest.of("how much is this", max_tokens=8)

    async def call(name: str) -> int:
        plan = await engine.plan(name, request)
        hold = account.reserve(plan.worst_usd)
        run_id = engine.traces.start_run(name)
        task = asyncio.ensure_future(engine.execute(plan, hold=hold, run_id=run_id))
        if name == "slow":
            await asyncio.sleep(0.05)
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert hold.settled, name
        traced = sum(to_pico(c.cost_usd) for c in engine.traces.calls(run_id))
        assert traced == hold.charged_pusd, name
        return traced

    charges = {name: await call(name) for name in ("ok", "slow", "wrong", "busy", "timeout", "esc")}
    assert charges["ok"] > 0
    assert charges["wrong"] == to_pico(7e-6)  # the answer in the wrong form is paid for
    assert charges["busy"] == 0  # refused before any work
    assert charges["timeout"] > 0  # the prompt was sent: its tokens are charged
    assert charges["slow"] == charges["timeout"]  # cancelled: the prompt, nothing delivered
    assert charges["esc"] > charges["ok"]  # both stages of the cascade
    assert account.spent_pusd == sum(charges.values())
    assert account.held_pusd == 0
    await engine.aclose()


async def test_a_fallback_charges_and_traces_the_member_that_failed(tmp_path: Path) -> None:
    def timeout(request: ChatRequest) -> str:
        raise BackendTimeoutError("no answer in time")

    engine = Engine(Fleet(), trace_path=tmp_path / "traces.sqlite")
    members = [FunctionModel(timeout, model_id="timeout", price=PRICE), model("ok")]
    engine.add_route("alone", FunctionModel(timeout, model_id="timeout", price=PRICE))
    engine.add_route("chain", RoutedModel("chain", FallbackRouter(["timeout", "ok"]), members))
    engine.add_route("ok-alone", model("ok"))
    request = ChatRequest.of("how much is this", max_tokens=8)
    account = Account.usd("run", 1.0)

    async def charge(name: str) -> int:
        plan = await engine.plan(name, request)
        hold = account.reserve(plan.worst_usd)
        run_id = engine.traces.start_run(name)
        await asyncio.gather(engine.execute(plan, hold=hold, run_id=run_id), return_exceptions=True)
        traced = sum(to_pico(c.cost_usd) for c in engine.traces.calls(run_id))
        assert traced == hold.charged_pusd
        if name == "chain":
            assert [c.model for c in engine.traces.calls(run_id)] == ["timeout", "ok"]
        return traced

    # The timed-out member sent its prompt under the route as it does alone: it is paid for.
    assert await charge("chain") == await charge("alone") + await charge("ok-alone")
    await engine.aclose()


async def test_a_run_costs_what_its_calls_were_charged(tmp_path: Path) -> None:
    engine = Engine(Fleet(), trace_path=tmp_path / "traces.sqlite")
    engine.add_route("esc", RoutedModel("esc", cascade(), [model("cheap"), model("strong")]))
    pipeline = Pipeline(
        "agree",
        inputs=["items"],
        steps=[
            ModelStep("each", prompt="{item}", model="esc", inputs=("items",), map_over="items")
        ],
        output="each",
    )
    plan = await engine.plan("esc", ChatRequest.of("x", max_tokens=256))
    # Room for two calls' holds at once, not three: the third waits for money or is refused.
    budget = 2.5 * plan.worst_usd
    result = await Runner(engine, traces=engine.traces, concurrency=8).run(
        pipeline, {"items": ["a", "b", "c", "d"]}, budget_usd=budget
    )
    traced = sum(to_pico(c.cost_usd) for c in engine.traces.calls(result.run_id))
    assert to_pico(result.cost_usd) == traced
    assert result.cost_usd <= budget
    assert sum(s.cost_usd for s in result.steps.values()) == pytest.approx(result.cost_usd)
    await engine.aclose()


# -- the ledger ----------------------------------------------------------------------------------


def test_an_account_holds_then_charges_what_the_call_cost() -> None:
    account = Account.usd("key 'k'", 1e-6)
    hold = account.reserve(6e-7)
    with pytest.raises(RateLimitedError, match="held by calls in flight"):
        account.reserve(6e-7)
    with pytest.raises(BudgetExceededError, match=r"key 'k' has \$0.000001"):
        account.reserve(2e-6)
    assert hold.settle(to_pico(8e-7)) == to_pico(8e-7)  # more than held: charged, counted
    assert account.overrun_pusd == to_pico(2e-7)
    assert hold.settle(0) == to_pico(8e-7)  # settled once
    assert (account.spent_pusd, account.held_pusd) == (to_pico(8e-7), 0)
    account.reserve(2e-7).release()
    assert account.spent_pusd == to_pico(8e-7)
    assert Account("free").left_pusd is None


@given(st.integers(min_value=0, max_value=10**15))
@example(8_568_341_323_426)  # $8.57 a call: 1 picodollar more, read back
@example(46_123_456_789)  # 4.6 cents
def test_a_whole_picodollar_amount_reads_back_as_itself(pusd: int) -> None:
    # A cost in USD is a whole number of picodollars (`whole_pico`): the ledger must read it
    # back as that number, or a trace and the charge settled from it differ by a picodollar.
    from shoal.money import to_usd, whole_pico

    assert to_pico(to_usd(pusd)) == pusd
    assert to_pico(whole_pico(to_usd(pusd))) == pusd
    if pusd < 10**9:  # a fraction a float can still hold is rounded up
        assert to_pico(to_usd(pusd) + 0.5e-12) == pusd + 1


class WholeOnly(FunctionModel):
    """An upstream that answers whole and cannot stream."""

    async def stream(self, request: ChatRequest):  # type: ignore[no-untyped-def,override]
        raise BackendError("this upstream does not stream")
        yield  # pragma: no cover


async def test_a_plain_call_asks_the_model_for_a_whole_answer(tmp_path: Path) -> None:
    engine = Engine(Fleet(), trace_path=tmp_path / "traces.sqlite")
    engine.add_route("whole", WholeOnly(lambda r: "done", model_id="whole", price=PRICE))
    engine.add_route(
        "routed",
        RoutedModel("routed", FixedRouter("whole"), [WholeOnly(lambda r: "ok", model_id="whole")]),
    )
    for name in ("whole", "routed"):
        response = await engine.generate(name, ChatRequest.of("q", max_tokens=4))
        assert response.text in ("done", "ok")
        with pytest.raises(BackendError):
            plan = await engine.plan(name, ChatRequest.of("q", max_tokens=4))
            [e async for e in engine.stream(plan)]
    await engine.aclose()


class Endless(FunctionModel):
    """Streams words until told to stop; says when its stream was closed."""

    def __init__(self) -> None:
        super().__init__(lambda r: "", model_id="endless", price=PRICE)
        self.closed = False

    async def stream(self, request: ChatRequest):  # type: ignore[no-untyped-def,override]
        try:
            while True:
                yield TextDelta(text="word ")
                await asyncio.sleep(0.01)
        finally:
            self.closed = True


async def test_leaving_a_routed_stream_stops_its_model_at_once(tmp_path: Path) -> None:
    engine = Engine(Fleet(), trace_path=tmp_path / "traces.sqlite")
    endless = Endless()
    engine.add_route("r", RoutedModel("r", FixedRouter("endless"), [endless]))
    plan = await engine.plan("r", ChatRequest.of("q", max_tokens=8))
    async with aclosing(engine.stream(plan)) as events:
        async for _ in events:
            break
    assert endless.closed  # closed with the stream, not later by the garbage collector
    assert [(c.model, c.status) for c in engine.traces.calls()] == [("endless", "cancelled")]
    await engine.aclose()
