"""What the routes page says of one route beyond its traffic: its calibration (the report
`shoal route calibrate` saved next to the fitted route) and its shadow's results (the outcome
table the shadow writes), read from files on each visit (small; no model is loaded)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shoal.compare import Comparison, pairs_from_table
from shoal.engine import Engine
from shoal.errors import ConfigError, ShoalError
from shoal.routing.config import route_state_path
from shoal.routing.report import read_report, report_path
from shoal.settings import PredictiveRouteSpec, RouteSpec


@dataclass(frozen=True)
class Calibrated:
    """A route's calibration: `report` (from `shoal.routing.report`) when it has one, else
    `note`, which says why not and how to calibrate it."""

    report: dict[str, Any] | None
    note: str
    command: str | None = None  # what calibrates it, where a command does
    chart: dict[str, Any] | None = None  # the cost-quality plot's data (uPlot, aligned on x)


def spec_of(engine: Engine, name: str) -> RouteSpec | None:
    """The fleet file's spec of route `name` (None for a route added in code)."""
    return next((s for s in engine.fleet.settings.routes if s.name == name), None)


def calibration(engine: Engine, name: str) -> Calibrated:
    spec = spec_of(engine, name)
    command = f"shoal route calibrate {name}"
    if spec is None:
        return Calibrated(
            None,
            "Not calibrated: this route was added in code, not from the fleet file. A predictive "
            "route in the fleet file (kind: predictive, with a target) is calibrated by "
            "shoal route calibrate NAME.",
        )
    if not isinstance(spec, PredictiveRouteSpec):
        return Calibrated(
            None,
            f"Not calibrated: a {spec.kind} route runs as the fleet file sets it. Only a "
            "predictive route (kind: predictive, with a target) is fitted to a target, by "
            "shoal route calibrate NAME.",
        )
    state = route_state_path(spec, engine.fleet.cache_dir)
    try:
        report = read_report(report_path(state))
    except ConfigError as exc:
        return Calibrated(None, f"{exc}: calibrate it again.", command)
    if report is not None:
        return Calibrated(report, "", command, chart(report))
    if state.is_file():
        return Calibrated(
            None,
            "Calibrated by a shoal that kept no report of it: calibrate it again to see its "
            "report and curve here.",
            command,
        )
    return Calibrated(
        None,
        "Not calibrated for its current settings (a changed target or model list needs a new "
        "calibration): the route refuses requests until it is.",
        command,
    )


def chart(report: dict[str, Any]) -> dict[str, Any] | None:
    """The curve, the chosen setting and each single model as uPlot series over one x axis
    (cost as a share of the best model's), each null where it has no point."""
    curve, chosen = report.get("curve"), report.get("chosen")
    if not curve or not curve.get("cost_ratio"):
        return None
    points: dict[float, dict[str, float]] = {}
    for cost, quality in zip(curve["cost_ratio"], curve["quality"], strict=True):
        points.setdefault(round(cost, 9), {})["curve"] = quality
    if chosen:
        points.setdefault(round(chosen["cost_ratio"], 9), {})["chosen"] = chosen["quality"]
    for model in report.get("models") or ():
        points.setdefault(round(model["cost_ratio"], 9), {})["models"] = model["quality"]
    xs = sorted(points)
    return {
        "x": xs,
        "curve": [points[x].get("curve") for x in xs],
        "chosen": [points[x].get("chosen") for x in xs],
        "models": [points[x].get("models") for x in xs],
    }


@dataclass(frozen=True)
class Shadowed:
    candidate: str
    summary: dict[str, Any] | None  # `Comparison.summary()`, None before any pair
    table: str
    share: float
    error: str | None = None  # why the table cannot be read


def shadow(engine: Engine, name: str) -> Shadowed | None:
    """The results of route `name`'s shadow (None when it has no `shadow:`)."""
    spec = spec_of(engine, name)
    if spec is None or spec.shadow is None:
        return None
    candidate = spec.shadow.candidate
    table = Engine.shadow_table(engine.fleet, name, candidate)
    summary, error = None, None
    if table.is_file():
        try:
            pairs = pairs_from_table(table, candidate)
        except ShoalError as exc:
            error = str(exc)
        else:
            summary = Comparison(name, candidate, pairs).summary() if pairs else None
    return Shadowed(candidate, summary, str(table), spec.shadow.share, error)
