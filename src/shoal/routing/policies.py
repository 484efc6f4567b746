"""Simple routing policies: a fixed model, a fallback chain, and a latency SLO filter."""

from __future__ import annotations

from collections.abc import Sequence

from shoal.cards import ModelCard
from shoal.errors import ConfigError, UnknownModelError
from shoal.messages import ChatRequest, ChatResponse, Estimate, RouteDecision
from shoal.routing.base import ModelStats, Router, RouteStats, still_allowed


def _estimate(
    card: ModelCard, stats: RouteStats, *, eligible: bool = True, note: str = ""
) -> Estimate:
    s = stats.get(card.id, ModelStats())
    return Estimate(
        model=card.id,
        quality=s.quality,
        cost_usd=s.cost_usd,
        latency_s=s.latency_p95_s,
        eligible=eligible,
        note=note,
    )


def _require(models: Sequence[str], candidates: Sequence[ModelCard]) -> None:
    known = [c.id for c in candidates]
    for model in models:
        if model not in known:
            raise UnknownModelError(model, known)


class FixedRouter(Router):
    """Always the same model."""

    def __init__(self, model: str) -> None:
        self.model = model

    def choose(
        self, request: ChatRequest, candidates: Sequence[ModelCard], stats: RouteStats
    ) -> RouteDecision:
        del request
        _require([self.model], candidates)
        return RouteDecision(
            route=self.name,
            models=(self.model,),
            reason=f"fixed route: always {self.model}",
            estimates=tuple(_estimate(c, stats) for c in candidates if c.id == self.model),
        )


class FallbackRouter(Router):
    """The first model of a chain; the next one only when the previous fails retryably."""

    def __init__(self, chain: Sequence[str]) -> None:
        if not chain:
            raise ConfigError("a fallback chain needs at least one model")
        self.chain = tuple(chain)

    def choose(
        self, request: ChatRequest, candidates: Sequence[ModelCard], stats: RouteStats
    ) -> RouteDecision:
        del request
        chain = still_allowed(self.chain, candidates)
        by_id = {c.id: c for c in candidates}
        return RouteDecision(
            route=self.name,
            models=chain,
            reason=(
                f"fallback chain: {chain[0]}"
                + (f", then {', '.join(chain[1:])} on retryable errors" if len(chain) > 1 else "")
            ),
            estimates=tuple(_estimate(by_id[m], stats) for m in chain),
        )


class LatencySLORouter(Router):
    """Only models whose p95 latency fits the deadline; among them, `inner` chooses.

    Unknown latency counts as not fitting. When no model fits, the fastest known one is chosen
    (the first listed when none has a measured latency) and the decision says the deadline is
    not met (`target_met=False`), never a silent pick.
    """

    def __init__(self, inner: Router, deadline_s: float) -> None:
        if deadline_s <= 0:
            raise ConfigError("a latency SLO needs a positive deadline")
        self.inner = inner
        self.deadline_s = deadline_s
        self.blocking = inner.blocking

    def rename(self, name: str) -> None:
        self.name = name
        self.inner.rename(name)

    def accept(
        self,
        request: ChatRequest,
        response: ChatResponse,
        earlier: Sequence[ChatResponse] = (),
    ) -> tuple[bool, float]:
        """The inner router judges answers (a cascade under a deadline still escalates)."""
        return self.inner.accept(request, response, earlier)

    def prepare(self, request: ChatRequest) -> ChatRequest:
        return self.inner.prepare(request)

    def fits(self, card: ModelCard, stats: RouteStats) -> bool:
        p95 = stats.get(card.id, ModelStats()).latency_p95_s
        return p95 is not None and p95 <= self.deadline_s

    def choose(
        self, request: ChatRequest, candidates: Sequence[ModelCard], stats: RouteStats
    ) -> RouteDecision:
        fitting = [c for c in candidates if self.fits(c, stats)]
        if fitting:
            decision = self.inner.choose(request, fitting, stats)
            dropped = [c.id for c in candidates if c not in fitting]
            if not dropped:
                return decision
            notes = tuple(
                _estimate(c, stats, eligible=False, note=f"p95 latency over {self.deadline_s:g} s")
                for c in candidates
                if c.id in dropped
            )
            return decision.model_copy(
                update={
                    "reason": f"{decision.reason}; too slow for the {self.deadline_s:g} s "
                    f"deadline: {', '.join(dropped)}",
                    "estimates": decision.estimates + notes,
                }
            )
        known = [
            (p95, c.id)
            for c in candidates
            if (p95 := stats.get(c.id, ModelStats()).latency_p95_s) is not None
        ]
        if not known:
            chosen = candidates[0].id
            why = f"no model has a measured latency; chose the first listed, {chosen}"
        else:
            chosen = min(known)[1]
            why = f"no model's p95 latency fits {self.deadline_s:g} s; chose the fastest, {chosen}"
        return RouteDecision(
            route=self.name,
            models=(chosen,),
            reason=f"{why} (deadline NOT met)",
            estimates=tuple(_estimate(c, stats, eligible=False) for c in candidates),
            target_met=False,
        )
