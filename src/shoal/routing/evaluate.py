"""Cost-quality evaluation of routes on an outcome table (definitions in DESIGN.md "Measuring").

A route evaluated offline is a set of *points*, one per setting (e.g. per cost weight λ): the
mean cost per query and mean quality it reaches on the table. From the points:

- Two neighbouring settings can be mixed (each query to one or the other at random), which
  reaches every point of the segment between them: every figure below reads the upper convex
  hull of the points, the same curve the plot draws.
- PGR(c): (quality reachable at cost ≤ c - cheapest model's quality) / (best - cheapest);
  APGR is its mean over the cost range from the cheapest to the best single model.
- CPT(x%): the share of calls going to the best model at the cheapest mix reaching x% PGR.
- cost at 95%: the cheapest mix whose quality is ≥ 95% of the best single model's, as a
  fraction of that model's cost (None when no setting gets there).
- AIQ: the area under the non-decreasing upper convex hull of the points over the cost range
  spanned by the single models, divided by that range (RouterBench's metric). Mixing single
  models at random gives the "zero router", the hull of the single-model points.

Baselines: every single model, random routing (a mix of the cheapest and the best model), the
zero router, and the oracle (per query, the cheapest model with the best score).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from shoal.routing.outcomes import OutcomeTable
from shoal.routing.predictive import choose_index

Array = npt.NDArray[np.float64]


@dataclass
class Curve:
    """Points of one route: mean cost and quality per setting, and the best model's call share."""

    label: str
    cost: Array
    quality: Array
    best_share: Array
    settings: list[float] = field(default_factory=list)

    def order(self) -> Curve:
        idx = np.argsort(self.cost, kind="stable")
        return Curve(
            self.label,
            self.cost[idx],
            self.quality[idx],
            self.best_share[idx],
            [self.settings[i] for i in idx] if self.settings else [],
        )


@dataclass(frozen=True)
class Reference:
    """The single-model anchors of a table: cheapest and best models, their quality and cost."""

    cheap: int
    best: int
    q_cheap: float
    q_best: float
    c_cheap: float
    c_best: float
    c_lo: float
    c_hi: float

    @classmethod
    def of(cls, table: OutcomeTable) -> Reference:
        q = table.scores.mean(axis=0)
        c = table.costs.mean(axis=0)
        cheap = int(np.lexsort((-q, c))[0])
        best = int(np.lexsort((c, -q))[0])
        return cls(
            cheap,
            best,
            float(q[cheap]),
            float(q[best]),
            float(c[cheap]),
            float(c[best]),
            float(c.min()),
            float(c.max()),
        )


def curve_from_choices(
    table: OutcomeTable,
    choices: Sequence[npt.NDArray[np.intp]],
    label: str,
    settings: Sequence[float] = (),
) -> Curve:
    rows = np.arange(len(table))
    best = Reference.of(table).best
    cost = np.array([table.costs[rows, ch].mean() for ch in choices])
    quality = np.array([table.scores[rows, ch].mean() for ch in choices])
    share = np.array([(ch == best).mean() for ch in choices])
    return Curve(label, cost, quality, share, list(settings)).order()


def lambda_grid(n: int = 60) -> list[float]:
    return [0.0, *np.geomspace(1e-3, 1e3, n - 1).tolist()]


def predictive_curve(
    table: OutcomeTable,
    quality_pred: Array,
    cost_pred: Array,
    ref_cost: float,
    label: str,
    lams: Sequence[float] | None = None,
) -> Curve:
    lams = list(lams if lams is not None else lambda_grid())
    choices = [choose_index(quality_pred, cost_pred, lam, ref_cost) for lam in lams]
    return curve_from_choices(table, choices, label, lams)


