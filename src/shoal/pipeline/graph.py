"""Pipeline graphs: typed steps, validated before anything runs.

A step is a model call (a prompt template, an optional pydantic output schema, and the model or
route that answers) or plain Python (a function whose parameters name its inputs). A step reads
pipeline inputs and the outputs of other steps by name; `map_over` fans it out over a list, one
call per item, the item bound to `{item}` (or to the function's `item` parameter); its output is
a list aligned with the items, None where an item failed.

`Pipeline(...)` checks the graph at build time: unknown inputs, cycles, template fields that name
nothing, and type mismatches between a producer's output and a consumer's annotated parameter
are `PipelineError`s listing what is wrong.
"""

from __future__ import annotations

import inspect
import string
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from shoal.errors import PipelineError

OnDeadline = Literal["cheaper", "fallback", "skip"]


@dataclass(frozen=True)
class ModelStep:
    """A model call: `prompt` is a `str.format` template over the step's inputs."""

    name: str
    prompt: str
    model: str
    output: type[BaseModel] | None = None
    inputs: tuple[str, ...] = ()
    map_over: str | None = None
    system: str | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    retries: int = 2
    fallback: str | None = None
    optional: bool = False
    # When the time left cannot fit the step on its model (at the speeds it has shown lately),
    # before it starts: run it on a cheaper model of the fleet, on its `fallback`, or (for an
    # optional step) skip it.
    on_deadline: OnDeadline = "cheaper"
    # Record each answer of the step's own model with its request, under `PIPELINE/STEP`: the
    # data `shoal distil` trains a specialist for the step on. Off unless asked.
    record: bool = False

    @property
    def produces(self) -> Any:
        one = self.output if self.output is not None else str
        return list[one | None] if self.map_over else one  # type: ignore[valid-type]


@dataclass(frozen=True)
class PythonStep:
    """Plain Python: `fn`'s parameters are its inputs (sync or async; runs on the event loop
    when async, in a thread when sync). With `executor="ray"` each call (each item, under
    `map_over`) runs as a Ray task on the cluster this process joined, within the run's
    deadline (a task still running then is cancelled); `fn` and its inputs must pickle."""

    name: str
    fn: Callable[..., Any]
    inputs: tuple[str, ...] = ()
    map_over: str | None = None
    optional: bool = False
    executor: Literal["local", "ray"] = "local"
    hints: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        params = [
            p for p in inspect.signature(self.fn).parameters if p != "item" or not self.map_over
        ]
        if not self.inputs:
            object.__setattr__(self, "inputs", tuple(params))
        try:
            hints = typing.get_type_hints(self.fn)
        except Exception:  # unresolvable annotations: treat as untyped
            hints = {}
        object.__setattr__(self, "hints", hints)

    @property
    def produces(self) -> Any:
        one = self.hints.get("return", Any)
        if not self.map_over:
            return one
        return list[Any] if one is Any else list[one | None]  # type: ignore[valid-type]


Step = ModelStep | PythonStep


def template_fields(template: str) -> set[str]:
    names = set()
    for _, name, _, _ in string.Formatter().parse(template):
        if name:
            names.add(name.split(".")[0].split("[")[0])
    return names


