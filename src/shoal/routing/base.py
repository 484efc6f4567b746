"""The routing contract: a `Router` chooses, a `RoutedModel` calls.

A router's one required method is `choose(request, candidates, stats) -> RouteDecision`: which
model (or which cascade of models, in the order it escalates) should answer, why, and what it
expects of each candidate. It is synchronous and does no I/O beyond its own features, so a
decision costs microseconds to milliseconds. A cascade also says, through `accept`, whether an
answer is good enough to stop.

`RoutedModel` wraps a router and the models it may choose from, and *is* a model: pipelines and
the server call it like any other. It tries the decision's models in order: an answer the router
accepts ends the call; a rejected answer, or a retryable failure, moves on to the next model. The
final `ChatResponse` carries the decision, and every earlier answer in `attempts`, each costed.
"""

from __future__ import annotations

import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np

from shoal.cards import HostPrice, ModelCard, Speed
from shoal.errors import ConfigError, OutputError, ShoalError, UnknownModelError
from shoal.messages import (
    ChatRequest,
    ChatResponse,
    Completed,
    Escalated,
    RouteDecision,
    StageFailed,
    StreamEvent,
    TextDelta,
    Usage,
)
from shoal.models.base import Model, collect, events
from shoal.traces.store import CallRecord, TraceStore

if TYPE_CHECKING:
    from shoal.calls import CallPlan
    from shoal.ledger import Hold
    from shoal.settings import ShadowSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelStats:
    """What is known of one model's calls: typical cost and latency (and quality, if measured).

    Filled from the model's card (price and measured speed) and, when traces exist, from the
    model's recorded calls. `None` means unknown.
    """

    cost_usd: float | None = None
    latency_p50_s: float | None = None
    latency_p95_s: float | None = None
    quality: float | None = None
    calls: int = 0


RouteStats = Mapping[str, ModelStats]

# A typical short call, to turn a card's price and speed into a per-call figure.
TYPICAL_INPUT_TOKENS = 200
TYPICAL_OUTPUT_TOKENS = 50


def card_stats(
    card: ModelCard,
    input_tokens: int = TYPICAL_INPUT_TOKENS,
    output_tokens: int = TYPICAL_OUTPUT_TOKENS,
) -> ModelStats:
    """Per-call cost and latency expected from a card's price and measured speed (a local
    model's cost is its compute time: unknown until measured)."""
    latency = card.seconds_for(input_tokens, output_tokens) if card.measured else None
    if isinstance(card.price, HostPrice) and latency is None:
        return ModelStats()
    usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
    return ModelStats(
        cost_usd=card.cost(usage, latency or 0.0),
        latency_p50_s=latency,
        latency_p95_s=None if latency is None else latency * 1.5,
    )


def trace_stats(
    calls: Iterable[CallRecord], base: RouteStats | None = None
) -> dict[str, ModelStats]:
    """Observed cost and latency percentiles per model from trace records (successful calls)."""
    by_model: dict[str, list[CallRecord]] = {}
    for call in calls:
        if call.status == "ok" and not call.cached:
            by_model.setdefault(call.model, []).append(call)
    merged = dict(base or {})
    for model, rows in by_model.items():
        lat = np.array([r.latency_s for r in rows])
        prior = merged.get(model, ModelStats())
        merged[model] = ModelStats(
            cost_usd=float(np.mean([r.cost_usd for r in rows])),
            latency_p50_s=float(np.percentile(lat, 50)),
            latency_p95_s=float(np.percentile(lat, 95)),
            quality=prior.quality,
            calls=len(rows),
        )
    return merged


def still_allowed(models: Sequence[str], candidates: Sequence[ModelCard]) -> tuple[str, ...]:
    """`models`, in their order, less those the candidates leave out (a latency SLO drops the
    ones too slow for its deadline); an error when none is left."""
    known = {c.id for c in candidates}
    kept = tuple(m for m in models if m in known)
    if not kept:
        raise UnknownModelError(models[0], sorted(known))
    return kept


