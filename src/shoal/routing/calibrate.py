"""Quality targets, not raw thresholds: fit a route's one knob to what the user states.

A `Target` is "≥ 95% of the best single model's quality", an absolute quality, or a cost cap.
`calibrate_predictive` fits the predictor on the calibration (train) split, gets honest
out-of-fold predictions there, picks the cheapest cost weight λ whose out-of-fold quality meets
the target, and reports what that λ achieves on the held-out split, with bootstrap intervals.
When no λ meets the target on the calibration split, the route falls back to one model for
every query (the best single model on the calibration split; the cheapest, for a cost cap)
and says so: `met=False` and `fallback`, which routes carry into every decision. Fitting also
checks the router's input (`diagnose`): warnings land in `Calibration.extra["warnings"]`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shoal.errors import ConfigError
from shoal.routing.diagnose import embedding_warnings, prediction_warnings
from shoal.routing.evaluate import (
    Curve,
    Reference,
    bootstrap_ci,
    cascade_choices,
    lambda_grid,
    predictive_curve,
    preroute_cascade_choices,
)
from shoal.routing.outcomes import OutcomeTable
from shoal.routing.predictive import CostRegressor, Predictor, choose_index, make_predictor

Array = npt.NDArray[np.float64]
log = logging.getLogger(__name__)


class Target(BaseModel):
    """What a route must achieve. Exactly one of the fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    quality_ratio: float | None = Field(default=None, gt=0.0, le=1.0)
    min_quality: float | None = Field(default=None, ge=0.0, le=1.0)
    max_cost_ratio: float | None = Field(default=None, gt=0.0)

    @model_validator(mode="after")
    def _one(self) -> Target:
        given = [v for v in (self.quality_ratio, self.min_quality, self.max_cost_ratio) if v]
        if len(given) != 1:
            raise ValueError("give exactly one of quality_ratio, min_quality, max_cost_ratio")
        return self

    def describe(self) -> str:
        if self.quality_ratio is not None:
            return f"≥ {self.quality_ratio:.0%} of the best model's quality"
        if self.min_quality is not None:
            return f"quality ≥ {self.min_quality:.2f}"
        return f"cost ≤ {self.max_cost_ratio:.0%} of the best model's"

    def met(self, quality: float, cost: float, ref: Reference) -> bool:
        if self.quality_ratio is not None:
            return quality >= self.quality_ratio * ref.q_best - 1e-12
        if self.min_quality is not None:
            return quality >= self.min_quality - 1e-12
        assert self.max_cost_ratio is not None
        return cost <= self.max_cost_ratio * ref.c_best + 1e-15


def fallback_model(target: Target, ref: Reference) -> int:
    """The one model a route sends every query to when calibration misses its target: the best
    single model for a quality target, the cheapest for a cost cap."""
    return ref.cheap if target.max_cost_ratio is not None else ref.best


def pick_setting(curve: Curve, target: Target, ref: Reference) -> tuple[int, bool]:
    """Index of the setting to use: the cheapest meeting a quality target (or the best quality
    within a cost cap). Not met: the highest-quality setting, flagged."""
    ok = [i for i in range(len(curve.cost)) if target.met(curve.quality[i], curve.cost[i], ref)]
    if not ok:
        if target.max_cost_ratio is not None:
            return int(np.argmin(curve.cost)), False
        return int(np.argmax(curve.quality)), False
    if target.max_cost_ratio is not None:
        return max(ok, key=lambda i: (curve.quality[i], -curve.cost[i])), True
    return min(ok, key=lambda i: (curve.cost[i], -curve.quality[i])), True


@dataclass
class Heldout:
    """What a calibrated setting achieves on queries it never saw, with 95% intervals."""

    quality: float
    quality_ci: tuple[float, float]
    cost: float
    cost_ci: tuple[float, float]
    quality_ratio: float
    cost_ratio: float
    best_share: float
    met: bool

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass
class Calibration:
    target: Target
    setting: float
    met: bool
    calib_quality: float
    calib_quality_ci: tuple[float, float]
    calib_cost_ratio: float
    heldout: Heldout | None = None
    test_curve: Curve | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    fallback: str = ""  # the model every query goes to when the target was not met

    @property
    def warnings(self) -> list[str]:
        return list(self.extra.get("warnings", []))

    def warn(self, messages: Sequence[str]) -> None:
        for message in messages:
            log.warning("%s", message)
        self.extra["warnings"] = [*self.warnings, *messages]

    def summary(self) -> dict[str, Any]:
        return {
            "target": self.target.describe(),
            "setting": self.setting,
            "met_on_calibration": self.met,
            "fallback": self.fallback or None,
            "calibration_quality": self.calib_quality,
            "calibration_quality_ci": self.calib_quality_ci,
            "calibration_cost_ratio": self.calib_cost_ratio,
            "heldout": self.heldout.as_dict() if self.heldout else None,
            **self.extra,
        }


