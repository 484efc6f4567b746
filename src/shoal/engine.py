"""The engine: the object the CLI, the server and Python users hold.

It owns the fleet, the named routes, and the trace store, and is the one place where a call by
name (a model id or a route name) is made and recorded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from shoal.errors import ConfigError, OutputError, ShoalError, UnknownModelError, UnknownRouteError
from shoal.fleet import Fleet
from shoal.messages import ChatRequest, ChatResponse, Completed, StreamEvent
from shoal.models.base import Model, expected_latency, worst_case_cost
from shoal.traces.store import CallRecord, TraceStore

log = logging.getLogger(__name__)

TRACES_FILE = "traces.sqlite"


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
        self._routes: dict[str, Model] = {}
        if self.fleet.settings.routes:
            from shoal.routing.config import build_route

            for spec in self.fleet.settings.routes:
                self.add_route(spec.name, build_route(spec, self.fleet, traces=self.traces))

    # -- names ---------------------------------------------------------------------------------

    def add_route(self, name: str, model: Model) -> None:
        """Serve `model` (a routed model) under `name`; a route name never shadows a model id."""
        if name in self.fleet.ids:
            raise ConfigError(f"route {name!r} has the same name as a model of the fleet")
        self._routes[name] = model

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

    # -- calls ---------------------------------------------------------------------------------

    async def generate(
        self,
        name: str,
        request: ChatRequest,
        *,
        run_id: str | None = None,
        step: str | None = None,
        item: str | None = None,
    ) -> ChatResponse:
        """Call a model or route by name and record the call (and any cascade attempts)."""
        model = self.model(name)
        started = time.time()
        try:
            response = await model.generate(request)
        except ShoalError as exc:
            self._record_failure(name, exc, started, run_id, step, item)
            raise
        except asyncio.CancelledError:  # the caller went away (a client disconnected)
            self._record_cancelled(name, started, run_id, step, item)
            raise
        self.record(
            response, started=started, route=self._route(name), run_id=run_id, step=step, item=item
        )
        return response

    async def stream(
        self,
        name: str,
        request: ChatRequest,
        *,
        run_id: str | None = None,
        step: str | None = None,
        item: str | None = None,
    ) -> AsyncIterator[StreamEvent]:
        model = self.model(name)
        started = time.time()
        finished = False
        try:
            async for event in model.stream(request):
                if isinstance(event, Completed):
                    finished = True
                    self.record(
                        event.response,
                        started=started,
                        route=self._route(name),
                        run_id=run_id,
                        step=step,
                        item=item,
                    )
                yield event
        except ShoalError as exc:
            finished = True
            self._record_failure(name, exc, started, run_id, step, item)
            raise
        finally:
            if not finished:  # the consumer left before the end
                self._record_cancelled(name, started, run_id, step, item)

    def _record_cancelled(
        self,
        name: str,
        started: float,
        run_id: str | None,
        step: str | None,
        item: str | None,
    ) -> None:
        self.traces.record_call(
            CallRecord(
                model=name,
                status="cancelled",
                route=self._route(name),
                run_id=run_id,
                step=step,
                item=item,
                started_at=started,
                finished_at=time.time(),
                latency_s=time.time() - started,
            )
        )

    def _route(self, name: str) -> str | None:
        return name if name in self._routes else None

    def record(
        self,
        response: ChatResponse,
        *,
        started: float,
        route: str | None = None,
        run_id: str | None = None,
        step: str | None = None,
        item: str | None = None,
        cached: bool = False,
    ) -> None:
        """Record a response and each attempt before it, one trace row per model call."""
        decision = response.decision.model_dump(mode="json") if response.decision else None
        for answer in (*response.attempts, response):
            self.traces.record_call(
                CallRecord(
                    model=answer.model,
                    route=route,
                    run_id=run_id,
                    step=step,
                    item=item,
                    input_tokens=answer.usage.input_tokens,
                    output_tokens=answer.usage.output_tokens,
                    latency_s=answer.latency_s,
                    compute_s=answer.compute_s,
                    cost_usd=0.0 if cached else answer.cost_usd,
                    cached=cached,
                    decision=decision,
                    started_at=started,
                    finished_at=time.time(),
                )
            )

    def _record_failure(
        self,
        name: str,
        exc: ShoalError,
        started: float,
        run_id: str | None,
        step: str | None,
        item: str | None,
    ) -> None:
        """Trace a failed call; an answer in the wrong form was still computed and is costed."""
        done = exc.response if isinstance(exc, OutputError) else None
        for attempt in done.attempts if done is not None else exc.attempts:
            self.record(
                attempt,
                started=started,
                route=self._route(name),
                run_id=run_id,
                step=step,
                item=item,
            )
        self.traces.record_call(
            CallRecord(
                model=done.model if done else name,
                status="error",
                error=f"{type(exc).__name__}: {exc}",
                route=self._route(name),
                run_id=run_id,
                step=step,
                item=item,
                input_tokens=done.usage.input_tokens if done else 0,
                output_tokens=done.usage.output_tokens if done else 0,
                latency_s=time.time() - started,
                compute_s=done.compute_s if done else 0.0,
                cost_usd=done.cost_usd if done else 0.0,
                started_at=started,
                finished_at=time.time(),
            )
        )

    # -- the pipeline runner's view (shoal.pipeline.run.Caller) ---------------------------------

    async def call(
        self, model: str, request: ChatRequest, *, run_id: str | None, step: str, item: str | None
    ) -> ChatResponse:
        return await self.generate(model, request, run_id=run_id, step=step, item=item)

    def record_cached(
        self, response: ChatResponse, *, run_id: str | None, step: str, item: str | None
    ) -> None:
        self.record(response, started=time.time(), run_id=run_id, step=step, item=item, cached=True)

    def worst_case_cost(self, name: str, request: ChatRequest) -> float:
        if name in self._routes:
            return self._routes[name].worst_case_cost(request)
        return worst_case_cost(self.fleet.card(name), request)

    def expected_latency(self, name: str, request: ChatRequest) -> float:
        if name in self._routes:
            return self._routes[name].expected_latency(request)
        return expected_latency(self.fleet.card(name), request)

    def cheaper(self, name: str) -> str | None:
        """The model of the fleet that costs most while still less than `name` for a typical
        call: what a run degrades to when money or time runs low."""
        typical = ChatRequest.of("x" * 2000, max_tokens=200)
        ceiling = self.worst_case_cost(name, typical)
        below = [
            (self.worst_case_cost(m, typical), m)
            for m in self.fleet.ids
            if m != name and self.worst_case_cost(m, typical) < ceiling
        ]
        return max(below)[1] if below else None

    async def aclose(self) -> None:
        for route in self._routes.values():
            await route.aclose()
        await self.fleet.aclose()
        self.traces.close()