class Router(ABC):
    """Chooses, per request, which model(s) answer. One required method: `choose`."""

    name: str = "route"
    # True when `choose` does work worth keeping off the event loop (a predictive router embeds
    # the query); the engine then decides in a worker thread.
    blocking: bool = False

    @abstractmethod
    def choose(
        self, request: ChatRequest, candidates: Sequence[ModelCard], stats: RouteStats
    ) -> RouteDecision: ...

    def accept(
        self,
        request: ChatRequest,
        response: ChatResponse,
        earlier: Sequence[ChatResponse] = (),
    ) -> tuple[bool, float]:
        """Whether `response` is good enough to stop a cascade, and the confidence it had.

        Routers that choose one model accept every answer.
        """
        del request, response, earlier
        return True, 1.0

    def prepare(self, request: ChatRequest) -> ChatRequest:
        """The request the chosen models get (a cascade turns log-probabilities on)."""
        return request

    def rename(self, name: str) -> None:
        """The route name decisions carry (set when the router is registered as a route)."""
        self.name = name


LiveSpeed = Callable[[str], Speed | None]


class Watch(Protocol):
    """A shadow of a route, as the route sees it: the model whose answers it samples (None:
    every answer), and who is told of each comparison (served answer, candidate's answer)."""

    only: str | None
    listeners: list[Callable[[str, str], None]]


class Caller(Protocol):
    """What serves a route (the engine): how a route makes a call of its own, planned, charged
    and traced like any other, or has a candidate shadow its answers off the request path."""

    traces: TraceStore

    def shadow(self, route: str, spec: ShadowSpec) -> Watch: ...

    async def plan(
        self, name: str, request: ChatRequest, *, record: str | None = None
    ) -> CallPlan: ...

    async def execute(
        self,
        plan: CallPlan,
        *,
        hold: Hold | None = None,
        run_id: str | None = None,
        step: str | None = None,
        item: str | None = None,
    ) -> ChatResponse: ...


def _unknown(model: str) -> Speed | None:
    return None