def heldout_report(
    table: OutcomeTable, cost: Array, score: Array, final: npt.NDArray[np.intp], target: Target
) -> Heldout:
    ref = Reference.of(table)
    q, c = float(score.mean()), float(cost.mean())
    return Heldout(
        quality=q,
        quality_ci=bootstrap_ci(score),
        cost=c,
        cost_ci=bootstrap_ci(cost),
        quality_ratio=q / ref.q_best if ref.q_best else float("nan"),
        cost_ratio=c / ref.c_best,
        best_share=float((final == ref.best).mean()),
        met=target.met(q, c, ref),
    )


# -- predictive routes ---------------------------------------------------------------------------


@dataclass
class PredictiveFit:
    predictor: Predictor
    cost_regressor: CostRegressor | None
    lam: float
    ref_cost: float
    calibration: Calibration
    fallback: int | None = None  # column of the model every query goes to (target not met)
    # The predictions behind the fit: out-of-fold on the calibration split, and on the test one.
    quality_oof: Array | None = None
    cost_oof: Array | None = None
    quality_test: Array | None = None
    cost_test: Array | None = None


def out_of_fold(x: Array, y: Array, kind: str, *, folds: int = 5, seed: int = 0) -> Array:
    """Predictions for every row from a predictor that never saw that row."""
    n = len(x)
    if n < folds * 2:
        raise ConfigError(f"{n} calibration queries are too few for {folds}-fold calibration")
    order = np.random.default_rng(seed).permutation(n)
    pred = np.zeros_like(y, dtype=np.float64)
    for k in range(folds):
        hold = order[k::folds]
        keep = np.setdiff1d(order, hold)
        pred[hold] = make_predictor(kind).fit(x[keep], y[keep]).predict(x[hold])
    return pred


def calibrate_predictive(
    train: OutcomeTable,
    x_train: Array,
    target: Target,
    *,
    kind: str = "ensemble",
    cost_mode: str = "learned",
    test: OutcomeTable | None = None,
    x_test: Array | None = None,
    predictor_factory: Callable[[], Predictor] | None = None,
    lams: Sequence[float] | None = None,
    seed: int = 0,
    confidence_z: float = 0.0,
) -> PredictiveFit:
    """Fit a predictive route on `train` to `target`; report it on `test` when given.

    `cost_mode="known"`: each query's cost per model is known before the call (token prices of
    a fixed-length answer), so the table's own costs are used; `"learned"`: a ridge regression
    of cost on the query features predicts it.

    `confidence_z` > 0 asks more of a quality target than meeting it on average over the
    calibration split: see `pick_confident`.
    """
    train.check_routable()
    lams = list(lams if lams is not None else lambda_grid())
    ref = Reference.of(train)
    ref_cost = ref.c_hi
    warnings = embedding_warnings(x_train)
    quality_oof = out_of_fold(x_train, train.scores, kind, seed=seed)
    regressor = None
    if cost_mode == "known":
        cost_oof = train.costs
    else:
        folds = 5
        order = np.random.default_rng(seed + 1).permutation(len(train))
        cost_oof = np.zeros_like(train.costs)
        for k in range(folds):
            hold = order[k::folds]
            keep = np.setdiff1d(order, hold)
            cost_oof[hold] = (
                CostRegressor().fit(x_train[keep], train.costs[keep]).predict(x_train[hold])
            )
        regressor = CostRegressor().fit(x_train, train.costs)
    curve = predictive_curve(train, quality_oof, cost_oof, ref_cost, "calibration", lams)
    index, met = pick_setting(curve, target, ref)
    if confidence_z > 0 and target.max_cost_ratio is None:
        rows = np.arange(len(train))
        per_setting = [
            train.scores[rows, choose_index(quality_oof, cost_oof, lam, ref_cost)]
            for lam in curve.settings
        ]
        index, met = pick_confident(
            per_setting, curve.cost, train.scores[:, ref.best], target, confidence_z
        )
    lam = curve.settings[index]
    fallback = None if met else fallback_model(target, ref)
    chosen = choose_index(quality_oof, cost_oof, lam, ref_cost)
    if fallback is not None:
        chosen = np.full(len(train), fallback, dtype=np.intp)
    rows = np.arange(len(train))
    calib = Calibration(
        target=target,
        setting=lam,
        met=met,
        calib_quality=float(train.scores[rows, chosen].mean()),
        calib_quality_ci=bootstrap_ci(train.scores[rows, chosen]),
        calib_cost_ratio=float(train.costs[rows, chosen].mean() / ref.c_best),
        fallback="" if fallback is None else train.models[fallback],
    )
    points = zip(curve.cost, curve.quality, strict=True)
    distinct = len({(round(c, 12), round(q, 12)) for c, q in points})
    calib.warn(
        [*warnings, *prediction_warnings(quality_oof, train.models, distinct_routes=distinct)]
    )
    predictor = (predictor_factory or (lambda: make_predictor(kind)))().fit(x_train, train.scores)
    fit = PredictiveFit(predictor, regressor, lam, ref_cost, calib, fallback, quality_oof, cost_oof)
    if test is not None and x_test is not None:
        q_test = predictor.predict(x_test)
        c_test = test.costs if cost_mode == "known" else regressor.predict(x_test)  # type: ignore[union-attr]
        fit.quality_test, fit.cost_test = q_test, c_test
        pick = choose_index(q_test, c_test, lam, ref_cost)
        if fallback is not None:
            pick = np.full(len(test), fallback, dtype=np.intp)
        t_rows = np.arange(len(test))
        calib.heldout = heldout_report(
            test, test.costs[t_rows, pick], test.scores[t_rows, pick], pick, target
        )
        calib.test_curve = predictive_curve(test, q_test, c_test, ref_cost, f"{kind} router", lams)
    return fit


