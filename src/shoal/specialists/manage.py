"""Specialists of a fleet: installed (a file and fleet file entries), listed, checked, removed.

`install` writes the specialist's file and adds it, with a specialist route over it and its
teacher, to the fleet file. `status` says whether a specialist can serve (its file, its
embedder, its drift guard). `evaluate` measures an installed specialist on new examples at its
threshold. `remove` takes it, and the specialist routes over it, out of the fleet file and
deletes its file.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from shoal.errors import ConfigError, ShoalError, WeightsCorruptedError
from shoal.settings import FleetSettings, RouteSpec, SpecialistModelSpec, SpecialistRouteSpec
from shoal.specialists import fleetfile
from shoal.specialists.model import Specialist, read, write
from shoal.specialists.train import Distilled, Example
from shoal.specialists.train import outcomes as score

SHORT = {"classifier": "clf", "reuse": "reuse"}


def slug(target: str) -> str:
    """A target (`PIPELINE/STEP`, a route) as a model id's stem."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", target).strip("-.") or "specialist"


def drift_state_path(path: Path) -> Path:
    """Where a specialist route's drift guard keeps that it switched the specialist off."""
    return path.with_name(path.name + ".drift.json")


def switched_off(path: Path, checksum: str) -> str | None:
    """Why the drift guard switched the specialist in `path` off (None: it did not, or the
    specialist was trained again since)."""
    try:
        state = json.loads(drift_state_path(path).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("checksum") != checksum:
        return None
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(state.get("at", 0))))
    return f"switched off by its drift guard at {when}: {state.get('reason')}"


def install(
    fleet_path: Path,
    settings: FleetSettings,
    ids: Collection[str],
    distilled: Distilled,
    *,
    model_id: str,
    route: str,
    target: str,
    teacher: str,
    path: Path,
    embedder: str,
) -> list[str]:
    """Write the specialist to `path` and add it (and its route) to the fleet file whose
    settings and model ids are `settings` and `ids`, unless it is there already (a specialist
    trained again in place). `embedder` is the identity of the fleet's embedder. What was done,
    as lines."""
    if teacher not in ids:
        raise ConfigError(f"the teacher {teacher!r} is not a model of the fleet ({fleet_path})")
    present = model_id in ids
    if present:
        spec = next((m for m in settings.models if m.id == model_id), None)
        if not isinstance(spec, SpecialistModelSpec):
            raise ConfigError(f"{model_id!r} is already a model of the fleet, not a specialist")
        if spec.path.expanduser().resolve() != path.resolve():
            raise ConfigError(
                f"specialist {model_id!r} is in the fleet file with another file "
                f"({spec.path}); remove it first (shoal specialists remove {model_id})"
            )
    names = {r.name for r in settings.routes}
    if not present and (route in names or route in ids):
        raise ConfigError(f"a route or model named {route!r} exists; give another --route")
    checksum = write(path, distilled, target=target, teacher=teacher, embedder=embedder)
    drift_state_path(path).unlink(missing_ok=True)  # trained again: on again
    done = [f"wrote {path} ({checksum[:19]}…)"]
    if present:
        return [*done, f"{model_id} was already in {fleet_path}: trained again in place"]
    fleetfile.add(
        fleet_path,
        {"id": model_id, "kind": "specialist", "path": str(path), "teacher": teacher},
        {"name": route, "kind": "specialist", "specialist": model_id, "teacher": teacher},
    )
    return [*done, f"added to {fleet_path}: model {model_id}, route {route}"]


def specialists_in(settings: FleetSettings) -> list[SpecialistModelSpec]:
    return [m for m in settings.models if isinstance(m, SpecialistModelSpec)]


def spec_of(settings: FleetSettings, model_id: str) -> SpecialistModelSpec:
    for spec in specialists_in(settings):
        if spec.id == model_id:
            return spec
    raise ConfigError(
        f"{model_id!r} is not a specialist of the fleet; its specialists: "
        + (", ".join(s.id for s in specialists_in(settings)) or "none")
    )


