"""A calibrated route's report, saved next to its fitted state (`<state>.report.json`) when
`shoal route calibrate` fits it: the target and whether it was met, the setting chosen, what it
achieved on the calibration and held-out splits, and its cost-quality curve on the held-out
split (with each single model's point), so the dashboard can show it without refitting.

    write_report(state_path, calibration, test_table)
    read_report(report_path(state_path))      # None when the route was never calibrated
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from shoal.errors import ConfigError
from shoal.routing.calibrate import Calibration
from shoal.routing.evaluate import Reference
from shoal.routing.outcomes import OutcomeTable

SUFFIX = ".report.json"


def report_path(state: Path) -> Path:
    """Where the report of the route fitted to `state` (its `.npz`) is kept."""
    return state.with_name(state.stem + SUFFIX)


def write_report(state: Path, calibration: Calibration, test: OutcomeTable) -> Path:
    """Save the report of `calibration`, fitted to `state` and checked on `test`."""
    ref = Reference.of(test)
    curve = calibration.test_curve.order() if calibration.test_curve is not None else None
    held = calibration.heldout
    report: dict[str, Any] = {
        "calibrated_at": time.time(),
        "summary": calibration.summary(),
        "curve": None
        if curve is None
        else {
            "label": curve.label,
            "cost_ratio": [float(c / ref.c_best) for c in curve.cost],
            "quality": [float(q) for q in curve.quality],
            "setting": [float(s) for s in curve.settings],
        },
        "chosen": None
        if held is None
        else {
            "setting": calibration.setting,
            "cost_ratio": held.cost_ratio,
            "quality": held.quality,
        },
        "models": [
            {"model": model, "cost_ratio": float(cost / ref.c_best), "quality": float(quality)}
            for model, cost, quality in zip(
                test.models, test.costs.mean(axis=0), test.scores.mean(axis=0), strict=True
            )
        ],
    }
    path = report_path(state)
    path.write_text(json.dumps(report, indent=2, default=float), "utf-8")
    return path


def read_report(path: Path) -> dict[str, Any] | None:
    """The report at `path`; None when there is none; `ConfigError` when it cannot be read."""
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"the calibration report {path} cannot be read: {exc}") from exc
    if not isinstance(report, dict) or not isinstance(report.get("summary"), dict):
        raise ConfigError(f"the calibration report {path} holds no summary")
    return report