def pick_confident(
    scores: Sequence[Array], costs: Array, best: Array, target: Target, z: float
) -> tuple[int, bool]:
    """The cheapest setting whose per-query margin over a quality target, minus `z` standard
    errors, is still ≥ 0 (z = 1: met with ~84% confidence on queries like these).
    `scores[i]`: per-query scores of setting i; `best`: the best model's per-query scores."""
    ok = []
    for i, got in enumerate(scores):
        if target.quality_ratio is not None:
            margin = got - target.quality_ratio * best
        else:
            assert target.min_quality is not None
            margin = got - target.min_quality
        if margin.mean() - z * margin.std(ddof=1) / np.sqrt(len(margin)) >= 0:
            ok.append(i)
    if not ok:
        return int(np.argmax([s.mean() for s in scores])), False
    return min(ok, key=lambda i: (costs[i], -scores[i].mean())), True


# -- cascades ------------------------------------------------------------------------------------


def calibrate_cascade(
    train: OutcomeTable,
    order: Sequence[int],
    target: Target,
    *,
    test: OutcomeTable | None = None,
    thresholds: Sequence[float] | None = None,
    confidence_z: float = 0.0,
) -> Calibration:
    """One confidence threshold for every stage, fit on `train`'s confidence column
    (`confidence_z`: see `pick_confident`)."""
    train.check_routable()
    ref = Reference.of(train)
    grid = list(thresholds if thresholds is not None else np.linspace(0, 1.0001, 101))
    pts = [cascade_choices(train, order, t) for t in grid]
    curve = Curve(
        "calibration",
        np.array([c.mean() for c, _, _ in pts]),
        np.array([s.mean() for _, s, _ in pts]),
        np.array([(f == ref.best).mean() for _, _, f in pts]),
        grid,
    )
    index, met = pick_setting(curve, target, ref)
    if confidence_z > 0 and target.max_cost_ratio is None:
        best = train.scores[:, ref.best]
        index, met = pick_confident([p[1] for p in pts], curve.cost, best, target, confidence_z)
    threshold = grid[index]
    fallback = None if met else fallback_model(target, ref)
    if met and target.max_cost_ratio is None and curve.cost[index] >= ref.c_best:
        fallback = ref.best  # every stage paid costs more than the best model alone
    calib = Calibration(
        target=target,
        setting=threshold,
        met=met,
        calib_quality=float(curve.quality[index]),
        calib_quality_ci=bootstrap_ci(pts[index][1]),
        calib_cost_ratio=float(curve.cost[index] / ref.c_best),
        fallback="" if fallback is None else train.models[fallback],
    )
    if fallback is not None:
        calib.calib_quality = float(train.scores[:, fallback].mean())
        calib.calib_quality_ci = bootstrap_ci(train.scores[:, fallback])
        calib.calib_cost_ratio = float(train.costs[:, fallback].mean() / ref.c_best)
    if test is not None:
        cost, score, final = cascade_choices(test, order, threshold)
        if fallback is not None:
            final = np.full(len(test), fallback, dtype=np.intp)
            cost, score = test.costs[:, fallback], test.scores[:, fallback]
        calib.heldout = heldout_report(test, cost, score, final, target)
    return calib


