"""Cascades: answer with the cheapest model, escalate while the answer is not trusted.

A cascade's decision lists its models cheapest first; `RoutedModel` asks them in turn and stops
at the first answer `accept` trusts. Three ways to trust an answer:

- `LogprobSignal`: the model's own token probabilities (free with local models, which return
  them when the request asks `logprobs=True`; the cascade asks on the caller's behalf).
- `AgreementSignal`: two cheap models (or samples) gave the same answer.
- `ScorerSignal`: a learned P(correct | query, answer features), fit on an outcome table.

Every call of a cascade is costed: the escalated-from answers come back in `attempts`.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

from shoal.cards import ModelCard
from shoal.errors import ConfigError
from shoal.messages import ChatRequest, ChatResponse, Estimate, RouteDecision
from shoal.routing.base import ModelStats, Router, RouteStats, still_allowed
from shoal.routing.confidence import Mode, logprob_confidence


class ConfidenceSignal(ABC):
    """How much to trust one answer, in [0, 1]. One required method."""

    needs_logprobs: bool = False

    @abstractmethod
    def confidence(
        self, request: ChatRequest, response: ChatResponse, earlier: Sequence[ChatResponse]
    ) -> float: ...


class LogprobSignal(ConfidenceSignal):
    """The probability the model gave its own answer (first token, geometric mean, or min)."""

    needs_logprobs = True

    def __init__(self, mode: Mode = "first") -> None:
        self.mode = mode

    def confidence(
        self, request: ChatRequest, response: ChatResponse, earlier: Sequence[ChatResponse]
    ) -> float:
        del request, earlier
        return logprob_confidence(response.logprobs, self.mode)


def normalise_answer(text: str) -> str:
    """Lower-case words and numbers only, for comparing two answers."""
    return " ".join(re.findall(r"[a-z0-9]+(?:\.[0-9]+)?", text.lower()))


class AgreementSignal(ConfidenceSignal):
    """1 when this answer agrees with an earlier stage's, else 0 (a first answer is never
    trusted alone). `extract` maps an answer to what must agree (default: its normalised text).
    """

    def __init__(self, extract: Callable[[str], str | None] | None = None) -> None:
        self.extract = extract or normalise_answer

    def confidence(
        self, request: ChatRequest, response: ChatResponse, earlier: Sequence[ChatResponse]
    ) -> float:
        del request
        mine = self.extract(response.text)
        if mine is None or not earlier:
            return 0.0
        return float(any(self.extract(e.text) == mine for e in earlier))


class ScorerSignal(ConfidenceSignal):
    """A learned P(correct) from the query and the answer: logistic regression on features.

    `features(request, response)` returns a vector (e.g. the query embedding, the answer's
    token confidence and length); `weights` and `bias` come from `fit`.
    """

    needs_logprobs = True

    def __init__(
        self,
        features: Callable[[ChatRequest, ChatResponse], npt.NDArray[np.float64]],
        weights: Mapping[str, tuple[npt.NDArray[np.float64], float]] | None = None,
    ) -> None:
        self.features = features
        self.weights = dict(weights or {})

    @staticmethod
    def fit_one(
        x: npt.NDArray[np.float64], y: npt.NDArray[np.float64], l2: float = 1.0
    ) -> tuple[npt.NDArray[np.float64], float]:
        from shoal.routing.predictive import fit_logistic

        w, b = fit_logistic(x, y[:, None], l2=l2)
        return w[:, 0], float(b[0])

    def confidence(
        self, request: ChatRequest, response: ChatResponse, earlier: Sequence[ChatResponse]
    ) -> float:
        del earlier
        if response.model not in self.weights:
            raise ConfigError(f"the scorer was not fit for model {response.model!r}")
        w, b = self.weights[response.model]
        z = float(self.features(request, response) @ w + b)
        return float(1.0 / (1.0 + np.exp(-z)))


class CascadeRouter(Router):
    """Cheapest first; accept an answer when its confidence reaches that model's threshold.

    `models` is the escalation order; `thresholds[m]` applies to every model but the last (whose
    answer is always kept). Thresholds come from `shoal route calibrate` or are set by hand.
    """

    def __init__(
        self,
        models: Sequence[str],
        signal: ConfidenceSignal,
        thresholds: Mapping[str, float] | float = 0.5,
    ) -> None:
        if len(models) < 2:
            raise ConfigError("a cascade needs at least two models")
        self.models = tuple(models)
        self.signal = signal
        if isinstance(thresholds, int | float):
            thresholds = {m: float(thresholds) for m in self.models[:-1]}
        self.thresholds = dict(thresholds)
        missing = [m for m in self.models[:-1] if m not in self.thresholds]
        if missing:
            raise ConfigError(f"cascade thresholds missing for {', '.join(missing)}")

    def choose(
        self, request: ChatRequest, candidates: Sequence[ModelCard], stats: RouteStats
    ) -> RouteDecision:
        del request
        models = still_allowed(self.models, candidates)  # a latency SLO may leave out some
        steps = ", then ".join(
            f"{m} (kept if confidence >= {self.thresholds[m]:.2f})" for m in models[:-1]
        )
        estimates = []
        for model in models:
            s = stats.get(model, ModelStats())
            estimates.append(
                Estimate(
                    model=model,
                    quality=s.quality,
                    cost_usd=s.cost_usd,
                    latency_s=s.latency_p95_s,
                    note="last resort" if model == models[-1] else "",
                )
            )
        reason = f"cascade: {steps}, else {models[-1]}" if steps else f"cascade: only {models[0]}"
        return RouteDecision(
            route=self.name, models=models, reason=reason, estimates=tuple(estimates)
        )

    def accept(
        self,
        request: ChatRequest,
        response: ChatResponse,
        earlier: Sequence[ChatResponse] = (),
    ) -> tuple[bool, float]:
        confidence = self.signal.confidence(request, response, earlier)
        threshold = self.thresholds.get(response.model, 1.0)
        return confidence >= threshold, confidence

    def prepare(self, request: ChatRequest) -> ChatRequest:
        """The request with log-probabilities turned on when the signal reads them."""
        if self.signal.needs_logprobs and not request.logprobs:
            return request.model_copy(update={"logprobs": True})
        return request
