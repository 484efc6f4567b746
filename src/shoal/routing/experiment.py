"""Route experiments on an outcome table: several splits, every route, medians and each split.

What `shoal route eval` and `bench/routing.py` both run. For each split (disjoint train and test
queries) every route is calibrated to the target on the train split only and reported on the
test split, next to the baselines (random, every single model, the zero router, the oracle):

- a predictor kind (`knn`, `logistic`, `mlp`, `mf`, `ensemble`, `cluster`): a predictive route;
- `cascade`: the models on the zero router's hull (on train), cheapest first, each answer
  scored by `AnswerScorer` (reads the answer; needs the table's answers);
- `KIND+cascade`: pre-route with KIND, then escalate a pre-routed answer the scorer does not
  trust to the best model;
- `confidence_cascades`: named cascades over given models that trust the table's own
  `confidence` column (a fleet file's `cascade` route, e.g. token log-probabilities).

Routes over a table with many models use only the models within `prune_slack` of the zero
router's hull on train (dominated models only add noise). Split 0 is the table's own
train/test split where it has one; the others are seeded random splits of the same sizes.
Calibration asks for the target with a margin of `confidence_z` standard errors on train (1 by
default: a target met on average on train is missed on about half of the test splits).
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from shoal.errors import ConfigError
from shoal.routing import evaluate as ev
from shoal.routing.calibrate import (
    Calibration,
    Target,
    calibrate_cascade,
    calibrate_predictive,
    calibrate_preroute_cascade,
)
from shoal.routing.outcomes import OutcomeTable
from shoal.routing.predictive import PREDICTOR_KINDS
from shoal.routing.scorer import scored_tables

Array = npt.NDArray[np.float64]
Embed = Callable[[Sequence[str]], Array]
log = logging.getLogger(__name__)


def route_names_valid(routes: Sequence[str]) -> None:
    valid = [*PREDICTOR_KINDS, "cascade", *(f"{k}+cascade" for k in PREDICTOR_KINDS)]
    for route in routes:
        if route not in valid:
            raise ConfigError(f"unknown route kind {route!r}; valid: {', '.join(valid)}")


def split_indices(
    table: OutcomeTable, seeds: Sequence[int], test_fraction: float = 0.5
) -> list[tuple[int, npt.NDArray[np.intp], npt.NDArray[np.intp]]]:
    """(seed, train rows, test rows) per seed; seed 0 is the table's own split when it has one."""
    n = len(table)
    own = {"train", "test"} <= set(table.splits)
    n_test = sum(s == "test" for s in table.splits) if own else max(1, round(n * test_fraction))
    out = []
    for seed in seeds:
        if seed == 0 and own:
            test = np.array([s == "test" for s in table.splits])
        else:
            test = np.zeros(n, dtype=bool)
            test[np.random.default_rng(seed).permutation(n)[:n_test]] = True
        if test.all() or not test.any():
            raise ConfigError(f"cannot split {n} queries into two non-empty parts")
        out.append((seed, np.flatnonzero(~test), np.flatnonzero(test)))
    return out


def hull_models(train: OutcomeTable, slack: float = 0.0) -> list[int]:
    """Columns of the models within `slack` of the zero router's hull on `train`, cheapest first."""
    q, c = train.scores.mean(axis=0), train.costs.mean(axis=0)
    hc, hq = ev.upper_hull(c, q)
    keep = [j for j in range(len(q)) if q[j] >= np.interp(c[j], hc, hq) - slack - 1e-12]
    return sorted(keep, key=lambda j: (c[j], -q[j]))


@dataclass
class SplitResult:
    seed: int
    test: OutcomeTable
    curves: list[ev.Curve]
    metrics: dict[str, dict[str, Any]]
    calibrated: dict[str, dict[str, Any]]
    warnings: list[str] = field(default_factory=list)
    calibrations: dict[str, Calibration] = field(default_factory=dict)