# -- pre-routing, then a cascade that reads the answer ------------------------------------------


@dataclass
class PrerouteCascadeFit:
    lam: float
    threshold: float
    calibration: Calibration
    test_curve: Curve | None = None


def calibrate_preroute_cascade(
    train: OutcomeTable,
    quality: Array,
    cost: Array,
    target: Target,
    *,
    ref_cost: float,
    test: OutcomeTable | None = None,
    quality_test: Array | None = None,
    cost_test: Array | None = None,
    lams: Sequence[float] | None = None,
    thresholds: Sequence[float] | None = None,
    label: str = "pre-route + cascade",
    confidence_z: float = 0.0,
) -> PrerouteCascadeFit:
    """Two knobs fit together to `target` on `train`: the pre-router's cost weight λ and the
    confidence below which a pre-routed answer escalates to the best model.

    `train.confidence` / `test.confidence` hold the scorer's P(correct) of each model's answer
    (out-of-fold on train); `quality` / `cost`: the pre-router's out-of-fold predictions on
    train (and `*_test` on test). λ = ∞ with one cheap model is a plain two-stage cascade."""
    train.check_routable()
    ref = Reference.of(train)
    lams = list(lams if lams is not None else lambda_grid(30))
    grid = list(thresholds if thresholds is not None else np.linspace(0, 1.0001, 41))
    settings = [(lam, t) for lam in lams for t in grid]

    def points(
        table: OutcomeTable, q: Array, c: Array
    ) -> list[tuple[Array, Array, npt.NDArray[np.intp]]]:
        picks = {lam: choose_index(q, c, lam, ref_cost) for lam in lams}
        return [preroute_cascade_choices(table, picks[lam], t, ref.best) for lam, t in settings]

    def curve_of(table: OutcomeTable, pts: list[Any], name: str) -> Curve:
        best = Reference.of(table).best
        return Curve(
            name,
            np.array([c.mean() for c, _, _ in pts]),
            np.array([s.mean() for _, s, _ in pts]),
            np.array([(f == best).mean() for _, _, f in pts]),
            list(range(len(pts))),
        )

    pts = points(train, quality, cost)
    curve = curve_of(train, pts, "calibration")
    index, met = pick_setting(curve, target, ref)
    if confidence_z > 0 and target.max_cost_ratio is None:
        best = train.scores[:, ref.best]
        index, met = pick_confident([p[1] for p in pts], curve.cost, best, target, confidence_z)
    lam, threshold = settings[index]
    fallback = None if met else fallback_model(target, ref)
    if met and target.max_cost_ratio is None and curve.cost[index] >= ref.c_best:
        fallback = ref.best  # pre-routed calls and escalations cost more than the best alone
    chosen_score = pts[index][1] if fallback is None else train.scores[:, fallback]
    chosen_cost = pts[index][0] if fallback is None else train.costs[:, fallback]
    calib = Calibration(
        target=target,
        setting=threshold,
        met=met,
        calib_quality=float(chosen_score.mean()),
        calib_quality_ci=bootstrap_ci(chosen_score),
        calib_cost_ratio=float(chosen_cost.mean() / ref.c_best),
        fallback="" if fallback is None else train.models[fallback],
        extra={"lambda": lam, "threshold": threshold},
    )
    fit = PrerouteCascadeFit(lam, threshold, calib)
    if test is not None and quality_test is not None and cost_test is not None:
        test_pts = points(test, quality_test, cost_test)
        fit.test_curve = curve_of(test, test_pts, label).order()
        c, s, f = test_pts[index]
        if fallback is not None:
            f = np.full(len(test), fallback, dtype=np.intp)
            c, s = test.costs[:, fallback], test.scores[:, fallback]
        calib.heldout = heldout_report(test, c, s, f, target)
    return fit
