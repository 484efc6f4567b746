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

import importlib.util
import re
import sys
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from shoal.errors import PipelineError, ShoalError, UnknownPipelineError
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
    folder = path.resolve().parent
    for module in _local_modules(text, folder):
        spec = importlib.util.find_spec(module) if module not in sys.modules else None
        origin = getattr(sys.modules.get(module), "__file__", None) or (spec and spec.origin)
        if origin and Path(origin).resolve() != folder / f"{module}.py":
            raise PipelineError(
                f"{path}: its steps module {module!r} ({folder / f'{module}.py'}) has the name of "
                f"another module already found at {origin}: rename it"
            )
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    return load_yaml(text, source=str(path))


def _local_modules(text: str, folder: Path) -> set[str]:
    """The top-level modules the YAML's import paths (`module:name`) name that live in
    `folder` as `module.py`."""
    found = set()
    for top in re.findall(r"\b(?:fn|output):\s*['\"]?([A-Za-z_]\w*)[\w.]*:", text):
        if (folder / f"{top}.py").is_file():
            found.add(top)
    return found


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
    try:
        pipeline = build(engine)
    except ShoalError:
        raise  # already says what is wrong (a fleet without the models its routes need)
    except Exception as exc:  # an app's code may fail in any way
        raise PipelineError(f"cannot build {where}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(pipeline, Pipeline):
        raise PipelineError(f"{where} gave {type(pipeline).__name__}, not a Pipeline")
    return pipeline


def load(target: str, engine: Any) -> Pipeline:
    """A pipeline by registered name or YAML file (see `is_file`)."""
    if is_file(target):
        return load_file(Path(target))
    return load_registered(target, engine)
