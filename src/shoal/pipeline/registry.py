"""The pipelines that apps register, and pipelines named by a YAML file.

An app registers a pipeline under the entry-point group `shoal.pipelines`; the entry point names
a callable that takes the `Engine` and returns a `Pipeline` (it may first add the routes its steps
name to that engine):

```toml
[project.entry-points."shoal.pipelines"]
triage = "myapp.triage:pipeline"        # def pipeline(engine: Engine) -> Pipeline
```

The command line (`shoal pipelines list`, `shoal run NAME`) and the server (`shoal serve
--pipeline NAME`) find them here; shoal itself never imports an app. A name that ends in `.yaml`
or `.yml`, or names a file, is a pipeline in YAML (`spec.load_yaml`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from shoal.errors import PipelineError, UnknownPipelineError
from shoal.pipeline.graph import Pipeline
from shoal.pipeline.spec import load_yaml

GROUP = "shoal.pipelines"


@dataclass(frozen=True)
class Registered:
    """A pipeline an app registered: its name and where it comes from (`module:attr`)."""

    name: str
    source: str


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def registered() -> list[Registered]:
    """Every registered pipeline, by name; nothing is imported."""
    found = _entry_points()
    return [Registered(name, found[name].value) for name in sorted(found)]


def is_file(target: str) -> bool:
    """Whether `target` names a YAML pipeline rather than a registered one."""
    return target.endswith((".yaml", ".yml")) or Path(target).is_file()


def load_file(path: Path) -> Pipeline:
    """The pipeline in the YAML file at `path`. Its import paths (`module:name`) resolve from the
    file's folder too, so steps may live in a module next to it."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PipelineError(f"cannot read pipeline {path}: {exc.strerror}") from exc
    folder = str(path.resolve().parent)
    if folder not in sys.path:
        sys.path.append(folder)
    return load_yaml(text, source=str(path))


def load_registered(name: str, engine: Any) -> Pipeline:
    """The registered pipeline `name`, built for `engine` (an `Engine`; the entry point may add
    routes to it). `UnknownPipelineError` lists the registered names; an entry point that cannot
    be imported, or that does not give a `Pipeline`, is a `PipelineError` naming it."""
    found = _entry_points()
    if name not in found:
        raise UnknownPipelineError(name, found)
    ep = found[name]
    where = f"pipeline {name!r} (entry point {ep.value!r} in group {GROUP!r})"
    try:
        build = ep.load()
    except Exception as exc:  # an app's import may fail in any way
        raise PipelineError(f"cannot load {where}: {type(exc).__name__}: {exc}") from exc
    if not callable(build):
        raise PipelineError(f"{where} is not callable: it should take the engine")
    pipeline = build(engine)
    if not isinstance(pipeline, Pipeline):
        raise PipelineError(f"{where} gave {type(pipeline).__name__}, not a Pipeline")
    return pipeline


def load(target: str, engine: Any) -> Pipeline:
    """A pipeline by registered name or YAML file (see `is_file`)."""
    if is_file(target):
        return load_file(Path(target))
    return load_registered(target, engine)