def routes_over(routes: Sequence[RouteSpec], model_id: str) -> list[str]:
    """The specialist routes whose specialist is `model_id`."""
    return [
        r.name for r in routes if isinstance(r, SpecialistRouteSpec) and r.specialist == model_id
    ]


def status(
    spec: SpecialistModelSpec, routes: Sequence[RouteSpec], specialist: Specialist
) -> dict[str, Any]:
    """What is known of a specialist without asking it anything: its file's header and
    report, and whether it can serve (`state`: ok, off, stale, damaged, missing)."""
    path = spec.path.expanduser()
    out: dict[str, Any] = {"id": spec.id, "path": str(path), "teacher": spec.teacher}
    out["routes"] = routes_over(routes, spec.id)
    if not path.is_file():
        return out | {"state": "missing", "why": f"no file {path}"}
    try:
        trained = specialist.trained()
    except WeightsCorruptedError as exc:
        return out | {"state": "damaged", "why": str(exc)}
    except ShoalError as exc:
        trained = read(path)
        out |= {"state": "stale", "why": str(exc)}
    meta = trained.meta
    out |= {
        "kind": meta["kind"],
        "target": meta.get("target"),
        "form": trained.form.describe(),
        "calibrated_for": trained.target.describe(),
        "threshold": trained.threshold,
        "embedder": meta.get("embedder"),
        "trained_at": time.strftime("%Y-%m-%d %H:%M", time.localtime(meta.get("created_at", 0))),
        "checksum": trained.checksum,
        "report": meta["report"],
    }
    if "state" not in out:
        off = switched_off(path, trained.checksum)
        out |= {"state": "off", "why": off} if off else {"state": "ok"}
    return out


def evaluate(specialist: Specialist, examples: Sequence[Example]) -> dict[str, Any]:
    """An installed specialist at its threshold on `examples`: coverage, agreement with the
    teacher, accuracy where gold is known (answers that do not parse are left out)."""
    trained = specialist.trained()
    form = trained.form
    rows, keys = [], []
    for example in examples:
        k = form.keys(example.answer, example.parsed)
        if k is not None:
            rows.append(example)
            keys.append(k)
    if not rows:
        raise ConfigError(f"none of the {len(examples)} answers parse as {form.describe()}")
    _, got, confidence = specialist.predict([r.input for r in rows])
    gold = [form.gold_keys(r.gold) for r in rows]
    result = score(keys, gold, got, confidence)
    summary = result.summary(trained.threshold)
    summary |= {
        "examples": len(examples),
        "unparsed": len(examples) - len(rows),
        "threshold": trained.threshold,
        "calibrated_for": trained.target.describe(),
        "quality": result.quality(trained.threshold, trained.target)
        if not trained.target.needs_gold or result.known.any()
        else None,
    }
    summary["goal"] = result.goal(trained.target) if summary["quality"] is not None else None
    return summary


def remove(fleet_path: Path, settings: FleetSettings, model_id: str) -> list[str]:
    """Take a specialist and its specialist routes out of the fleet file; delete its file."""
    spec = spec_of(settings, model_id)
    mine = routes_over(settings.routes, model_id)
    others = [r.name for r in settings.routes if r.name not in mine and _uses(r, model_id)]
    if others:
        raise ConfigError(
            f"route(s) {', '.join(others)} use {model_id!r}: take it out of them first"
        )
    fleetfile.remove(fleet_path, model_id, mine)
    path = spec.path.expanduser()
    path.unlink(missing_ok=True)
    drift_state_path(path).unlink(missing_ok=True)
    gone = f"model {model_id}" + (f", route(s) {', '.join(mine)}" if mine else "")
    return [f"removed from {fleet_path}: {gone}", f"deleted {path}"]


def _uses(route: RouteSpec, model_id: str) -> bool:
    """Whether `route` names `model_id` anywhere in its settings."""

    def names(value: Any) -> bool:
        if isinstance(value, dict):
            return any(names(v) for v in value.values())
        if isinstance(value, list | tuple):
            return any(names(v) for v in value)
        return bool(value == model_id)

    return names(route.model_dump(mode="json"))
