"""Routers and routed models: each policy's choice, cascades, fallbacks, explicit failures."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from shoal.cards import HostPrice, ModelCard, TokenPrice
from shoal.engine import Engine
from shoal.errors import (
    BackendUnavailableError,
    ConfigError,
    InvalidRequestError,
    UnknownModelError,
    UnknownRouteError,
)
from shoal.fleet import Fleet
from shoal.messages import ChatRequest, ChatResponse, Completed, TextDelta, TokenLogprob
from shoal.models.embedder import HashEmbedder
from shoal.models.fake import FakeModel, FunctionModel, fake_card
from shoal.routing.base import ModelStats, RoutedModel, card_stats, trace_stats
from shoal.routing.cascade import AgreementSignal, CascadeRouter, ConfidenceSignal, LogprobSignal
from shoal.routing.policies import FallbackRouter, FixedRouter, LatencySLORouter
from shoal.routing.predictive import (
    Featurizer,
    KNNPredictor,
    LogisticPredictor,
    PredictiveRouter,
)
from shoal.settings import parse_fleet
from shoal.traces.store import CallRecord, TraceStore

PRICE = {"small": 1.0, "large": 10.0}


def priced(model_id: str, answers: Sequence[str] | None = None, **options: object) -> FakeModel:
    price = TokenPrice(input_per_mtok=PRICE.get(model_id, 1.0), output_per_mtok=0.0)
    return FakeModel(answers, model_id=model_id, price=price, **options)


def cards(*ids: str) -> list[ModelCard]:
    return [fake_card(i) for i in ids]


REQUEST = ChatRequest.of("What is 2 + 2?")


def test_fixed_router_chooses_its_model_and_rejects_unknown_ones() -> None:
    decision = FixedRouter("b").choose(REQUEST, cards("a", "b"), {})
    assert decision.models == ("b",)
    assert "fixed" in decision.reason
    with pytest.raises(UnknownModelError, match="valid models: a, b"):
        FixedRouter("c").choose(REQUEST, cards("a", "b"), {})


def test_latency_slo_keeps_only_models_that_fit_the_deadline() -> None:
    stats = {
        "fast": ModelStats(latency_p95_s=0.5),
        "slow": ModelStats(latency_p95_s=5.0),
        "unknown": ModelStats(),
    }
    router = LatencySLORouter(FallbackRouter(["slow", "fast"]), deadline_s=1.0)
    # The chain keeps, in its order, the models the deadline leaves.
    assert router.choose(REQUEST, cards("fast", "slow", "unknown"), stats).models == ("fast",)
    chain = LatencySLORouter(FallbackRouter(["slow", "unknown"]), deadline_s=1.0)
    with pytest.raises(UnknownModelError):  # none of the chain fits: not a silent swap
        chain.choose(REQUEST, cards("fast", "slow", "unknown"), stats)
    cascade = LatencySLORouter(
        CascadeRouter(["fast", "slow"], AgreementSignal(), 0.5), deadline_s=1.0
    )
    decision = cascade.choose(REQUEST, cards("fast", "slow", "unknown"), stats)
    assert (decision.models, decision.reason.split(";")[0]) == (("fast",), "cascade: only fast")
    router = LatencySLORouter(FixedRouter("fast"), deadline_s=1.0)
    decision = router.choose(REQUEST, cards("fast", "slow", "unknown"), stats)
    assert decision.models == ("fast",)
    assert decision.target_met
    assert "too slow" in decision.reason
    assert {e.model for e in decision.estimates if not e.eligible} == {"slow", "unknown"}


def test_latency_slo_that_nothing_meets_is_flagged_not_hidden() -> None:
    stats = {"a": ModelStats(latency_p95_s=3.0), "b": ModelStats(latency_p95_s=2.0)}
    router = LatencySLORouter(FixedRouter("a"), deadline_s=1.0)
    decision = router.choose(REQUEST, cards("a", "b"), stats)
    assert decision.models == ("b",)  # the fastest
    assert not decision.target_met
    assert "NOT met" in decision.reason


def test_latency_slo_without_measurements_takes_the_first_listed_and_says_so() -> None:
    router = LatencySLORouter(FixedRouter("b"), deadline_s=1.0)
    decision = router.choose(REQUEST, cards("a", "b"), {})
    assert decision.models == ("a",)
    assert not decision.target_met
    assert "no model has a measured latency; chose the first listed, a" in decision.reason


async def test_fallback_moves_on_only_after_a_retryable_error() -> None:
    def down(request: ChatRequest) -> str:
        raise BackendUnavailableError("connection refused")

    def bad(request: ChatRequest) -> str:
        raise InvalidRequestError("no")

    first = FunctionModel(down, model_id="first")
    second = FakeModel(["fine"], model_id="second")
    routed = RoutedModel("safe", FallbackRouter(["first", "second"]), [first, second])
    response = await routed.generate(REQUEST)
    assert response.model == "second"
    assert response.text == "fine"
    assert response.decision is not None
    assert response.decision.route == "safe"
    assert response.decision.models == ("first", "second")
    assert response.decision.decision_s > 0
    strict = RoutedModel(
        "strict",
        FallbackRouter(["bad", "second"]),
        [FunctionModel(bad, model_id="bad"), second],
    )
    with pytest.raises(InvalidRequestError):
        await strict.generate(REQUEST)


def logprob_model(model_id: str, text: str, prob: float) -> FunctionModel:
    """A model whose answers carry one token of the given probability."""

    class WithLogprobs(FunctionModel):
        async def generate(self, request: ChatRequest) -> ChatResponse:
            response = await super().generate(request)
            lp = (TokenLogprob(token=text, logprob=float(np.log(prob))),)
            return response.model_copy(update={"logprobs": lp})

    price = TokenPrice(input_per_mtok=PRICE.get(model_id, 1.0), output_per_mtok=0.0)
    return WithLogprobs(lambda r: text, model_id=model_id, price=price)


async def test_confident_cascade_stops_at_the_small_model() -> None:
    small, large = logprob_model("small", "4", 0.95), logprob_model("large", "4", 0.99)
    router = CascadeRouter(["small", "large"], LogprobSignal(), thresholds=0.8)
    routed = RoutedModel("cheap-first", router, [small, large])
    response = await routed.generate(REQUEST)
    assert response.model == "small"
    assert response.attempts == ()
    assert len(large.calls) == 0
    assert small.calls[0].logprobs  # the cascade asked for the free confidence signal


async def test_unsure_cascade_escalates_and_costs_every_call() -> None:
    small, large = logprob_model("small", "5", 0.3), logprob_model("large", "4", 0.99)
    router = CascadeRouter(["small", "large"], LogprobSignal(), thresholds=0.8)
    routed = RoutedModel("cheap-first", router, [small, large])
    response = await routed.generate(REQUEST)
    assert response.model == "large"
    assert [a.model for a in response.attempts] == ["small"]
    assert response.attempts[0].cost_usd > 0
    assert response.total_cost_usd == pytest.approx(
        response.cost_usd + response.attempts[0].cost_usd
    )
    events = [e async for e in routed.stream(REQUEST)]
    done = events[-1]
    assert isinstance(done, Completed)
    assert done.response.model == "large"
    assert [a.model for a in done.response.attempts] == ["small"]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "4"


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_cascade_whose_last_stage_fails_carries_the_paid_answers(streamed: bool) -> None:
    def down(request: ChatRequest) -> str:
        raise BackendUnavailableError("host down")

    small = logprob_model("small", "5", 0.3)
    router = CascadeRouter(["small", "large"], LogprobSignal(), thresholds=0.8)
    routed = RoutedModel("cheap-first", router, [small, FunctionModel(down, model_id="large")])
    with pytest.raises(BackendUnavailableError) as caught:
        if streamed:
            _ = [e async for e in routed.stream(REQUEST)]
        else:
            await routed.generate(REQUEST)
    assert [a.model for a in caught.value.attempts] == ["small"]
    assert caught.value.attempts[0].cost_usd > 0  # paid for: the engine charges and traces it


async def test_agreement_cascade_accepts_when_two_cheap_models_agree() -> None:
    a, b = priced("a", ["Paris"]), priced("b", ["paris."])
    large = priced("large", ["Lyon"])
    router = CascadeRouter(["a", "b", "large"], AgreementSignal(), thresholds=0.5)
    response = await RoutedModel("agree", router, [a, b, large]).generate(REQUEST)
    assert response.model == "b"
    assert [x.model for x in response.attempts] == ["a"]
    c = priced("c", ["Rome"])
    router = CascadeRouter(["a", "c", "large"], AgreementSignal(), thresholds=0.5)
    response = await RoutedModel("agree", router, [a, c, large]).generate(REQUEST)
    assert response.model == "large"
    assert [x.model for x in response.attempts] == ["a", "c"]


class Always(ConfidenceSignal):
    def __init__(self, value: float) -> None:
        self.value = value

    def confidence(
        self, request: ChatRequest, response: ChatResponse, earlier: Sequence[ChatResponse]
    ) -> float:
        return self.value


def test_cascade_decision_explains_its_steps() -> None:
    router = CascadeRouter(["a", "b"], Always(1.0), thresholds={"a": 0.7})
    decision = router.choose(REQUEST, cards("a", "b"), {"a": ModelStats(cost_usd=0.1)})
    assert decision.models == ("a", "b")
    assert "a (kept if confidence >= 0.70)" in decision.reason
    with pytest.raises(ConfigError, match="thresholds missing"):
        CascadeRouter(["a", "b", "c"], Always(1.0), thresholds={"a": 0.5})


def predictive(min_quality: float | None = None, lam: float = 0.5) -> PredictiveRouter:
    """Math questions go well on 'small'; history questions only on 'large'."""
    feat = Featurizer(HashEmbedder())
    prompts = ["add two numbers 2 + 3"] * 20 + ["who was the first roman emperor"] * 20
    x = feat(prompts)
    y = np.array([[1.0, 1.0]] * 20 + [[0.0, 1.0]] * 20)
    knn = KNNPredictor(k=5, prior_weight=0.1, embed_dim=64).fit(x, y)
    return PredictiveRouter(
        ["small", "large"],
        feat,
        knn,
        lam=lam,
        ref_cost=300.0,
        cost_mode="known",
        min_quality=min_quality,
    )


def price_cards() -> list[ModelCard]:
    return [
        ModelCard(
            id=i,
            context=4096,
            runs="api",
            where="test",
            price=TokenPrice(input_per_mtok=PRICE[i] * 1e6, output_per_mtok=0.0),
        )
        for i in ("small", "large")
    ]


def test_predictive_router_picks_the_cheapest_model_worth_its_cost() -> None:
    router = predictive()
    easy = router.choose(ChatRequest.of("add two numbers 4 + 5"), price_cards(), {})
    hard = router.choose(ChatRequest.of("who was the first roman emperor"), price_cards(), {})
    assert easy.models == ("small",)
    assert hard.models == ("large",)
    assert "large is predicted" in hard.reason or "predicted best" in hard.reason
    est = {e.model: e for e in easy.estimates}
    assert est["small"].quality == pytest.approx(1.0, abs=0.05)
    assert est["large"].cost_usd == pytest.approx(10 * est["small"].cost_usd)  # type: ignore[operator]
    # With no weight on cost, the model predicted best wins, however small its lead.
    assert predictive(lam=0.0).choose(
        ChatRequest.of("add two numbers 4 + 5"), price_cards(), {}
    ).models == ("large",)


async def test_unmeetable_quality_floor_is_explicit_in_decision_and_trace(tmp_path: Path) -> None:
    router = predictive(min_quality=1.5 / 1.5 + 0.0)  # quality 1.0 for everything: unreachable
    router.min_quality = 1.01
    models = [priced("small", ["x"]), priced("large", ["y"])]
    routed = RoutedModel("strict", router, models)
    decision = routed.decide(ChatRequest.of("who was the first roman emperor"))
    assert not decision.target_met
    assert decision.models == ("large",)  # the best available, not a cheaper one
    assert "chose the best available" in decision.reason
    engine = Engine(Fleet(), traces=TraceStore(tmp_path / "t.sqlite"))
    engine.add_route("strict", routed)
    response = await engine.generate("strict", ChatRequest.of("who was the first roman emperor"))
    assert response.decision is not None
    assert not response.decision.target_met
    rows = engine.traces.calls()
    assert rows[-1].route == "strict"
    assert rows[-1].decision is not None
    assert rows[-1].decision["target_met"] is False
    await engine.aclose()


def test_logistic_predictor_learns_a_separable_pattern() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 5))
    y = np.stack([(x[:, 0] > 0).astype(float), np.ones(400)], axis=1)
    pred = LogisticPredictor(l2=0.1).fit(x, y).predict(x)
    assert ((pred[:, 0] > 0.5) == (x[:, 0] > 0)).mean() > 0.95


def test_stats_from_cards_and_traces() -> None:
    card = ModelCard(
        id="m",
        context=100,
        runs="api",
        where="x",
        price=TokenPrice(input_per_mtok=1, output_per_mtok=2),
    )
    stats = card_stats(card, 1000, 100)
    assert stats.cost_usd == pytest.approx((1000 * 1 + 100 * 2) / 1e6)
    assert card_stats(fake_card("local", price=HostPrice())).cost_usd is None  # unmeasured
    calls = [CallRecord(model="m", latency_s=t, cost_usd=0.1) for t in (1.0, 2.0, 3.0, 10.0)]
    calls.append(CallRecord(model="m", status="error", latency_s=99.0))
    merged = trace_stats(calls)
    assert merged["m"].calls == 4
    assert merged["m"].latency_p50_s == pytest.approx(2.5)
    assert merged["m"].latency_p95_s is not None
    assert merged["m"].latency_p95_s > 8


FLEET_WITH_ROUTES = """
include_default: false
cache_dir: {cache}
models:
  - {{id: tiny, kind: gguf, path: "{path}", context: 2048}}
  - {{id: api, kind: openai, base_url: "http://127.0.0.1:9/v1", model: gpt-4o-mini}}
