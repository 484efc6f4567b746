"""Routes from the fleet file's `routes:` section, built into `RoutedModel`s.

```yaml
routes:
  - name: answer                 # a name, never parameters: the target lives below
    kind: predictive             # fixed | fallback | cascade | predictive | specialist
    models: [smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b]
    target: {quality_ratio: 0.95}
    deadline_s: 10               # optional latency SLO (p95)
  - name: cheap-first
    kind: cascade
    models: [qwen2.5-coder-0.5b, qwen2.5-coder-1.5b]
    signal: logprob
    threshold: 0.6
```

A predictive route is fit by `shoal route calibrate NAME`, which stores its calibrated state in
the cache folder under the route's name and a hash of its settings, so a changed target or model
list needs a new calibration (an error says so) instead of silently using stale numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shoal.cards import ModelCard
from shoal.errors import ConfigError, UnknownModelError
from shoal.fleet import Fleet
from shoal.messages import ChatRequest, ChatResponse, RouteDecision
from shoal.routing import predictive
from shoal.routing.base import RoutedModel, Router, RouteStats, trace_stats
from shoal.routing.calibrate import Calibration, Target, calibrate_predictive
from shoal.routing.cascade import AgreementSignal, CascadeRouter, LogprobSignal
from shoal.routing.importers import load as load_table
from shoal.routing.outcomes import OutcomeTable
from shoal.routing.policies import FallbackRouter, FixedRouter, LatencySLORouter
from shoal.routing.predictive import Featurizer, PredictiveRouter
from shoal.routing.report import write_report
from shoal.settings import (
    CascadeRouteSpec,
    FallbackRouteSpec,
    FixedRouteSpec,
    PredictiveRouteSpec,
    RouteSpec,
    SpecialistRouteSpec,
)
from shoal.traces.store import TraceStore

log = logging.getLogger(__name__)


def route_state_path(spec: PredictiveRouteSpec, cache_dir: Path) -> Path:
    digest = hashlib.sha256(
        json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()
    ).hexdigest()[:12]
    return cache_dir / "routes" / f"{spec.name}-{digest}.npz"


def default_outcomes(cache_dir: Path) -> Path:
    return cache_dir / "outcomes" / "local.csv"


class CalibratedRouter(Router):
    """A predictive route whose calibrated state (and the embedder) load on first use."""

    blocking = True  # choosing embeds the query (and the first choice loads the embedder)

    def __init__(self, spec: PredictiveRouteSpec, cache_dir: Path) -> None:
        self._loading = threading.Lock()
        self.spec = spec
        self.cache_dir = cache_dir
        self.path = route_state_path(spec, cache_dir)
        self._router: PredictiveRouter | None = None
        self._featurizer: Featurizer | None = None

    @property
    def router(self) -> PredictiveRouter:
        with self._loading:  # decisions run in worker threads: load once
            return self._load()

    def _load(self) -> PredictiveRouter:
        if self._router is None:
            if not self.path.is_file():
                raise ConfigError(
                    f"route {self.spec.name!r} is not calibrated for its current settings; run: "
                    f"shoal route calibrate {self.spec.name}"
                )
            self._featurizer = predictive.minilm_featurizer(self.cache_dir, cached=False)
            self._router = PredictiveRouter.load(self.path, self._featurizer)
            self._router.min_quality = self.spec.min_quality
            self._router.rename(self.name)
        return self._router

    def choose(
        self, request: ChatRequest, candidates: Sequence[ModelCard], stats: RouteStats
    ) -> RouteDecision:
        return self.router.choose(request, candidates, stats)


def _check_models(models: Sequence[str], fleet: Fleet, route: str) -> None:
    for model in models:
        if model not in fleet.ids:
            raise ConfigError(f"route {route!r}: {UnknownModelError(model, fleet.ids)}")


def make_router(spec: RouteSpec, fleet: Fleet) -> tuple[Router, list[str]]:
    """The router a spec describes, and the models it may choose from."""
    router: Router
    if isinstance(spec, FixedRouteSpec):
        models = [spec.model]
        router = FixedRouter(spec.model)
    elif isinstance(spec, FallbackRouteSpec):
        models = list(spec.models)
        router = FallbackRouter(spec.models)
    elif isinstance(spec, CascadeRouteSpec):
        models = list(spec.models)
        signal = LogprobSignal() if spec.signal == "logprob" else AgreementSignal()
        router = CascadeRouter(spec.models, signal, spec.threshold)
    elif isinstance(spec, SpecialistRouteSpec):
        from shoal.routing.specialist import specialist_router

        models = [spec.specialist, spec.teacher]
        _check_models(models, fleet, spec.name)
        router = specialist_router(spec, fleet)
    else:
        models = list(spec.models)
        router = CalibratedRouter(spec, fleet.cache_dir)
    _check_models(models, fleet, spec.name)
    if spec.deadline_s is not None:
        router = LatencySLORouter(router, spec.deadline_s)
    return router, models


def build_route(spec: RouteSpec, fleet: Fleet, *, traces: TraceStore | None = None) -> RoutedModel:
    """A `RoutedModel` over the fleet's models; latency and cost figures from the cards, and
    from recorded calls when a trace store is given."""
    router, models = make_router(spec, fleet)
    stats = trace_stats(traces.calls(limit=20_000)) if traces is not None else {}
    if isinstance(spec, SpecialistRouteSpec):
        from shoal.routing.specialist import SpecialistRoute

        return SpecialistRoute(
            spec.name,
            router,
            [fleet.model(m) for m in models],
            stats={m: s for m, s in stats.items() if m in models},
        )
    return RoutedModel(
        spec.name,
        router,
        [fleet.model(m) for m in models],
        stats={m: s for m, s in stats.items() if m in models},
    )


def calibrate_route(
    spec: PredictiveRouteSpec,
    fleet: Fleet,
    *,
    outcomes: Path | str | None = None,
    seed: int = 0,
    featurizer: Featurizer | None = None,
    cost_mode: str = "learned",
    confidence_z: float = 1.0,
) -> Calibration:
    """Fit a predictive route on the table's train split, check it on the test split, save it
    where the route loads it from (`extra["saved"]`).

    `outcomes`: a table file or an importer name (`routerbench:arc_challenge`, ...).
    """
    source = outcomes or spec.outcomes or default_outcomes(fleet.cache_dir)
    target = Target.model_validate(spec.target.model_dump())
    cal = fit_route(
        load_table(source),
        list(spec.models),
        spec.predictor,
        target,
        route_state_path(spec, fleet.cache_dir),
        featurizer=featurizer or predictive.minilm_featurizer(fleet.cache_dir),
        cost_mode=cost_mode,
        seed=seed,
        min_quality=spec.min_quality,
        confidence_z=confidence_z,
    )
    cal.extra["outcomes"] = str(source)
    return cal


def fit_route(
    table: OutcomeTable,
    models: Sequence[str],
    kind: str,
    target: Target,
    save_to: Path,
    *,
    featurizer: Featurizer,
    cost_mode: str = "learned",
    seed: int = 0,
    min_quality: float | None = None,
    confidence_z: float = 1.0,
) -> Calibration:
    """Calibrate a predictive route of `kind` over `models` on `table` and save it to `save_to`
    (load it with `PredictiveRouter.load`).

    Splits: the table's own `split` column when it has train and test rows, else a seeded
    50/50 split by query. `confidence_z`: the margin asked of the target (`pick_confident`).
    """
    table = table.select_models(list(models))
    table.check_routable()
    if {"train", "test"} <= set(table.splits):
        train, test = table.split("train"), table.split("test")
    else:
        train, test = table.random_split(0.5, seed=seed)
    fit = calibrate_predictive(
        train,
        featurizer(train.prompts),
        target,
        kind=kind,
        cost_mode=cost_mode,
        test=test,
        x_test=featurizer(test.prompts),
        seed=seed,
        confidence_z=confidence_z,
    )
    router = PredictiveRouter(
        list(models),
        featurizer,
        fit.predictor,
        lam=fit.lam,
        ref_cost=fit.ref_cost,
        cost_mode="known" if cost_mode == "known" else "learned",
        cost_regressor=fit.cost_regressor,
        min_quality=min_quality,
        target=target.describe(),
        target_met=fit.calibration.met,
        fallback=None if fit.fallback is None else train.models[fit.fallback],
    )
    router.save(save_to)
    fit.calibration.extra.update(
        {"saved": str(save_to), "train_queries": len(train), "test_queries": len(test)}
    )
    write_report(save_to, fit.calibration, test)  # for the dashboard's routes page
    return fit.calibration


def explain(decision: RouteDecision, response: ChatResponse | None = None) -> dict[str, Any]:
    """A decision as plain data, for `shoal route explain --json`."""
    data = decision.model_dump(mode="json")
    if response is not None:
        data["answer"] = {"model": response.model, "text": response.text}
    return data