def _heldout(cal: Calibration, test: OutcomeTable, target: Target) -> dict[str, Any]:
    assert cal.heldout is not None
    ref = ev.Reference.of(test)
    held = cal.heldout
    return {
        "cost_ratio": held.cost / ref.c_best,
        "quality_ratio": held.quality / ref.q_best if ref.q_best else float("nan"),
        "best_share": held.best_share,
        "met_on_train": cal.met,
        "met_on_test": target.met(held.quality, held.cost, ref),
        "fallback": cal.fallback or None,
        "quality_ci": held.quality_ci,
    }


class Experiment:
    """Routes on one table: features and answer embeddings computed once, splits run on them."""

    def __init__(
        self,
        table: OutcomeTable,
        features: Callable[[Sequence[str]], Array],
        *,
        routes: Sequence[str],
        target: Target,
        cost_mode: str = "learned",
        embed_answers: Embed | None = None,
        prune_slack: float | None = 0.02,
        confidence_z: float = 1.0,
        confidence_cascades: dict[str, list[str]] | None = None,
    ) -> None:
        route_names_valid(routes)
        table.check_routable()
        self.orders = {
            name: [table.model_index(m) for m in models]
            for name, models in (confidence_cascades or {}).items()
        }
        if self.orders and table.confidence is None:
            raise ConfigError(
                f"the outcome table {table.name!r} has no confidence column: the cascade routes "
                f"{', '.join(self.orders)} read it"
            )
        self.table, self.routes, self.target = table, list(routes), target
        self.cost_mode = cost_mode
        self.prune_slack = prune_slack
        self.z = confidence_z
        self._features = features
        self._embed_answers = embed_answers
        self._x: Array | None = None
        self._vecs: dict[int, Array] = {}
        if any("cascade" in r for r in routes) and table.answers is None:
            raise ConfigError(
                f"the outcome table {table.name!r} has no answers: the cascade routes read them"
            )

    @property
    def x(self) -> Array:
        if self._x is None:
            self._x = self._features(self.table.prompts)
        return self._x

    def vectors(self, j: int) -> Array:
        """Embeddings of model j's answers, every query of the table."""
        if j not in self._vecs:
            if self._embed_answers is None or self.table.answers is None:
                raise ConfigError("no answer embedder: the cascade routes need one")
            texts = [row[j] or " " for row in self.table.answers]
            self._vecs[j] = np.asarray(self._embed_answers(texts), dtype=np.float64)
        return self._vecs[j]

    def run(
        self, seed: int, train_idx: npt.NDArray[np.intp], test_idx: npt.NDArray[np.intp]
    ) -> SplitResult:
        table, target = self.table, self.target
        train, test = table.subset(train_idx), table.subset(test_idx)
        x_train, x_test = self.x[train_idx], self.x[test_idx]
        keep = (
            hull_models(train, self.prune_slack)
            if self.prune_slack is not None and len(table.models) > 3
            else list(range(len(table.models)))
        )
        names = [table.models[j] for j in keep]
        sub_train, sub_test = train.select_models(names), test.select_models(names)
        result = SplitResult(seed, test, [], {}, {})
        fits: dict[str, Any] = {}
        kinds = {r.split("+")[0] for r in self.routes if r != "cascade"}
        for kind in [k for k in PREDICTOR_KINDS if k in kinds]:
            fit = calibrate_predictive(
                sub_train,
                x_train,
                target,
                kind=kind,
                cost_mode=self.cost_mode,
                test=sub_test,
                x_test=x_test,
                confidence_z=self.z,
            )
            fits[kind] = fit
            assert fit.calibration.test_curve is not None
            if kind in self.routes:
                fit.calibration.test_curve.label = kind
                result.curves.append(fit.calibration.test_curve)
                result.calibrations[kind] = fit.calibration
            result.warnings += [f"{kind}: {w}" for w in fit.calibration.warnings]
        if "cascade" in self.routes:
            result.curves.append(self._cascade(sub_train, sub_test, keep, train_idx, test_idx))
            result.calibrations["cascade"] = self._cascade_cal
        for name, order in self.orders.items():
            result.curves.append(ev.cascade_curve(test, order, name))
            result.calibrations[name] = calibrate_cascade(
                train, order, target, test=test, confidence_z=self.z
            )
        for route in [r for r in self.routes if r.endswith("+cascade")]:
            curve, cal = self._preroute(
                route, fits[route.split("+")[0]], sub_train, sub_test, keep, train_idx, test_idx
            )
            result.curves.append(curve)
            result.calibrations[route] = cal
        result.metrics = ev.evaluate(test, result.curves)["routes"]
        result.calibrated = {
            name: _heldout(cal, test, target) for name, cal in result.calibrations.items()
        }
        return result

    def _vec(self, keep: list[int], idx: npt.NDArray[np.intp]) -> dict[int, Array]:
        return {k: self.vectors(j)[idx] for k, j in enumerate(keep)}

    def _cascade(
        self,
        train: OutcomeTable,
        test: OutcomeTable,
        keep: list[int],
        train_idx: npt.NDArray[np.intp],
        test_idx: npt.NDArray[np.intp],
    ) -> ev.Curve:
        q, c = train.scores.mean(axis=0), train.costs.mean(axis=0)
        best = ev.Reference.of(train).best
        order = [j for j in hull_models(train) if c[j] < c[best] and q[j] < q[best]][-3:]
        order.append(best)
        stages = [(j, order[:k]) for k, j in enumerate(order[:-1])]
        s_train, s_test = scored_tables(
            train,
            test,
            self.x[train_idx],
            self.x[test_idx],
            self._vec(keep, train_idx),
            self._vec(keep, test_idx),
            stages,
        )
        self._cascade_cal = calibrate_cascade(
            s_train, order, self.target, test=s_test, confidence_z=self.z
        )
        return ev.cascade_curve(s_test, order, "cascade")

    def _preroute(
        self,
        route: str,
        fit: Any,
        train: OutcomeTable,
        test: OutcomeTable,
        keep: list[int],
        train_idx: npt.NDArray[np.intp],
        test_idx: npt.NDArray[np.intp],
    ) -> tuple[ev.Curve, Calibration]:
        best = ev.Reference.of(train).best
        stages: list[tuple[int, list[int]]] = [
            (j, []) for j in range(len(train.models)) if j != best
        ]
        s_train, s_test = scored_tables(
            train,
            test,
            self.x[train_idx],
            self.x[test_idx],
            self._vec(keep, train_idx),
            self._vec(keep, test_idx),
            stages,
        )
        got = calibrate_preroute_cascade(
            s_train,
            fit.quality_oof,
            fit.cost_oof,
            self.target,
            ref_cost=fit.ref_cost,
            test=s_test,
            quality_test=fit.quality_test,
            cost_test=fit.cost_test,
            label=route,
            confidence_z=self.z,
        )
        assert got.test_curve is not None
        return got.test_curve, got.calibration


