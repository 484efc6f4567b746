"""Running a pipeline: steps as soon as their inputs are ready, within a budget and a deadline.

The runner knows nothing about models. Model steps go through a `Caller` (the engine is one):
it plans a call (decided once, priced by the cards), names cheaper stand-ins when money or time
runs low, and runs a plan against a hold on the run's ledger account.

Budget: the run's budget is a ledger `Account`. Before a call starts, its plan's worst-case cost
is held; a call whose hold does not fit the budget left is degraded to a cheaper model, or the
run stops with a partial result. The caller settles the hold to what the call cost however it
ends (answered, failed, cancelled at the deadline), and the trace records the same charge, so
the run's cost is the sum of its calls' traces. Concurrent fan-out never spends past the budget:
each call is capped at what it holds. Deadline: the whole run is bounded; a call expected to
take longer than the time left is degraded to a faster model or not started.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ValidationError

from shoal.calls import CallPlan
from shoal.errors import (
    BudgetExceededError,
    DeadlineReachedError,
    OutputError,
    OutputTruncatedError,
    OverloadedError,
    PipelineError,
    ShoalError,
    StepFailedError,
    StepSkippedError,
)
from shoal.ledger import Account, Hold, to_usd
from shoal.messages import ChatRequest, ChatResponse, Message
from shoal.pipeline.cache import ResponseCache
from shoal.pipeline.graph import ModelStep, Pipeline, PythonStep, Step
from shoal.traces.store import TraceStore

log = logging.getLogger(__name__)


class Caller(Protocol):
    """How the runner reaches models (the engine implements it)."""

    async def plan(
        self, name: str, request: ChatRequest, *, record: str | None = None
    ) -> CallPlan: ...

    def stand_ins(self, plan: CallPlan) -> list[CallPlan]: ...

    async def execute(
        self,
        plan: CallPlan,
        *,
        hold: Hold | None = None,
        run_id: str | None = None,
        step: str | None = None,
        item: str | None = None,
    ) -> ChatResponse: ...

    def record_cached(
        self, response: ChatResponse, *, run_id: str | None, step: str, item: str | None
    ) -> None: ...


RunStatus = Literal["ok", "partial", "failed"]


class StepOutcome(BaseModel):
    name: str
    status: Literal["ok", "partial", "failed", "skipped"]
    error: str | None = None
    items: int = 0
    items_failed: int = 0
    cost_usd: float = 0.0
    calls: int = 0
    cached: int = 0
    wall_s: float = 0.0
    degraded: list[str] = []
    skipped_for_time: bool = False


class RunResult(BaseModel):
    run_id: str | None
    pipeline: str
    status: RunStatus
    stop_reason: str | None = None
    output: Any = None
    values: dict[str, Any] = {}
    steps: dict[str, StepOutcome] = {}
    cost_usd: float = 0.0
    budget_usd: float | None = None
    deadline_s: float | None = None
    wall_s: float = 0.0


@dataclass
class RunEvent:
    kind: Literal["step_started", "item_done", "step_done", "run_done"]
    step: str | None = None
    items: int = 0
    detail: dict[str, Any] = field(default_factory=dict)


OnEvent = Callable[[RunEvent], None]


@dataclass
class _StepState:
    outcome: StepOutcome
    started: float = 0.0


class Runner:
    def __init__(
        self,
        caller: Caller,
        *,
        traces: TraceStore | None = None,
        cache: ResponseCache | None = None,
        concurrency: int = 8,
        backoff_s: float = 0.2,
        backoff_cap_s: float = 10.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        """Retryable errors are retried after a random wait of up to `backoff_s`, doubled at
        each attempt, never over `backoff_cap_s` ("full jitter"), or after the error's own
        `retry_after_s` when it has one; never past the run's deadline. `sleep` and `jitter`
        (a number in [0, 1)) are how the runner waits and draws."""
        self.caller = caller
        self.traces = traces
        self.cache = cache
        self.concurrency = concurrency
        self.backoff_s = backoff_s
        self.backoff_cap_s = backoff_cap_s
        self.sleep = sleep
        self.jitter = jitter

    def retry_delay(self, attempt: int, exc: ShoalError) -> float:
        """How long to wait before retry number `attempt` (1, 2, ...) after `exc`."""
        ceiling = min(self.backoff_cap_s, self.backoff_s * 2.0 ** (attempt - 1))
        delay = self.jitter() * ceiling
        if isinstance(exc, OverloadedError):  # the server said when it may have room
            delay = max(delay, exc.retry_after_s)
        return min(delay, self.backoff_cap_s)

    async def run(
        self,
        pipeline: Pipeline,
        inputs: Mapping[str, Any],
        *,
        budget_usd: float | None = None,
        deadline_s: float | None = None,
        on_event: OnEvent | None = None,
        run_id: str | None = None,
    ) -> RunResult:
        """Run `pipeline` on `inputs`. `run_id` names a trace run the caller already started
        (a server answers with the id before the run begins); by default the run starts its own."""
        missing = [name for name in pipeline.inputs if name not in inputs]
        if missing:
            raise PipelineError(
                f"pipeline {pipeline.name!r}: missing input(s) {', '.join(missing)}"
            )
        budget = Account.usd(f"run of {pipeline.name!r}", budget_usd)
        run = _Run(self, pipeline, dict(inputs), budget, deadline_s, on_event)
        run.run_id = run_id
        return await run.execute()


class _Run:
    def __init__(
        self,
        runner: Runner,
        pipeline: Pipeline,
        inputs: dict[str, Any],
        budget: Account,
        deadline_s: float | None,
        on_event: OnEvent | None,
    ) -> None:
        self.runner = runner
        self.pipeline = pipeline
        self.values: dict[str, Any] = dict(inputs)
        self.budget = budget
        self.deadline_s = deadline_s
        self.on_event = on_event or (lambda event: None)
        self.slots = asyncio.Semaphore(runner.concurrency)
        self.states = {
            name: _StepState(StepOutcome(name=name, status="skipped")) for name in pipeline.steps
        }
        self.started = 0.0
        self.run_id: str | None = None
        self.stop_reason: str | None = None
        self.budget_or_deadline_hit = False

    # -- the run -------------------------------------------------------------------------------

    @property
    def budget_usd(self) -> float | None:
        limit = self.budget.limit_pusd
        return None if limit is None else to_usd(limit)

    def time_left(self) -> float:
        if self.deadline_s is None:
            return float("inf")
        return self.deadline_s - (time.monotonic() - self.started)

    async def execute(self) -> RunResult:
        traces = self.runner.traces
        if traces is not None and self.run_id is None:
            self.run_id = traces.start_run(
                self.pipeline.name, budget_usd=self.budget_usd, deadline_s=self.deadline_s
            )
        self.started = time.monotonic()
        tasks: dict[str, asyncio.Task[None]] = {}
        try:
            async with asyncio.timeout(self.deadline_s):
                for name in self.pipeline.order:
                    tasks[name] = asyncio.ensure_future(self._step(name, tasks))
                await asyncio.gather(*tasks.values())
        except TimeoutError:
            self.stop_reason = f"deadline of {self.deadline_s:g} s reached"
            self.budget_or_deadline_hit = True
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
        return self._result()

    def _result(self) -> RunResult:
        outcomes = {name: state.outcome for name, state in self.states.items()}
        failed = [o for o in outcomes.values() if o.status == "failed"]
        output_ready = self.pipeline.output in self.values
        if self.stop_reason is None and failed:
            first = failed[0]
            self.stop_reason = f"step {first.name!r} failed: {first.error}"
        if output_ready and all(o.status == "ok" or o.skipped_for_time for o in outcomes.values()):
            status: RunStatus = "ok"
        elif output_ready or self.budget_or_deadline_hit:
            status = "partial"  # an answer with gaps, or stopped by money or time
        else:
            status = "failed"
        result = RunResult(
            run_id=self.run_id,
            pipeline=self.pipeline.name,
            status=status,
            stop_reason=self.stop_reason,
            output=_plain(self.values.get(self.pipeline.output)),
            values={k: _plain(v) for k, v in self.values.items() if k in self.pipeline.steps},
            steps=outcomes,
            cost_usd=self.budget.spent_usd,
            budget_usd=self.budget_usd,
            deadline_s=self.deadline_s,
            wall_s=time.monotonic() - self.started,
        )
        if self.runner.traces is not None and self.run_id is not None:
            self.runner.traces.finish_run(
                self.run_id,
                status,
                {
                    "stop_reason": self.stop_reason,
                    "steps": {k: v.model_dump() for k, v in outcomes.items()},
                    "wall_s": result.wall_s,
                    "output": result.output,
                },
            )
        self.on_event(RunEvent("run_done", detail={"status": status}))
        return result

    async def _step(self, name: str, tasks: dict[str, asyncio.Task[None]]) -> None:
        step = self.pipeline.steps[name]
        deps = [tasks[d] for d in step.inputs if d in self.pipeline.steps]
        if deps:
            await asyncio.gather(*deps, return_exceptions=True)
        blocked = [d for d in step.inputs if d in self.pipeline.steps and d not in self.values]
        if step.map_over is not None and self.values.get(step.map_over, []) is None:
            blocked.append(step.map_over)  # an optional step that failed: nothing to map over
        state = self.states[name]
        if blocked:
            state.outcome.error = f"needs {', '.join(blocked)}, which did not finish"
            return
        if self.stop_reason is not None:
            state.outcome.error = f"not started: {self.stop_reason}"
            return
        state.started = time.monotonic()
        args = {source: self.values[source] for source in step.inputs}
        items: list[Any] = [None]
        try:
            if step.map_over is not None:
                if not isinstance(args[step.map_over], list | tuple):
                    raise StepFailedError(f"maps over {step.map_over!r}, which did not give a list")
                items = list(args[step.map_over])
            state.outcome.items = len(items)
            self.on_event(RunEvent("step_started", name, items=len(items)))
            if step.map_over is None:
                self.values[name] = await self._one(step, args, None, None)
            else:
                results = await asyncio.gather(
                    *(self._one(step, args, item, str(i)) for i, item in enumerate(items)),
                    return_exceptions=True,
                )
                # Results stay aligned with the items: a failed item is None.
                aligned: list[Any] = []
                for result in results:
                    if isinstance(result, BaseException):
                        if not isinstance(result, Exception):
                            raise result
                        state.outcome.items_failed += 1
                        state.outcome.error = f"{type(result).__name__}: {result}"
                        self._note_stop(result)
                        aligned.append(None)
                    else:
                        aligned.append(result)
                if results and all(isinstance(r, StepSkippedError) for r in results):
                    raise StepSkippedError(f"step {name!r} skipped: too little time left")
                if items and state.outcome.items_failed == len(items) and not step.optional:
                    raise StepFailedError(f"every item failed; the last: {state.outcome.error}")
                self.values[name] = aligned
            state.outcome.status = "partial" if state.outcome.items_failed else "ok"
        except asyncio.CancelledError:
            # The deadline: calls in flight were cancelled (and are traced as such).
            state.outcome.status = "partial" if name in self.values else "failed"
            state.outcome.error = "cancelled at the deadline"
            raise
        except Exception as exc:
            state.outcome.error = f"{type(exc).__name__}: {exc}"
            self._note_stop(exc)
            if isinstance(exc, StepSkippedError):  # as its on_deadline says: not a failure
                # A skipped fan-out gives a gap per item, as failed items do.
                self.values[name] = [None] * len(items) if step.map_over is not None else None
                state.outcome.status, state.outcome.error = "skipped", None
                state.outcome.skipped_for_time = True
            elif step.optional:
                self.values[name] = None
                state.outcome.status = "partial"
            else:
                state.outcome.status = "failed"
        finally:
            state.outcome.wall_s = time.monotonic() - state.started
            self.on_event(
                RunEvent(
                    "step_done",
                    name,
                    items=len(items),
                    detail={"status": state.outcome.status, "degraded": state.outcome.degraded},
                )
            )

    def _note_stop(self, exc: BaseException) -> None:
        if isinstance(exc, BudgetExceededError | DeadlineReachedError):
            self.budget_or_deadline_hit = True
            if self.stop_reason is None:
                self.stop_reason = str(exc)

    async def _one(self, step: Step, args: dict[str, Any], item: Any, key: str | None) -> Any:
        if step.map_over is not None and item is None:
            self.on_event(RunEvent("item_done", step.name))
            return None  # the item failed upstream; it stays a gap
        async with self.slots:
            if isinstance(step, PythonStep):
                call_args = {k: v for k, v in args.items() if k in step.inputs}
                if step.map_over is not None:
                    call_args.pop(step.map_over, None)
                    call_args["item"] = item
                if step.executor == "ray":
                    from shoal.backends.ray_tasks import run_task

                    value = await run_task(step.fn, call_args)
                elif inspect.iscoroutinefunction(step.fn):
                    value = await step.fn(**call_args)
                else:  # plain Python may block (files, CPU): keep the event loop free
                    value = await asyncio.to_thread(step.fn, **call_args)
            else:
                value = await self._model_step(step, args, item, key)
        self.on_event(RunEvent("item_done", step.name))
        return value

    # -- model steps ---------------------------------------------------------------------------

    def _request(self, step: ModelStep, args: dict[str, Any], item: Any) -> ChatRequest:
        fields = {k: _render(v) for k, v in args.items()}
        if step.map_over is not None:
            fields["item"] = _render(item)
        messages = []
        if step.system:
            messages.append(Message(role="system", content=step.system))
        messages.append(Message(role="user", content=step.prompt.format(**fields)))
        return ChatRequest(
            messages=tuple(messages),
            max_tokens=step.max_tokens,
            temperature=step.temperature,
            json_schema=step.output.model_json_schema() if step.output else None,
        )

    async def _model_step(
        self, step: ModelStep, args: dict[str, Any], item: Any, key: str | None
    ) -> Any:
        request = self._request(step, args, item)
        model = step.model
        outcome = self.states[step.name].outcome
        attempt = 0
        fell_back = False
        while True:
            try:
                response = self._cached(step, model, request, key)
                if response is None:
                    record = f"{self.pipeline.name}/{step.name}" if step.record else None
                    planned = await self.runner.caller.plan(model, request, record=record)
                    plan = await self._fit(step, planned)
                    response = await self._call(step, plan, key)
            except OutputTruncatedError:
                if attempt >= step.retries:
                    raise
                attempt += 1
                request = request.model_copy(update={"max_tokens": request.max_tokens * 2})
                continue
            except OutputError as exc:
                if attempt >= step.retries:
                    raise
                attempt += 1
                request = _with_correction(request, exc)
                continue
            except StepSkippedError:
                raise
            except ShoalError as exc:
                if exc.retryable and attempt < step.retries:
                    delay = self.runner.retry_delay(attempt + 1, exc)
                    if delay < self.time_left():  # a wait past the deadline is no retry
                        attempt += 1
                        await self.runner.sleep(delay)
                        continue
                if step.fallback is not None and not fell_back:
                    outcome.degraded.append(
                        f"{model} failed ({type(exc).__name__}): fell back to {step.fallback}"
                    )
                    model, attempt, fell_back = step.fallback, 0, True
                    continue
                raise
            if step.output is None:
                return response.text
            try:
                return _parse(step.output, response.text)
            except ValueError as exc:
                if attempt >= step.retries:
                    raise StepFailedError(
                        f"step {step.name!r}: output does not fit its schema: {exc}"
                    ) from exc
                attempt += 1
                request = _with_correction(request, exc)

    def _cached(
        self, step: ModelStep, model: str, request: ChatRequest, key: str | None
    ) -> ChatResponse | None:
        """A free answer from the cache, before any budget or time check could refuse it."""
        cache = self.runner.cache
        hit = cache.get(model, request) if cache is not None else None
        if hit is not None:
            outcome = self.states[step.name].outcome
            outcome.cached += 1
            outcome.calls += 1
            self.runner.caller.record_cached(hit, run_id=self.run_id, step=step.name, item=key)
        return hit

    def _fits(self, plan: CallPlan) -> tuple[bool, bool]:
        """(fits the money left, fits the time left)."""
        return self.budget.fits(plan.worst_usd), plan.expected_s <= self.time_left()

    async def _fit(self, step: ModelStep, plan: CallPlan) -> CallPlan:
        """`plan`, or what the step does instead, before it starts, when the budget or the time
        left cannot fit it: when time is short, what its `on_deadline` says (its fallback, or
        skipping an optional step); else, or then, the dearest cheaper stand-in that fits."""
        money, time_ok = self._fits(plan)
        if money and time_ok:
            return plan
        low = "money" if not money else "time"
        outcome = self.states[step.name].outcome
        if not time_ok and step.on_deadline == "skip":
            outcome.degraded.append(
                f"skipped: {plan.name} expected to take {plan.expected_s:.1f} s, "
                f"{self.time_left():.1f} s left"
            )
            raise StepSkippedError(f"step {step.name!r} skipped: too little time left")
        if not time_ok and step.on_deadline == "fallback" and step.fallback is not None:
            fallback = await self.runner.caller.plan(step.fallback, plan.request)
            if all(self._fits(fallback)):
                outcome.degraded.append(f"{plan.name} -> {fallback.name} (time running low)")
                return fallback
        stand_ins = self.runner.caller.stand_ins(plan)
        for stand_in in stand_ins:
            if all(self._fits(stand_in)):
                outcome.degraded.append(f"{plan.name} -> {stand_in.name} ({low} running low)")
                return stand_in
        tried = " or ".join([plan.name, *(p.name for p in stand_ins)])
        if not money:
            raise BudgetExceededError(
                f"budget exhausted: ${self.budget.left_usd:.6f} left, not enough for {tried}"
            )
        raise DeadlineReachedError(
            f"deadline near: {self.time_left():.1f} s left, too little for {tried}"
        )

    async def _call(self, step: ModelStep, plan: CallPlan, key: str | None) -> ChatResponse:
        outcome = self.states[step.name].outcome
        hold = self.budget.reserve(plan.worst_usd)
        try:
            response = await self.runner.caller.execute(
                plan, hold=hold, run_id=self.run_id, step=step.name, item=key
            )
        finally:
            if not hold.settled:  # the caller settles; a caller that could not start releases
                hold.release()
            outcome.cost_usd += to_usd(hold.charged_pusd or 0)
            outcome.calls += 1
        if self.runner.cache is not None:
            self.runner.cache.put(plan.name, plan.request, response)
        return response


def _render(value: Any) -> str:
    if isinstance(value, BaseModel):
        return value.model_dump_json(indent=1)
    if isinstance(value, list | dict | tuple):
        return json.dumps(_plain(value), indent=1)
    return str(value)


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


def _parse(schema: type[BaseModel], text: str) -> BaseModel:
    """Validate JSON output; repair the common slips (prose around the object) once."""
    try:
        return schema.model_validate_json(text)
    except ValidationError as first:
        found = _OBJECT.search(text)
        if found and found.group(0) != text:
            try:
                return schema.model_validate_json(found.group(0))
            except ValidationError:
                pass
        raise ValueError(
            str(first).splitlines()[0] + ": " + str(first.errors()[0]["msg"])
        ) from first


def _with_correction(request: ChatRequest, problem: Exception) -> ChatRequest:
    note = Message(
        role="user",
        content=f"Your previous answer was not valid ({problem}). Answer again, in valid JSON.",
    )
    return request.model_copy(update={"messages": (*request.messages, note)})
