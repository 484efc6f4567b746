"""The engine: the object the CLI, the server and Python users hold.

It owns the fleet, the named routes and the trace store, and is the one place where a call by
name (a model id or a route name) is planned, run, charged and recorded:

    plan = await engine.plan(name, request)     # resolve the name, decide once, price it
    hold = account.reserve(plan.worst_usd)      # the caller's ledger account (run, key)
    async for event in engine.stream(plan, hold=hold):   # run exactly that decision
        ...
    # the engine settled `hold` to what the call cost and traced the same figures

`execute` runs the same call asking the models for whole answers, into the same tab. However a
call ends (answered, failed, cancelled by its caller), its charge is computed here once, from
the answers it got and, for work cut short, what it measurably consumed
(`ModelCard.partial_cost`); the hold is settled to that charge and the trace rows sum to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

from shoal.calls import CallPlan
from shoal.cards import ModelCard
from shoal.compare import Pair, agreement_of, slug
from shoal.errors import ConfigError, OutputError, ShoalError, UnknownModelError, UnknownRouteError
from shoal.fleet import Fleet
from shoal.ledger import Account, Hold
from shoal.messages import (
    ChatRequest,
    ChatResponse,
    Completed,
    Escalated,
    RouteDecision,
    StageFailed,
    StreamEvent,
    TextDelta,
)
from shoal.models.base import Model, collect, events
from shoal.money import to_pico, to_usd, whole_pico
from shoal.routing.base import RoutedModel
from shoal.settings import ShadowSpec
from shoal.shadow import Shadow
from shoal.speeds import LiveSpeeds
from shoal.traces.recordings import recording
from shoal.traces.store import CallRecord, TraceStore

log = logging.getLogger(__name__)

# Set inside a shadow call's task: its calls are not served traffic.
_IN_SHADOW: contextvars.ContextVar[bool] = contextvars.ContextVar("in_shadow", default=False)


TRACES_FILE = "traces.sqlite"
SHADOW_GRACE_S = 30.0  # how long closing the engine waits for shadow calls in flight
SPEEDS_FILE = "speeds.json"


class Engine:
    def __init__(
        self,
        fleet: Fleet | None = None,
        *,
        traces: TraceStore | None = None,
        trace_path: str | Path | None = None,
    ) -> None:
        self.fleet = fleet or Fleet()
        if traces is None:
            traces = TraceStore(trace_path or self.fleet.cache_dir / TRACES_FILE)
        self.traces = traces
        # How fast each model has been answering lately, kept next to the traces (in memory
        # only beside an in-memory trace store).
        in_memory = str(traces.path) == ":memory:"
        self.speeds = LiveSpeeds(None if in_memory else Path(traces.path).parent / SPEEDS_FILE)
        self._routes: dict[str, Model] = {}  # routed models, or models served under a name
        self._recorded: set[str] = set()  # names whose answers are recorded for distillation
        self._shadows: dict[str, Shadow] = {}  # by route
        self._shadow_tasks: dict[asyncio.Task[None], tuple[str, ...]] = {}  # and their models
        self._busy: Counter[str] = Counter()  # served calls in flight, per model
        if self.fleet.settings.routes:
            from shoal.routing.config import build_route

            for spec in self.fleet.settings.routes:
                route = build_route(spec, self.fleet, traces=self.traces)
                self.add_route(spec.name, route, record=spec.record)
                if spec.shadow is not None:
                    self.shadow(spec.name, spec.shadow)

    # -- names ---------------------------------------------------------------------------------

    def add_route(self, name: str, model: Model, *, record: bool = False) -> None:
        """Serve `model` (a routed model) under `name`; a route name never shadows a model id.
        With `record`, every answer of the route is recorded with its request (`record`)."""
        if name in self.fleet.ids:
            raise ConfigError(f"route {name!r} has the same name as a model of the fleet")
        self._routes[name] = model
        if isinstance(model, RoutedModel):  # a route's own calls (drift checks) come through here
            model.bind(self)
        self.record(name, record)

    def record(self, name: str, on: bool = True) -> None:
        """Record (or stop recording) the answers of calls to `name`, a route or a model id, with
        their requests, in the trace store: the data `shoal distil` trains specialists on."""
        if on:
            self._recorded.add(name)
        else:
            self._recorded.discard(name)

    def recorded(self, name: str) -> bool:
        """Whether the answers of calls to `name` are recorded (`record`)."""
        return name in self._recorded

    @property
    def route_names(self) -> list[str]:
        return list(self._routes)

    @property
    def names(self) -> list[str]:
        return [*self.fleet.ids, *self._routes]

    def route(self, name: str) -> Model:
        """The route called `name` (an error lists the valid routes)."""
        if name not in self._routes:
            raise UnknownRouteError(name, self._routes)
        return self._routes[name]

    def model(self, name: str) -> Model:
        """The model or route called `name`."""
        if name in self._routes:
            return self._routes[name]
        if name in self.fleet.ids:
            return self.fleet.model(name)
        raise UnknownModelError(name, self.names)

    # -- plans ---------------------------------------------------------------------------------

    async def plan(self, name: str, request: ChatRequest, *, record: str | None = None) -> CallPlan:
        """What a call of `name` with `request` will run: a route decides here, once (off the
        event loop when deciding embeds the query), and the call is priced by the cards at the
        speeds the models have shown lately. Its answer is recorded under `record` (a pipeline
        step's `PIPELINE/STEP`), or under `name` when `name` is recorded (`record`)."""
        plan = await self._plan(name, request)
        target = record or (name if name in self._recorded else None)
        return plan if target is None else replace(plan, record=target)

    async def _plan(self, name: str, request: ChatRequest) -> CallPlan:
        model = self._routes.get(name)
        if model is None:
            return self._plan_model(name, request)
        if not isinstance(model, RoutedModel):  # a model served under a route name
            card, live = model.card, self.speeds.get(model.id)
            return CallPlan(
                name,
                request,
                (model.id,),
                card.worst_case_cost(request, live),
                card.expected_seconds(request, live),
                route=name,
            )
        if model.blocking:
            decision = await asyncio.to_thread(model.decide, request, self.speeds.get)
        else:
            decision = model.decide(request, self.speeds.get)
        return CallPlan(
            name,
            request,
            decision.models,
            model.worst_case_cost(request, decision, self.speeds.get),
            model.expected_seconds(request, decision, self.speeds.get),
            route=name,
            decision=decision,
        )

    def _plan_model(self, name: str, request: ChatRequest) -> CallPlan:
        if name not in self.fleet.ids:
            raise UnknownModelError(name, self.names)
        card, live = self.fleet.card(name), self.speeds.get(name)
        return CallPlan(
            name,
            request,
            (name,),
            card.worst_case_cost(request, live),
            card.expected_seconds(request, live),
        )

    def stand_ins(self, plan: CallPlan) -> list[CallPlan]:
        """The same request planned on each model of the fleet that costs less than `plan`,
        dearest first: what a run degrades to when money or time runs low. A specialist stands in
        for nothing: it answers only its own task."""
        plans = [
            self._plan_model(m, plan.request)
            for m in self.fleet.ids
            if m not in plan.models and not self.fleet.card(m).single_task
        ]
        cheaper = [p for p in plans if p.worst_usd < plan.worst_usd]
        return sorted(cheaper, key=lambda p: p.worst_usd, reverse=True)

    # -- calls ---------------------------------------------------------------------------------

    async def generate(
        self,
        name: str,
        request: ChatRequest,
        *,
        hold: Hold | None = None,
        run_id: str | None = None,
        step: str | None = None,
        item: str | None = None,
    ) -> ChatResponse:
        """Plan and run one call by name (`plan` then `execute`)."""
        plan = await self.plan(name, request)
        return await self.execute(plan, hold=hold, run_id=run_id, step=step, item=item)

    async def execute(
        self,
        plan: CallPlan,
        *,
        hold: Hold | None = None,
        run_id: str | None = None,
        step: str | None = None,
        item: str | None = None,
    ) -> ChatResponse:
        """Run `plan` and return its answer, the models asked for whole answers: a route runs
        the loop of `stream`, collected; a single model answers straight into the same tab."""
        model, request, tab = self._start(plan, hold, run_id, step, item)
        if isinstance(model, RoutedModel):
            answer = self._run(model, request, tab, streamed=False)
            return await collect(answer, plan.name)
        with tab.closing():
            response = await model.generate(request)
            tab.answered(response)
            return response

    async def stream(
        self,
        plan: CallPlan,
        *,
        hold: Hold | None = None,
        run_id: str | None = None,
        step: str | None = None,
        item: str | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """Run `plan`: its decision, never a new one. With a `hold`, the hold is settled when the
        call ends, and on a budget (an account with a limit) the call may spend what is held and
        no more (a local model stops early)."""
        model, request, tab = self._start(plan, hold, run_id, step, item)
        run = self._run(model, request, tab, streamed=True)
        async with contextlib.aclosing(cast(AsyncGenerator[StreamEvent, None], run)) as events:
            async for event in events:
                yield event

    def _start(
        self,
        plan: CallPlan,
        hold: Hold | None,
        run_id: str | None,
        step: str | None,
        item: str | None,
    ) -> tuple[Model, ChatRequest, _Tab]:
        """The model that runs `plan`, the request it gets (capped at what is held, on a
        budget), and the tab that charges and traces the call however it ends."""
        model = self.model(plan.name)
        request = plan.request
        if hold is not None and hold.account.limit_pusd is not None:
            cap = hold.amount_usd
            if request.max_cost_usd is not None:
                cap = min(cap, request.max_cost_usd)
            request = request.model_copy(update={"max_cost_usd": cap})
        if not _IN_SHADOW.get():
            self._preempt(plan.models)
        return model, request, _Tab(self, plan, request, hold, run_id, step, item)

    async def _run(
        self, model: Model, request: ChatRequest, tab: _Tab, *, streamed: bool
    ) -> AsyncIterator[StreamEvent]:
        if isinstance(model, RoutedModel):
            answer = model.stream(request, tab.plan.decision, streamed=streamed)
        else:
            answer = events(model, request, streamed=streamed)
        with tab.closing():
            async with contextlib.aclosing(cast(AsyncGenerator[StreamEvent, None], answer)):
                async for event in answer:
                    if isinstance(event, TextDelta):
                        tab.delivered += 1
                    elif isinstance(event, Escalated):
                        tab.escalated(event.response)
                    elif isinstance(event, StageFailed):
                        tab.stage_failed(event)
                    elif isinstance(event, Completed):
                        tab.answered(event.response)
                    yield event

    async def charged_call(
        self,
        name: str,
        request: ChatRequest,
        account: Account,
        *,
        step: str | None = None,
    ) -> tuple[ChatResponse, float]:
        """Plan a call of `name`, hold its worst case on `account`, run it: the answer, and what
        the account was charged (work that is not a served request: replays, shadows, judges)."""
        plan = await self.plan(name, request)
        return await self.charged(plan, account, step=step)

    async def charged(
        self, plan: CallPlan, account: Account, *, step: str | None = None
    ) -> tuple[ChatResponse, float]:
        hold = account.reserve(plan.worst_usd)
        try:
            response = await self.execute(plan, hold=hold, step=step)
        finally:
            if not hold.settled:
                hold.release()
        return response, to_usd(hold.charged_pusd or 0)

    # -- shadows -------------------------------------------------------------------------------

    def shadow(self, route: str, spec: ShadowSpec) -> Shadow:
        """Ask `spec.candidate` a sampled share of `route`'s live requests, off the request path
        (`shoal route report ROUTE` compares them)."""
        self._shadows[route] = Shadow(
            route, spec, self.shadow_table(self.fleet, route, spec.candidate)
        )
        return self._shadows[route]

    @staticmethod
    def shadow_table(fleet: Fleet, route: str, candidate: str) -> Path:
        """Where the answers of `route`'s shadow `candidate` go (an outcome table)."""
        return fleet.cache_dir / "shadows" / f"{slug(route)}--{slug(candidate)}.csv"

    def _after_answer(self, plan: CallPlan, response: ChatResponse) -> None:
        shadow = self._shadows.get(plan.route or "")
        if shadow is None or not shadow.wants(response):
            return
        task = asyncio.get_running_loop().create_task(self._shadow_call(shadow, plan, response))
        self._shadow_tasks[task] = ()

    async def _shadow_call(self, shadow: Shadow, plan: CallPlan, served: ChatResponse) -> None:
        _IN_SHADOW.set(True)  # this task's own calls neither preempt nor cast shadows
        task = asyncio.current_task()
        assert task is not None
        shadow.in_flight += 1
        served_at = time.time()
        try:
            candidate = await self.plan(shadow.candidate, plan.request)
            if any(self._busy[m] > 0 for m in candidate.models):
                shadow.dropped += 1  # the served traffic has the models: not now
                return
            self._shadow_tasks[task] = candidate.models
            step = f"shadow of {shadow.route}"
            answer, _ = await self.charged(candidate, shadow.account, step=step)

            async def judge(name: str, request: ChatRequest) -> tuple[ChatResponse, float]:
                return await self.charged_call(name, request, shadow.account, step=step)

            rec = recording(shadow.route, plan.request, served, served_at)
            rec = replace(rec, id=time.time_ns())
            score, _ = await agreement_of(shadow.agreement, rec, answer.text, judge)
            shadow.write(Pair(rec, answer.text, answer.total_cost_usd, answer.latency_s, score))
        except asyncio.CancelledError:
            shadow.dropped += 1  # a served call needed the model
        except ShoalError as exc:
            shadow.dropped += 1
            log.info("shadow of %s on %s: %s", shadow.route, shadow.candidate, exc)
        finally:
            shadow.in_flight -= 1
            self._shadow_tasks.pop(task, None)

    def _preempt(self, models: tuple[str, ...]) -> None:
        """Cancel shadow calls on any of `models`: a served call needs them."""
        for task, busy in list(self._shadow_tasks.items()):
            if set(busy) & set(models):
                task.cancel()

    # -- records -------------------------------------------------------------------------------

    def record_cached(
        self, response: ChatResponse, *, run_id: str | None, step: str, item: str | None
    ) -> None:
        """A pipeline's answer from its cache: traced, at no cost."""
        now = time.time()
        decision = response.decision.model_dump(mode="json") if response.decision else None
        for answer in (*response.attempts, response):
            self.traces.record_call(
                _record(answer, now, now, run_id, step, item, decision).model_copy(
                    update={"cost_usd": 0.0, "cached": True}
                )
            )

    async def aclose(self) -> None:
        shadows = list(self._shadow_tasks)
        if shadows:  # their served answers are delivered: let them finish, within a grace
            _, late = await asyncio.wait(shadows, timeout=SHADOW_GRACE_S)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        for route in self._routes.values():
            await route.aclose()
        await self.fleet.aclose()
        self.speeds.save()
        self.traces.close()


def _record(
    answer: ChatResponse,
    started: float,
    finished: float,
    run_id: str | None,
    step: str | None,
    item: str | None,
    decision: dict[str, object] | None,
    route: str | None = None,
) -> CallRecord:
    return CallRecord(
        model=answer.model,
        route=route,
        run_id=run_id,
        step=step,
        item=item,
        input_tokens=answer.usage.input_tokens,
        output_tokens=answer.usage.output_tokens,
        latency_s=answer.latency_s,
        compute_s=answer.compute_s,
        cost_usd=whole_pico(answer.cost_usd),
        decision=decision,
        started_at=started,
        finished_at=finished,
        ttft_s=answer.ttft_s,
    )


@dataclass
class _Tab:
    """One call's account while it runs: what it delivered and what answers it got, and how it
    ended. The first ending settles the hold and writes the trace; later ones do nothing."""

    engine: Engine
    plan: CallPlan
    request: ChatRequest
    hold: Hold | None
    run_id: str | None
    step: str | None
    item: str | None
    started: float = field(default_factory=time.time)
    clock: float = field(default_factory=time.perf_counter)
    delivered: int = 0
    attempts: list[ChatResponse] = field(default_factory=list)
    # Stages a route moved on from, each with the number of answers paid before it.
    stages_failed: list[tuple[int, StageFailed]] = field(default_factory=list)
    closed: bool = False
    shadowed: bool = field(default_factory=lambda: _IN_SHADOW.get())  # a shadow's own call

    def __post_init__(self) -> None:
        if not self.shadowed:
            self.engine._busy.update(self.plan.models)

    @contextlib.contextmanager
    def closing(self) -> Iterator[None]:
        """Around the model's work: a failure closes the tab as failed, and leaving early (the
        caller gone, a cancellation) as cancelled."""
        try:
            yield
        except ShoalError as exc:
            self.failed(exc)
            raise
        finally:
            self.abandoned()

    def escalated(self, response: ChatResponse) -> None:
        self.attempts.append(response)
        self.delivered = 0

    def stage_failed(self, event: StageFailed) -> None:
        self.stages_failed.append((len(self.attempts), event))
        self.delivered = 0

    def answered(self, response: ChatResponse) -> None:
        if self.closed:
            return
        for answer in (*response.attempts, response):
            if self.engine.fleet.runs_locally(answer.model):
                self.engine.speeds.observe(answer)
        recorded: int | None = None  # the recording's id: the call's trace links to it
        try:
            if self.plan.record is not None and not self.shadowed:
                example = recording(self.plan.record, self.plan.request, response, time.time())
                recorded = self.engine.traces.record_example(example)
        finally:  # closed (its hold settled, its trace written) even when recording fails
            self._close([*response.attempts, response], None, response.decision, recorded)
        if self.shadowed:
            return
        self.engine._after_answer(self.plan, response)

    def failed(self, exc: ShoalError) -> None:
        done = exc.response if isinstance(exc, OutputError) else None
        if done is not None:  # answered in the wrong form: that answer is paid for
            self._close(list(done.attempts), ("error", exc, done.model, done))
            return
        paid = list(exc.attempts) or self.attempts
        model = exc.model_id or self._running(paid)
        self._close(paid, ("error", exc, model, None))

    def abandoned(self) -> None:
        if not self.closed:
            self._close(self.attempts, ("cancelled", None, self._running(self.attempts), None))

    def _running(self, paid: list[ChatResponse]) -> str:
        """The model working when the call ended: the stage after the answers paid for."""
        models = self.plan.models
        return models[min(len(paid) + len(self.stages_failed), len(models) - 1)]

    def _card(self, model: str) -> ModelCard | None:
        """The card of `model`: a member of the planned route, or a model of the fleet."""
        routed = self.engine._routes.get(self.plan.name)
        if isinstance(routed, RoutedModel):
            for card in routed.candidates:
                if card.id == model:
                    return card
        elif routed is not None and routed.id == model:  # a model served under a route name
            return routed.card
        try:
            return self.engine.model(model).card
        except ShoalError:
            return None

    def _cut_short(self, model: str, paid: list[ChatResponse], exc: ShoalError | None) -> float:
        """What the unfinished stage consumed: nothing when it failed before any work."""
        if exc is not None and exc.before_work:
            return 0.0
        card = self._card(model)
        if card is None:
            return 0.0
        seconds = time.perf_counter() - self.clock - sum(a.latency_s for a in paid)
        seconds -= sum(f.seconds for _, f in self.stages_failed)
        return card.partial_cost(self.request, seconds=max(seconds, 0.0), delivered=self.delivered)

    def _close(
        self,
        paid: list[ChatResponse],
        ending: tuple[str, ShoalError | None, str, ChatResponse | None] | None,
        decided: RouteDecision | None = None,
        recording_id: int | None = None,
    ) -> None:
        if self.closed:
            return
        self.closed = True
        engine, now = self.engine, time.time()
        if not self.shadowed:
            engine._busy.subtract(self.plan.models)
        decided = decided or self.plan.decision
        decision = decided.model_dump(mode="json") if decided else None
        run_id, step, item, route = self.run_id, self.step, self.item, self.plan.route

        def unanswered(
            model: str, status: str, error: str | None, seconds: float, cost: float
        ) -> CallRecord:
            """The row of a model call that gave no answer (failed, cut short)."""
            return CallRecord(
                model=model,
                status=status,
                error=error,
                route=route,
                latency_s=seconds,
                cost_usd=whole_pico(cost),
                decision=decision,
                started_at=self.started,
                finished_at=now,
                run_id=run_id,
                step=step,
                item=item,
            )

        records = [_record(a, self.started, now, run_id, step, item, decision, route) for a in paid]
        if recording_id is not None:
            records = [r.model_copy(update={"recording_id": recording_id}) for r in records]
        for k, (paid_before, failed) in enumerate(self.stages_failed):
            cost, card = 0.0, self._card(failed.model)
            if card is not None and not failed.before_work:
                cost = card.partial_cost(self.request, seconds=failed.seconds, delivered=0)
            row = unanswered(failed.model, "error", failed.error, failed.seconds, cost)
            records.insert(paid_before + k, row)  # in the order the stages ran
        if ending is not None:
            status, exc, model, done = ending
            error = f"{type(exc).__name__}: {exc}" if exc is not None else None
            seconds = time.perf_counter() - self.clock
            if done is None:
                row = unanswered(model, status, error, seconds, self._cut_short(model, paid, exc))
            else:  # answered in the wrong form: its usage and compute are known
                row = _record(done, self.started, now, run_id, step, item, decision, route)
                row = row.model_copy(
                    update={"status": status, "error": error, "latency_s": seconds}
                )
            records.append(row)
        charged = sum(to_pico(r.cost_usd) for r in records)
        if self.hold is not None:
            self.hold.settle(charged)
            if self.hold.account.owner is not None:  # an API key's call: traced under its name
                records = [r.model_copy(update={"key": self.hold.account.owner}) for r in records]
        for record in records:
            engine.traces.record_call(record)