def cascade_choices(
    table: OutcomeTable, order: Sequence[int], threshold: float
) -> tuple[Array, Array, npt.NDArray[np.intp]]:
    """Per query: (cost paid by all stages, final score, final model) of a confidence cascade."""
    if table.confidence is None:
        raise ValueError("the table has no confidence column; a cascade cannot be simulated")
    n = len(table)
    cost, score = np.zeros(n), np.zeros(n)
    final = np.full(n, order[-1], dtype=np.intp)
    open_ = np.ones(n, dtype=bool)
    for k, j in enumerate(order):
        cost[open_] += table.costs[open_, j]
        stop = (
            open_.copy() if k == len(order) - 1 else open_ & (table.confidence[:, j] >= threshold)
        )
        score[stop] = table.scores[stop, j]
        final[stop] = j
        open_ &= ~stop
    return cost, score, final


def preroute_cascade_choices(
    table: OutcomeTable, pick: npt.NDArray[np.intp], threshold: float, last: int
) -> tuple[Array, Array, npt.NDArray[np.intp]]:
    """A pre-routed cascade: each query's pre-routed model answers first; unless that is `last`
    or the answer's confidence (`table.confidence[:, pick]`) reaches `threshold`, `last`
    answers too. Per query: (cost paid, final score, final model)."""
    if table.confidence is None:
        raise ValueError("the table has no confidence column; a cascade cannot be simulated")
    rows = np.arange(len(table))
    conf = np.nan_to_num(table.confidence[rows, pick], nan=0.0)
    escalate = (pick != last) & (conf < threshold)
    final = np.where(escalate, last, pick).astype(np.intp)
    cost = table.costs[rows, pick] + np.where(escalate, table.costs[:, last], 0.0)
    return cost, table.scores[rows, final], final


def cascade_curve(
    table: OutcomeTable, order: Sequence[int], label: str, thresholds: Sequence[float] | None = None
) -> Curve:
    thresholds = list(thresholds if thresholds is not None else np.linspace(0, 1.0001, 41))
    best = Reference.of(table).best
    pts = [cascade_choices(table, order, t) for t in thresholds]
    return Curve(
        label,
        np.array([c.mean() for c, _, _ in pts]),
        np.array([s.mean() for _, s, _ in pts]),
        np.array([(f == best).mean() for _, _, f in pts]),
        thresholds,
    ).order()


def single_points(table: OutcomeTable) -> Curve:
    m = len(table.models)
    best = Reference.of(table).best
    return Curve(
        "single models",
        table.costs.mean(axis=0),
        table.scores.mean(axis=0),
        np.array([float(j == best) for j in range(m)]),
        list(range(m)),
    )


def random_curve(table: OutcomeTable) -> Curve:
    ref = Reference.of(table)
    p = np.linspace(0, 1, 21)
    return Curve(
        "random",
        ref.c_cheap + p * (ref.c_best - ref.c_cheap),
        ref.q_cheap + p * (ref.q_best - ref.q_cheap),
        p,
        p.tolist(),
    )


def oracle_choice(table: OutcomeTable) -> npt.NDArray[np.intp]:
    """Per query, the cheapest model with the highest score."""
    top = table.scores.max(axis=1, keepdims=True)
    masked = np.where(table.scores >= top - 1e-12, table.costs, np.inf)
    return np.asarray(np.argmin(masked, axis=1), dtype=np.intp)


def oracle_point(table: OutcomeTable) -> Curve:
    return curve_from_choices(table, [oracle_choice(table)], "oracle")


# -- metrics -------------------------------------------------------------------------------------


def hull_index(cost: Array, quality: Array) -> npt.NDArray[np.intp]:
    """Indices of the points on the non-decreasing upper convex hull, sorted by cost."""
    idx = np.lexsort((-quality, cost))
    keep: list[int] = []
    for i in idx:
        c, q = float(cost[i]), float(quality[i])
        if keep and q <= quality[keep[-1]]:
            continue  # dominated: costs more, no better
        while len(keep) >= 2:
            c1, q1 = float(cost[keep[-2]]), float(quality[keep[-2]])
            c2, q2 = float(cost[keep[-1]]), float(quality[keep[-1]])
            if (q2 - q1) * (c - c1) <= (q - q1) * (c2 - c1):
                keep.pop()
            else:
                break
        keep.append(int(i))
    return np.asarray(keep, dtype=np.intp)


