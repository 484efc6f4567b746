"""The YAML form of a pipeline; it round-trips with the Python form.

```yaml
name: triage
inputs: [ticket]
output: answer
steps:
  - name: label
    kind: model
    model: smollm2-135m            # a model id or a route name
    prompt: "Label this ticket: {ticket}"
    output: myapp.schemas:Label    # a pydantic model, by import path
    inputs: [ticket]
  - name: answer
    kind: python
    fn: myapp.steps:answer         # a function, by import path
    inputs: [label]
```
"""

from __future__ import annotations

import importlib
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shoal.errors import PipelineError
from shoal.pipeline.graph import ModelStep, Pipeline, PythonStep, Step


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelStepSpec(_Spec):
    kind: Literal["model"]
    name: str
    model: str
    prompt: str
    output: str | None = None
    inputs: tuple[str, ...] = ()
    map_over: str | None = None
    system: str | None = None
    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    retries: int = Field(default=2, ge=0)
    fallback: str | None = None
    optional: bool = False
    on_deadline: Literal["cheaper", "fallback", "skip"] = "cheaper"
    record: bool = False


class PythonStepSpec(_Spec):
    kind: Literal["python"]
    name: str
    fn: str
    inputs: tuple[str, ...] = ()
    map_over: str | None = None
    optional: bool = False
    executor: Literal["local", "ray"] = "local"


class PipelineSpec(_Spec):
    name: str
    inputs: tuple[str, ...]
    output: str
    steps: tuple[Annotated[ModelStepSpec | PythonStepSpec, Field(discriminator="kind")], ...] = (
        Field(min_length=1)
    )


def _import(path: str) -> Any:
    module, _, attr = path.partition(":")
    if not attr:
        raise PipelineError(f"{path!r}: write an import path as 'package.module:name'")
    try:
        value: Any = importlib.import_module(module)
        for part in attr.split("."):
            value = getattr(value, part)
    except Exception as exc:  # a module's import may fail in any way (a syntax error too)
        raise PipelineError(f"cannot import {path!r}: {type(exc).__name__}: {exc}") from exc
    return value


def _path(obj: Any) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def to_spec(pipeline: Pipeline) -> PipelineSpec:
    steps: list[ModelStepSpec | PythonStepSpec] = []
    for step in pipeline.steps.values():
        if isinstance(step, ModelStep):
            steps.append(
                ModelStepSpec(
                    kind="model",
                    name=step.name,
                    model=step.model,
                    prompt=step.prompt,
                    output=_path(step.output) if step.output else None,
                    inputs=step.inputs,
                    map_over=step.map_over,
                    system=step.system,
                    max_tokens=step.max_tokens,
                    temperature=step.temperature,
                    retries=step.retries,
                    fallback=step.fallback,
                    optional=step.optional,
                    on_deadline=step.on_deadline,
                    record=step.record,
                )
            )
        else:
            steps.append(
                PythonStepSpec(
                    kind="python",
                    name=step.name,
                    fn=_path(step.fn),
                    inputs=step.inputs,
                    map_over=step.map_over,
                    optional=step.optional,
                    executor=step.executor,
                )
            )
    return PipelineSpec(
        name=pipeline.name, inputs=pipeline.inputs, output=pipeline.output, steps=tuple(steps)
    )


def from_spec(spec: PipelineSpec) -> Pipeline:
    steps: list[Step] = []
    for s in spec.steps:
        if isinstance(s, ModelStepSpec):
            fields = s.model_dump(exclude={"kind", "output"})
            output = _import(s.output) if s.output else None
            if output is not None and not (
                isinstance(output, type) and issubclass(output, BaseModel)
            ):
                raise PipelineError(f"step {s.name!r}: output {s.output!r} is not a pydantic model")
            steps.append(ModelStep(output=output, **fields))
        else:
            fn = _import(s.fn)
            if not callable(fn):
                raise PipelineError(f"step {s.name!r}: {s.fn!r} is not callable")
            steps.append(
                PythonStep(
                    name=s.name,
                    fn=fn,
                    inputs=s.inputs,
                    map_over=s.map_over,
                    optional=s.optional,
                    executor=s.executor,
                )
            )
    return Pipeline(spec.name, inputs=spec.inputs, steps=steps, output=spec.output)


def dump_yaml(pipeline: Pipeline) -> str:
    return yaml.safe_dump(
        to_spec(pipeline).model_dump(mode="json", exclude_defaults=True, exclude_none=True)
        | {"name": pipeline.name},
        sort_keys=False,
        width=100,
    )


def load_yaml(text: str, *, source: str = "pipeline") -> Pipeline:
    try:
        data = yaml.safe_load(text)
        spec = PipelineSpec.model_validate(data)
    except yaml.YAMLError as exc:
        raise PipelineError(f"{source}: not valid YAML: {exc}") from exc
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise PipelineError(f"{source}: {problems}") from exc
    return from_spec(spec)
