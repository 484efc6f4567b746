"""The runs a server holds: the wire types of a run, one run's events and result, and the book
of runs (bounded in flight, bounded once finished). The endpoints that use them are in `runs`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncGenerator, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shoal.errors import RateLimitedError, UnknownPipelineError, UnknownRunError
from shoal.ledger import Hold
from shoal.pipeline.graph import Pipeline
from shoal.pipeline.run import RunEvent, RunResult
from shoal.server.keys import KeyState

log = logging.getLogger(__name__)

MAX_RUNS = 16
KEEP_RUNS = 256
MAX_EVENTS = 10_000


# -- the wire ------------------------------------------------------------------------------------


class RunRequest(BaseModel):
    """The body of `POST /v1/pipelines/{name}/runs`."""

    model_config = ConfigDict(extra="forbid")

    inputs: dict[str, Any]
    budget_usd: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)
    deadline_s: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)


RunStatus = Literal["running", "ok", "partial", "failed"]


class RunInfo(BaseModel):
    """A run as the server reports it; `result` once it has finished."""

    id: str
    pipeline: str
    status: RunStatus
    result: RunResult | None = None


class RunEventData(BaseModel):
    """One event of a run's stream; `run_done` carries the result."""

    kind: Literal["step_started", "item_done", "step_done", "run_done"]
    step: str | None = None
    items: int = 0
    detail: dict[str, Any] = {}
    result: RunResult | None = None


# -- the runs an app holds -----------------------------------------------------------------------


class Run:
    """One run: its events as they happen and, at the end, its result."""

    def __init__(self, run_id: str, pipeline: str, key_id: str | None) -> None:
        self.id = run_id
        self.pipeline = pipeline
        self.key_id = key_id
        self.hold: Hold | None = None
        self.events: list[RunEventData] = []
        self.result: RunResult | None = None
        self.task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def info(self) -> RunInfo:
        status: RunStatus = "running" if self.result is None else self.result.status
        return RunInfo(id=self.id, pipeline=self.pipeline, status=status, result=self.result)

    def add(self, event: RunEventData) -> None:
        if event.kind == "item_done" and len(self.events) >= MAX_EVENTS:
            return
        self.events.append(event)
        self._wake.set()
        self._wake = asyncio.Event()

    def on_event(self, event: RunEvent) -> None:
        """The runner's events; its `run_done` is replaced by one that carries the result."""
        if event.kind != "run_done":
            self.add(
                RunEventData(
                    kind=event.kind, step=event.step, items=event.items, detail=event.detail
                )
            )

    async def follow(self) -> AsyncGenerator[RunEventData, None]:
        """Every event so far, then each new one, up to and including `run_done`."""
        seen = 0
        while True:
            wake = self._wake
            while seen < len(self.events):
                event = self.events[seen]
                seen += 1
                yield event
                if event.kind == "run_done":
                    return
            await wake.wait()


class RunBook:
    """The pipelines an app serves and its runs: bounded in flight, bounded once finished."""

    def __init__(self, pipelines: Mapping[str, Pipeline], *, max_runs: int, keep_runs: int) -> None:
        self.pipelines = dict(pipelines)
        self.max_runs = max_runs
        self.keep_runs = keep_runs
        self.runs: dict[str, Run] = {}
        self.running = 0
        self._finished: deque[str] = deque()

    def pipeline(self, name: str) -> Pipeline:
        if name not in self.pipelines:
            raise UnknownPipelineError(name, self.pipelines)
        return self.pipelines[name]

    def find(self, pipeline: str, run_id: str, key: KeyState | None) -> Run:
        self.pipeline(pipeline)
        run = self.runs.get(run_id)
        if run is None or run.pipeline != pipeline or run.key_id != (key.id if key else None):
            raise UnknownRunError(pipeline, run_id)
        return run

    def check_room(self) -> None:
        if self.running >= self.max_runs:
            raise RateLimitedError(
                f"the server runs at most {self.max_runs} pipelines at once; retry shortly",
                retry_after_s=1.0,
            )

    def started(self, run: Run) -> None:
        self.runs[run.id] = run
        self.running += 1

    def finished(self, run: Run, result: RunResult) -> None:
        run.result = result
        run.add(RunEventData(kind="run_done", detail={"status": result.status}, result=result))
        self.running -= 1
        self._finished.append(run.id)
        while len(self._finished) > self.keep_runs:
            self.runs.pop(self._finished.popleft(), None)

    async def aclose(self) -> None:
        """Cancel the runs in flight (each settles and records how it ended)."""
        tasks = [run.task for run in self.runs.values() if run.task and not run.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