routes:
  - {{name: pinned, kind: fixed, model: tiny}}
  - {{name: safe, kind: fallback, models: [api, tiny]}}
  - {{name: cheap-first, kind: cascade, models: [tiny, api], threshold: 0.7}}
  - {{name: smart, kind: predictive, models: [tiny, api], target: {{quality_ratio: 0.9}}}}
"""


def test_routes_from_the_fleet_file_are_registered_and_unknown_ones_listed(
    tmp_path: Path, smollm2_gguf: Path
) -> None:
    text = FLEET_WITH_ROUTES.format(cache=tmp_path, path=smollm2_gguf)
    fleet = Fleet(parse_fleet(text, source="fleet.yaml"))
    engine = Engine(fleet, traces=TraceStore(":memory:"))
    assert engine.route_names == ["pinned", "safe", "cheap-first", "smart"]
    with pytest.raises(UnknownRouteError) as info:
        engine.route("fastest")
    assert "valid routes: cheap-first, pinned, safe, smart" in str(info.value)
    with pytest.raises(UnknownModelError, match="pinned"):
        engine.model("fastest")
    routed = engine.route("safe")
    assert isinstance(routed, RoutedModel)
    assert routed.decide(REQUEST).models == ("api", "tiny")
    smart = engine.route("smart")
    assert isinstance(smart, RoutedModel)
    with pytest.raises(ConfigError, match="shoal route calibrate smart"):
        smart.decide(REQUEST)


def test_route_config_errors_say_where() -> None:
    bad = "routes:\n  - {name: r, kind: fixed, model: nope}\n"
    fleet = Fleet(parse_fleet(bad, source="f.yaml"))
    with pytest.raises(ConfigError, match=r"route 'r'.*unknown model 'nope'"):
        Engine(fleet, traces=TraceStore(":memory:"))
    with pytest.raises(ConfigError, match="exactly one"):
        parse_fleet(
            "routes:\n  - {name: r, kind: predictive, models: [a, b], target: {}}\n", source="f"
        )
    with pytest.raises(ConfigError, match="already a model id or route"):
        parse_fleet(
            "routes:\n  - {name: r, kind: fixed, model: a}\n  - {name: r, kind: fixed, model: b}\n",
            source="f",
        )
    with pytest.raises(ConfigError, match="Extra inputs"):
        parse_fleet("routes:\n  - {name: r, kind: fixed, model: a, speed: 3}\n", source="f")