class RoutedModel(Model):
    """A route as a model: choose with `router`, call the chosen model(s), report everything."""

    def __init__(
        self,
        name: str,
        router: Router,
        models: Sequence[Model],
        *,
        stats: RouteStats | None = None,
    ) -> None:
        if not models:
            raise ConfigError(f"route {name!r} has no models to choose from")
        self._models = {m.id: m for m in models}
        if len(self._models) != len(models):
            raise ConfigError(f"route {name!r} lists a model twice")
        self.name = name
        self.router = router
        self.router.rename(name)
        self.stats: dict[str, ModelStats] = {m.id: card_stats(m.card) for m in models} | dict(
            stats or {}
        )
        cards = [m.card for m in models]
        self.card = ModelCard(
            id=name,
            context=min(c.context for c in cards),
            runs="local" if all(c.runs == "local" for c in cards) else "api",
            where=f"route over {', '.join(self._models)}",
            # A route has no price of its own: each answer is costed by the model that gave it.
            price=HostPrice(per_hour=0.0),
            capabilities=frozenset.intersection(*(c.capabilities for c in cards)),
        )

    @property
    def candidates(self) -> list[ModelCard]:
        return [m.card for m in self._models.values()]

    def update_stats(self, stats: RouteStats) -> None:
        self.stats.update(stats)

    def bind(self, caller: Caller) -> None:
        """Told of what serves this route (the engine). A route that makes calls of its own, off
        the request path (a specialist route's drift guard has the teacher shadow it), makes
        them through it; most make none."""
        del caller

    def decide(self, request: ChatRequest, live: LiveSpeed = _unknown) -> RouteDecision:
        """The route's choice for `request`: made once per call (`Engine.plan`), then run.

        A model that has answered lately (`live`) is expected to take what this request would
        take at its recent speed, so a deadline is judged on how the model runs now."""
        started = time.perf_counter()
        decision = self.router.choose(request, self.candidates, self._stats_for(request, live))
        unknown = [m for m in decision.models if m not in self._models]
        if unknown:
            raise ConfigError(
                f"route {self.name!r} chose {', '.join(unknown)}, which it does not hold "
                f"(valid: {', '.join(self._models)})"
            )
        if not decision.target_met:
            log.warning("route %s: target not met: %s", self.name, decision.reason)
        return decision.model_copy(update={"decision_s": time.perf_counter() - started})

    def _stats_for(self, request: ChatRequest, live: LiveSpeed) -> RouteStats:
        stats: dict[str, ModelStats] | None = None
        for model_id, model in self._models.items():
            speed = live(model_id)
            if speed is None:
                continue
            stats = stats if stats is not None else dict(self.stats)
            seconds = model.card.expected_seconds(request, speed)
            prior = stats.get(model_id, ModelStats())
            stats[model_id] = replace(prior, latency_p50_s=seconds, latency_p95_s=seconds * 1.5)
        return self.stats if stats is None else stats

    @property
    def blocking(self) -> bool:
        """Whether deciding does work worth keeping off the event loop (embedding a query)."""
        return self.router.blocking

    def worst_case_cost(
        self, request: ChatRequest, decision: RouteDecision, live: LiveSpeed = _unknown
    ) -> float:
        """The most a routed call can cost: every model of the decision (a cascade may call
        them all), each at its own worst case."""
        prepared = self.router.prepare(request)
        return sum(self._models[m].card.worst_case_cost(prepared, live(m)) for m in decision.models)

    def expected_seconds(
        self, request: ChatRequest, decision: RouteDecision, live: LiveSpeed = _unknown
    ) -> float:
        return max(self._models[m].card.expected_seconds(request, live(m)) for m in decision.models)

    async def generate(
        self, request: ChatRequest, decision: RouteDecision | None = None
    ) -> ChatResponse:
        return await collect(self.stream(request, decision, streamed=False), self.name)

    async def stream(
        self,
        request: ChatRequest,
        decision: RouteDecision | None = None,
        *,
        streamed: bool = True,
    ) -> AsyncIterator[StreamEvent]:
        """Run `decision` (made now when none is given); `generate` is this loop, collected.

        Each model of the decision gets what the earlier ones left of the request's cost cap.
        Earlier cascade stages are answered whole (they must be judged): a trusted answer ends
        the call, an untrusted one is announced as `Escalated` and the next model is asked, and
        a retryable failure moves on too. The last model streams (with `streamed`) or answers
        whole.
        """
        if decision is None:
            decision = self.decide(request)
        request = self.router.prepare(request)
        attempts: list[ChatResponse] = []
        for i, model_id in enumerate(decision.models):
            model = self._models[model_id]
            final = i == len(decision.models) - 1
            stage = request
            if request.max_cost_usd is not None:
                spent = sum(a.total_cost_usd for a in attempts)
                stage = request.model_copy(
                    update={"max_cost_usd": max(request.max_cost_usd - spent, 0.0)}
                )
            stage_started = time.perf_counter()
            try:
                if final:
                    answer = cast(
                        AsyncGenerator[StreamEvent, None], events(model, stage, streamed=streamed)
                    )
                    async with contextlib.aclosing(answer):
                        async for event in answer:
                            if isinstance(event, Completed):
                                routed = _routed(event.response, decision, attempts)
                                event = Completed(response=routed)
                            yield event
                    return
                response = await model.generate(stage)
            except ShoalError as exc:
                if final or not exc.retryable:
                    _keep_paid(exc, attempts, model_id)
                    raise
                log.warning("route %s: %s failed (%s); trying the next", self.name, model_id, exc)
                yield StageFailed(
                    model=model_id,
                    error=f"{type(exc).__name__}: {exc}",
                    before_work=exc.before_work,
                    seconds=time.perf_counter() - stage_started,
                )
                continue
            if self.router.accept(request, response, attempts)[0]:
                done = _routed(response, decision, attempts)
                if done.text:
                    yield TextDelta(text=done.text, logprobs=done.logprobs or ())
                yield Completed(response=done)
                return
            attempts.append(response)
            yield Escalated(response=response)

    async def load(self) -> None:
        for model in self._models.values():
            await model.load()

    async def aclose(self) -> None:
        return None  # the models belong to the fleet, which closes them


def _routed(
    response: ChatResponse, decision: RouteDecision, attempts: list[ChatResponse]
) -> ChatResponse:
    return response.model_copy(update={"decision": decision, "attempts": tuple(attempts)})


def _keep_paid(exc: ShoalError, attempts: list[ChatResponse], model_id: str) -> None:
    """A route's call failed after earlier stages answered: they were paid for, so the error
    carries them (with the wrong-form answer when there is one) for the trace and the budget,
    and names the model that failed."""
    exc.model_id = exc.model_id or model_id
    if not attempts:
        return
    if isinstance(exc, OutputError) and exc.response is not None:
        exc.response = exc.response.model_copy(update={"attempts": tuple(attempts)})
    else:
        exc.attempts = tuple(attempts)