def upper_hull(cost: Array, quality: Array) -> tuple[Array, Array]:
    """The non-decreasing upper convex hull of points (cost, quality), sorted by cost."""
    keep = hull_index(cost, quality)
    return np.asarray(cost[keep], np.float64), np.asarray(quality[keep], np.float64)


def _hull_at(hc: Array, hq: Array, c: Array) -> Array:
    return np.asarray(np.interp(c, hc, hq, left=hq[0], right=hq[-1]), dtype=np.float64)


def _reach(curve: Curve, need: float) -> tuple[float, float] | None:
    """(cost, best-model share) of the cheapest mix of two neighbouring settings on the curve's
    hull whose quality is `need` (None when no setting reaches it). The plot draws this hull."""
    keep = hull_index(curve.cost, curve.quality)
    hc, hq, hs = curve.cost[keep], curve.quality[keep], curve.best_share[keep]
    if hq[-1] < need - 1e-12:
        return None
    if hq[0] >= need - 1e-12:
        return float(hc[0]), float(hs[0])
    i = int(np.searchsorted(hq, need - 1e-12))  # hq rises along the hull
    t = (need - hq[i - 1]) / (hq[i] - hq[i - 1])
    return float(hc[i - 1] + t * (hc[i] - hc[i - 1])), float(hs[i - 1] + t * (hs[i] - hs[i - 1]))


def aiq(curve: Curve, ref: Reference) -> float:
    hc, hq = upper_hull(curve.cost, curve.quality)
    if ref.c_hi <= ref.c_lo:
        return float("nan")  # every model costs the same: no cost range to integrate over
    grid = np.linspace(ref.c_lo, ref.c_hi, 2001)
    return float(np.trapezoid(_hull_at(hc, hq, grid), grid) / (ref.c_hi - ref.c_lo))


def apgr(curve: Curve, ref: Reference) -> float:
    """Mean PGR over the cheapest-to-best cost range, mixing neighbouring settings (the hull)."""
    if ref.q_best <= ref.q_cheap or ref.c_best <= ref.c_cheap:
        return float("nan")
    hc, hq = upper_hull(curve.cost, curve.quality)
    grid = np.linspace(ref.c_cheap, ref.c_best, 2001)
    q = np.where(grid >= hc[0] - 1e-15, _hull_at(hc, hq, grid), ref.q_cheap)
    q = np.maximum(q, ref.q_cheap)
    return float(np.mean((q - ref.q_cheap) / (ref.q_best - ref.q_cheap)))


def cpt(curve: Curve, ref: Reference, pgr: float) -> float | None:
    """Share of calls to the best model at the cheapest mix of settings reaching `pgr` PGR."""
    got = _reach(curve, ref.q_cheap + pgr * (ref.q_best - ref.q_cheap))
    return None if got is None else got[1]


def cost_at(curve: Curve, ref: Reference, ratio: float = 0.95) -> float | None:
    """Cheapest mix of settings with quality ≥ ratio x best model's, as a fraction of its cost."""
    got = _reach(curve, ratio * ref.q_best)
    return None if got is None else got[0] / ref.c_best


def metrics(curve: Curve, ref: Reference) -> dict[str, float | None]:
    return {
        "apgr": apgr(curve, ref),
        "cpt50": cpt(curve, ref, 0.5),
        "cpt80": cpt(curve, ref, 0.8),
        "cost_at_95": cost_at(curve, ref, 0.95),
        "cost_at_100": cost_at(curve, ref, 1.0),
        "aiq": aiq(curve, ref),
        "max_quality": float(curve.quality.max()),
    }


def baseline_curves(table: OutcomeTable) -> dict[str, Curve]:
    singles = single_points(table)
    ref = Reference.of(table)
    keep = hull_index(singles.cost, singles.quality)  # mixing two neighbours reaches every cost
    cheapest = Curve(
        "always cheapest", np.array([ref.c_cheap]), np.array([ref.q_cheap]), np.array([0.0])
    )
    best = Curve("best single", np.array([ref.c_best]), np.array([ref.q_best]), np.array([1.0]))
    zero = Curve("zero router", singles.cost[keep], singles.quality[keep], singles.best_share[keep])
    return {
        "random": random_curve(table),
        "always cheapest": cheapest,
        "best single": best,
        "zero router": zero,
        "oracle": oracle_point(table),
    }