def _median(values: Sequence[float | None]) -> float | None:
    got = [v for v in values if v is not None and v == v]
    return statistics.median(got) if got else None


def summarise(results: Sequence[SplitResult], title: str = "") -> dict[str, Any]:
    """Medians over the splits of every route's metrics and calibrated figures, and each split."""
    names = list(results[0].metrics)
    out: dict[str, Any] = {"table": title, "splits": len(results), "frontier": {}}
    for name in names:
        out["frontier"][name] = {
            key: _median([r.metrics[name][key] for r in results])
            for key in results[0].metrics[name]
        }
    out["calibrated"] = {}
    for name in results[0].calibrated:
        cal = [r.calibrated[name] for r in results]
        out["calibrated"][name] = {
            "cost_ratio_median": _median([c["cost_ratio"] for c in cal]),
            "quality_ratio_median": _median([c["quality_ratio"] for c in cal]),
            "met_on_test": sum(bool(c["met_on_test"]) for c in cal),
            "cost_ratio_each": [round(c["cost_ratio"], 4) for c in cal],
            "quality_ratio_each": [round(c["quality_ratio"], 4) for c in cal],
            "fallback_each": [c["fallback"] for c in cal],
        }
    out["warnings"] = sorted({w for r in results for w in r.warnings})
    out["each_split"] = [
        {"seed": r.seed, "metrics": r.metrics, "calibrated": r.calibrated} for r in results
    ]
    return out
