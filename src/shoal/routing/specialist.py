"""Specialist routes: a cascade whose first stage is a specialist, trusted above its threshold.

A specialist (`shoal.specialists`) returns its calibrated confidence as its answer's one
log-probability; `SpecialistSignal` reads it. `SpecialistRouter` is a `CascadeRouter` over
(specialist, teacher) whose threshold is the one `shoal distil` calibrated to the route's quality
target, so every call is planned, charged and traced as a cascade's: the specialist's answer is
kept when its confidence clears the threshold, else the call escalates to the teacher.

When the specialist cannot serve (its file is damaged, its embedder changed since training, the
request is not in the form it was trained on, or the drift guard switched it off), the decision
names the teacher alone and says why. The drift guard (`drift.py`) has the teacher shadow a
share of the specialist's answers, off the request path.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from shoal.cards import ModelCard
from shoal.errors import ConfigError, ShoalError
from shoal.fleet import Fleet
from shoal.messages import ChatRequest, ChatResponse, RouteDecision
from shoal.models.base import Model
from shoal.routing.base import Caller, RoutedModel, Router, RouteStats
from shoal.routing.cascade import CascadeRouter, ConfidenceSignal
from shoal.routing.confidence import logprob_confidence
from shoal.routing.drift import DriftGuard
from shoal.routing.policies import LatencySLORouter
from shoal.settings import SpecialistRouteSpec
from shoal.specialists.model import Specialist

log = logging.getLogger(__name__)


class SpecialistSignal(ConfidenceSignal):
    """The specialist's calibrated confidence in its answer (its one log-probability). The
    teacher is never asked for log-probabilities."""

    def confidence(
        self, request: ChatRequest, response: ChatResponse, earlier: Sequence[ChatResponse]
    ) -> float:
        del request, earlier
        return logprob_confidence(response.logprobs, "first")


class SpecialistRouter(CascadeRouter):
    """(specialist, teacher): the specialist's answer is kept when its confidence is at least
    the threshold its file holds; the teacher answers otherwise, and whenever the specialist
    cannot serve (the decision says why)."""

    blocking = True  # the first decision reads the specialist's file

    def __init__(self, specialist: Specialist, teacher: str, guard: DriftGuard) -> None:
        super().__init__((specialist.id, teacher), SpecialistSignal(), 1.0)
        self.specialist = specialist
        self.teacher = teacher
        self.guard = guard
        self._warned: str | None = None

    def why_not(self, request: ChatRequest) -> str | None:
        """Why the specialist should not take `request` (None: it may)."""
        try:
            trained = self.specialist.trained()
            self.thresholds[self.specialist.id] = trained.threshold
            why = self.specialist.covers(request) or self.guard.off_reason
        except ShoalError as exc:
            why = f"{type(exc).__name__}: {exc}"
            if why != self._warned:  # once per reason, not per call
                log.warning("route %s: specialist not used: %s", self.name, why)
                self._warned = why
        return why

    def choose(
        self, request: ChatRequest, candidates: Sequence[ModelCard], stats: RouteStats
    ) -> RouteDecision:
        decision = super().choose(request, candidates, stats)
        why = self.why_not(request)
        if why is not None:
            return decision.model_copy(
                update={
                    "models": (self.teacher,),
                    "estimates": tuple(e for e in decision.estimates if e.model == self.teacher),
                    "reason": f"{self.teacher}: specialist {self.specialist.id} not used ({why})",
                }
            )
        trained = self.specialist.trained()
        held = trained.meta["report"]["heldout"]
        reason = (
            f"specialist {self.specialist.id} answers when its calibrated confidence is "
            f">= {trained.threshold:.3f}, else {self.teacher} (calibrated for "
            f"{trained.target.describe()}; on held-out data it answered {held['coverage']:.0%}"
            f" of calls at a quality of {held['quality']:.3f})"
        )
        return decision.model_copy(update={"reason": reason})


def specialist_router(spec: SpecialistRouteSpec, fleet: Fleet) -> SpecialistRouter:
    """The router of a specialist route of the fleet file (its specialist must be one)."""
    specialist = fleet.model(spec.specialist)
    if not isinstance(specialist, Specialist):
        raise ConfigError(
            f"route {spec.name!r}: {spec.specialist!r} is not a specialist (kind: specialist in "
            "`models:`, as `shoal distil` writes it)"
        )
    guard = DriftGuard(spec.name, specialist, spec.teacher, spec.drift)
    return SpecialistRouter(specialist, spec.teacher, guard)


class SpecialistRoute(RoutedModel):
    """A specialist route as a model: the cascade of `SpecialistRouter` (under a latency SLO,
    when the route has a deadline), whose drift guard the engine serving it runs."""

    def __init__(
        self,
        name: str,
        router: Router,
        models: Sequence[Model],
        *,
        stats: RouteStats | None = None,
    ) -> None:
        super().__init__(name, router, models, stats=stats)
        inner = router.inner if isinstance(router, LatencySLORouter) else router
        if not isinstance(inner, SpecialistRouter):
            raise ConfigError(f"route {name!r}: a specialist route needs a specialist router")
        self.specialist_router = inner

    @property
    def guard(self) -> DriftGuard:
        return self.specialist_router.guard

    def bind(self, caller: Caller) -> None:
        self.guard.bind(caller)