def evaluate(table: OutcomeTable, curves: Sequence[Curve]) -> dict[str, Any]:
    """Metrics of `curves` and of the baselines on `table`, as plain data."""
    ref = Reference.of(table)
    out: dict[str, Any] = {
        "queries": len(table),
        "models": {
            m: {"quality": float(q), "cost_usd": float(c)}
            for m, q, c in zip(
                table.models, table.scores.mean(axis=0), table.costs.mean(axis=0), strict=True
            )
        },
        "cheapest": table.models[ref.cheap],
        "best": table.models[ref.best],
        "routes": {},
    }
    for curve in [*baseline_curves(table).values(), *curves]:
        out["routes"][curve.label] = metrics(curve, ref)
    return out


def bootstrap_ci(
    values: Array, *, reps: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampling queries)."""
    rng = np.random.default_rng(seed)
    n = len(values)
    means = values[rng.integers(0, n, (reps, n))].mean(axis=1)
    lo, hi = np.percentile(means, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)


# -- tables and plots ----------------------------------------------------------------------------


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of every route's metrics (figures as fractions of the best model)."""
    head = f"{'route':<28}{'APGR':>7}{'CPT50':>7}{'CPT80':>7}{'$@95%':>7}{'$@100%':>8}{'AIQ':>8}"
    lines = [head, "-" * len(head)]

    def f(v: float | None, w: int, d: int = 3) -> str:
        return f"{'-' if v is None or v != v else f'{v:.{d}f}':>{w}}"

    for name, m in result["routes"].items():
        lines.append(
            f"{name[:27]:<28}{f(m['apgr'], 7)}{f(m['cpt50'], 7, 2)}{f(m['cpt80'], 7, 2)}"
            f"{f(m['cost_at_95'], 7, 2)}{f(m['cost_at_100'], 8, 2)}{f(m['aiq'], 8, 4)}"
        )
    return "\n".join(lines)


def plot(
    table: OutcomeTable,
    curves: Sequence[Curve],
    path: str | Path,
    *,
    title: str = "",
    marks: Sequence[tuple[str, float, float]] = (),
) -> Path:
    """Cost-quality plot: single models, random, zero router, oracle, and `curves`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ref = Reference.of(table)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    singles = single_points(table)
    ax.scatter(singles.cost / ref.c_best, singles.quality, color="black", zorder=3)
    for name, c, q in zip(table.models, singles.cost, singles.quality, strict=True):
        ax.annotate(
            name.split("/")[-1][:22],
            (c / ref.c_best, q),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    base = baseline_curves(table)

    def dense(curve: Curve) -> tuple[Array, Array]:
        """The curve's hull sampled densely: straight in linear cost, curved on the log axis."""
        hc, hq = upper_hull(curve.cost, curve.quality)
        grid = np.geomspace(max(hc[0], 1e-15), max(hc[-1], hc[0] * 1.0001), 200)
        return grid / ref.c_best, np.interp(grid, hc, hq)

    ax.plot(*dense(base["random"]), ":", color="gray", label="random")
    ax.plot(*dense(base["zero router"]), "--", color="gray", label="zero router")
    oracle = base["oracle"]
    ax.scatter(
        oracle.cost / ref.c_best,
        oracle.quality,
        marker="*",
        s=120,
        color="gold",
        edgecolor="black",
        zorder=4,
        label="oracle",
    )
    for curve in curves:
        ax.plot(*dense(curve), "-", label=curve.label)
    for label, c, q in marks:
        ax.scatter([c], [q], marker="D", s=50, zorder=5, label=label)
    ax.axhline(0.95 * ref.q_best, color="red", linewidth=0.6, alpha=0.5)
    ax.set_xscale("log")
    ax.set_xlabel(f"cost per query, fraction of {table.models[ref.best].split('/')[-1]}'s")
    ax.set_ylabel("quality (mean score)")
    ax.set_title(title or table.name)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