class Pipeline:
    """A validated DAG of steps; `order` is a topological order."""

    def __init__(
        self, name: str, *, inputs: Sequence[str], steps: Sequence[Step], output: str
    ) -> None:
        self.name = name
        self.inputs = tuple(inputs)
        self.steps = {step.name: step for step in steps}
        self.output = output
        problems = self._problems(steps)
        if problems:
            raise PipelineError(f"pipeline {name!r}: " + "; ".join(problems))
        self.order = self._topological_order()

    def _problems(self, steps: Sequence[Step]) -> list[str]:
        problems: list[str] = []
        names = [s.name for s in steps]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            problems.append(f"step {dup!r} is defined twice")
        for step in steps:
            if isinstance(step, ModelStep):
                if step.on_deadline == "fallback" and step.fallback is None:
                    problems.append(f"step {step.name!r}: on_deadline fallback names no fallback")
                if step.on_deadline == "skip" and not step.optional:
                    problems.append(f"step {step.name!r}: only an optional step can be skipped")
        for clash in sorted(set(names) & set(self.inputs)):
            problems.append(f"step {clash!r} has the name of a pipeline input")
        known = set(self.inputs) | set(names)
        for step in steps:
            for source in step.inputs:
                if source not in known:
                    problems.append(
                        f"step {step.name!r} reads {source!r}, which is neither an input nor a step"
                    )
            if step.map_over is not None and step.map_over not in step.inputs:
                problems.append(
                    f"step {step.name!r} maps over {step.map_over!r}, not one of its inputs"
                )
            if isinstance(step, ModelStep):
                allowed = set(step.inputs) | ({"item"} if step.map_over else set())
                for missing in sorted(template_fields(step.prompt) - allowed):
                    problems.append(
                        f"step {step.name!r}: prompt field {{{missing}}} is not one of its inputs"
                    )
            problems += self._type_problems(step)
        if self.output not in known:
            problems.append(f"output {self.output!r} is neither an input nor a step")
        if not problems:
            cycle = self._cycle()
            if cycle:
                problems.append("cycle: " + " -> ".join(cycle))
        return problems

    def _type_problems(self, step: Step) -> list[str]:
        problems = []
        mapped = self.steps.get(step.map_over or "")
        if mapped is not None:
            given = mapped.produces
            if typing.get_origin(given) is not list and given is not Any and given is not list:
                problems.append(
                    f"step {step.name!r} maps over {step.map_over!r}, which is not a list"
                )
        if not isinstance(step, PythonStep):
            return problems
        params = inspect.signature(step.fn).parameters
        takes = {s for s in step.inputs if s != step.map_over} | (
            {"item"} if step.map_over else set()
        )
        for name in sorted(takes - set(params)):
            problems.append(f"step {step.name!r}: {_name(step.fn)}() has no parameter {name!r}")
        for name, param in params.items():
            required = param.default is inspect.Parameter.empty and param.kind not in (
                inspect.Parameter.VAR_POSITIONAL,
                inspect.Parameter.VAR_KEYWORD,
            )
            if required and name not in takes:
                problems.append(f"step {step.name!r}: nothing feeds parameter {name!r}")
        for source in step.inputs:
            producer = self.steps.get(source)
            wanted = step.hints.get("item" if source == step.map_over else source)
            if producer is None or wanted is None:
                continue
            given = producer.produces
            if source == step.map_over:
                inner = typing.get_args(given)
                if inner and not _compatible(_without_none(inner[0]), wanted):
                    problems.append(
                        f"step {step.name!r}: items of {source!r} are "
                        f"{_name(_without_none(inner[0]))}, "
                        f"its 'item' wants {_name(wanted)}"
                    )
            elif not _compatible(given, wanted):
                problems.append(
                    f"step {step.name!r}: {source!r} produces {_name(given)}, "
                    f"the parameter wants {_name(wanted)}"
                )
        return problems

    def _deps(self, name: str) -> list[str]:
        return [s for s in self.steps[name].inputs if s in self.steps]

    def _cycle(self) -> list[str] | None:
        state: dict[str, int] = {}
        path: list[str] = []

        def visit(name: str) -> list[str] | None:
            state[name] = 1
            path.append(name)
            for dep in self._deps(name):
                if state.get(dep) == 1:
                    return [*path[path.index(dep) :], dep]
                if dep not in state and (found := visit(dep)):
                    return found
            path.pop()
            state[name] = 2
            return None

        for name in self.steps:
            if name not in state and (found := visit(name)):
                return found
        return None

    def _topological_order(self) -> list[str]:
        done: list[str] = []
        seen: set[str] = set()

        def visit(name: str) -> None:
            if name in seen:
                return
            seen.add(name)
            for dep in self._deps(name):
                visit(dep)
            done.append(name)

        for name in self.steps:
            visit(name)
        return done


def _is_union(kind: Any) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType)


def _without_none(kind: Any) -> Any:
    """`X | None` -> `X`: a mapped step skips items that failed upstream."""
    if not _is_union(kind):
        return kind
    arms = [a for a in typing.get_args(kind) if a is not type(None)]
    return arms[0] if len(arms) == 1 else typing.Union[tuple(arms)]  # noqa: UP007


def _compatible(given: Any, wanted: Any) -> bool:
    if given is Any or wanted is Any:
        return True
    if given == wanted:
        return True
    if _is_union(given):
        return all(_compatible(arm, wanted) for arm in typing.get_args(given))
    if _is_union(wanted):
        return any(_compatible(given, arm) for arm in typing.get_args(wanted))
    origin_g, origin_w = typing.get_origin(given), typing.get_origin(wanted)
    if given is type(None):
        return wanted is type(None)
    if origin_g is not None or origin_w is not None:
        if origin_g != origin_w:
            return False
        return all(
            _compatible(g, w)
            for g, w in zip(typing.get_args(given), typing.get_args(wanted), strict=False)
        )
    return isinstance(given, type) and isinstance(wanted, type) and issubclass(given, wanted)


def _name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind)
