"""A local model run as a Ray Serve deployment, called through a deployment handle behind the
same `Model` interface.

Each replica of the deployment holds one `LlamaCppModel` (llama.cpp inside the replica's
process); `RayModel`, in the caller's process, sends it `ChatRequest`s and gets back the
replica's `ChatResponse`, costed there from the replica's measured compute, so routes, cascades,
budgets and traces work as they do in process. What differs is only the wire:

- a caller that stops listening cancels the call on the replica (which stops between two
  tokens, as in process);
- a replica that dies mid-call (its process killed, its node gone) is retried on another
  replica, `attempts` times in all, as long as nothing was streamed yet; then the call fails
  with `NoReplicaError` (retryable: 503 with `Retry-After` at the server), as does a call to a
  deployment that is gone (deleted, or failed): the next call deploys it again (or finds it).
  Only the answer that came back is charged and traced;
- a full queue (`max_queued_requests` waiting for a replica) is `OverloadedError`: 503 with
  `Retry-After` at the server.

An error raised in a replica crosses back as itself (its class from `shoal.errors` and its
attributes), not as Ray's wrapper.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal import errors
from shoal.backends.ray_cluster import QUIET_LOGS, import_ray
from shoal.cards import ModelCard
from shoal.errors import BackendError, NoReplicaError, OverloadedError, ShoalError
from shoal.messages import ChatRequest, ChatResponse, Completed, StreamEvent
from shoal.models.base import Model
from shoal.settings import RayPlacement

log = logging.getLogger(__name__)

APP_PREFIX = "shoal-model-"
# What a caller is told to wait when no replica is left: about what Serve takes to start one.
RETRY_AFTER_S = 5.0


@dataclass(frozen=True)
class Failure:
    """A `ShoalError` raised in a replica, in a form that crosses processes whole."""

    kind: str
    message: str
    state: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, exc: ShoalError) -> Failure:
        return cls(type(exc).__name__, str(exc), dict(vars(exc)))

    def error(self) -> ShoalError:
        kind = getattr(errors, self.kind, None)
        if not (isinstance(kind, type) and issubclass(kind, ShoalError)):
            return BackendError(f"{self.kind}: {self.message}")
        exc = kind.__new__(kind)
        Exception.__init__(exc, self.message)
        exc.__dict__.update(self.state)
        return exc


class ModelReplica:
    """One replica of a model's deployment: llama.cpp in this process, weights loaded before the
    replica takes calls."""

    async def __init__(  # type: ignore[misc]  # Ray Serve awaits an async constructor
        self, card: ModelCard, path: str, threads: int, batch: int, max_queue: int
    ) -> None:
        from shoal.models.llamacpp import LlamaCppModel

        self.model = LlamaCppModel(
            card, path=path, threads=threads, batch=batch, max_queue=max_queue
        )
        await self.model.load()

    async def generate(self, request: ChatRequest) -> ChatResponse | Failure:
        try:
            return await self.model.generate(request)
        except ShoalError as exc:
            return Failure.of(exc)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent | Failure]:
        try:
            async for event in self.model.stream(request):
                yield event
        except ShoalError as exc:
            yield Failure.of(exc)

    async def pid(self) -> int:
        """This replica's process id (tests kill it to check a call survives)."""
        import os

        return os.getpid()

    async def node(self) -> str:
        """The id of the Ray node this replica runs on."""
        ray = import_ray()
        return str(ray.get_runtime_context().get_node_id())


def app_name(model_id: str) -> str:
    """The Serve application a model runs as (model ids may hold characters Serve refuses)."""
    return APP_PREFIX + re.sub(r"[^A-Za-z0-9_-]", "-", model_id)


@dataclass(frozen=True)
class Deployment:
    """What a replica needs: the model's card and file, and how to place it."""

    card: ModelCard
    path: Path
    placement: RayPlacement
    threads: int | None = None
    batch: int = 512
    max_queue: int = 64

    def options(self) -> dict[str, Any]:
        p = self.placement
        options: dict[str, Any] = {
            "name": "model",
            "ray_actor_options": {"num_cpus": p.num_cpus},
            "max_ongoing_requests": p.max_ongoing_requests,
            "max_queued_requests": p.max_queued_requests,
            # A replica that cannot start (a missing file) fails the deployment, not forever.
            "health_check_period_s": 2.0,
            "logging_config": QUIET_LOGS,
        }
        if p.min_replicas is not None:
            options["autoscaling_config"] = {
                "min_replicas": p.min_replicas,
                "max_replicas": p.max_replicas,
                "target_ongoing_requests": p.target_ongoing_requests,
            }
        else:
            options["num_replicas"] = p.replicas or 1
        return options

    def run(self) -> Any:
        """Deploy (or find, when another process of the cluster deployed it) and return the
        handle."""
        import_ray()
        from ray import serve

        name = app_name(self.card.id)
        try:
            return serve.get_app_handle(name)
        except Exception:  # not deployed yet: Serve says so with a bare RayServeException
            pass
        threads = self.threads or max(1, int(self.placement.num_cpus))
        deployment: Any = serve.deployment(ModelReplica)
        bound = deployment.options(**self.options()).bind(
            self.card, str(self.path), threads, self.batch, self.max_queue
        )
        log.info("deploying %s on Ray as %s", self.card.id, name)
        return serve.run(bound, name=name, route_prefix=None)


class RayModel(Model):
    """A model whose replicas run on Ray; deployed (or found) on first use."""

    def __init__(self, deployment: Deployment, *, attempts: int = 3) -> None:
        self.card = deployment.card
        self.deployment = deployment
        self.attempts = attempts
        self._handle: Any = None
        self._lock = threading.Lock()

    def handle(self) -> Any:
        """The deployment handle (deploying the model the first time; this blocks)."""
        with self._lock:
            if self._handle is None:
                self._handle = self.deployment.run()
            return self._handle

    async def load(self) -> None:
        await self._ready()

    async def _ready(self) -> Any:
        handle = self._handle
        return handle if handle is not None else await asyncio.to_thread(self.handle)

    async def generate(self, request: ChatRequest) -> ChatResponse:
        handle = await self._ready()
        called = time.perf_counter()
        for attempt in range(1, self.attempts + 1):
            call = handle.generate.remote(request)
            try:
                answer = await call
            except asyncio.CancelledError:
                call.cancel()
                raise
            except Exception as exc:
                error, lost = self._error(exc, attempt)
                if lost and attempt < self.attempts:
                    log.warning("%s: a replica was lost mid-call; trying another", self.id)
                    continue
                raise error from exc
            return self._answer(answer, called)
        raise AssertionError("unreachable")  # pragma: no cover

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        handle = await self._ready()
        called = time.perf_counter()
        for attempt in range(1, self.attempts + 1):
            call = handle.options(stream=True).stream.remote(request)
            streamed = finished = False
            try:
                async for event in call:
                    if isinstance(event, Failure):
                        raise event.error()
                    if isinstance(event, Completed):
                        finished = True
                        yield Completed(response=self._answer(event.response, called))
                        return
                    streamed = True
                    yield event
            except ShoalError:
                raise
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error, lost = self._error(exc, attempt)
                if lost and not streamed and attempt < self.attempts:
                    log.warning("%s: a replica was lost mid-call; trying another", self.id)
                    continue
                raise error from exc
            finally:
                if not finished:
                    call.cancel()  # the caller left (or the call failed): stop the replica
            raise BackendError(f"{self.id}: the replica's stream ended without its answer")
        raise AssertionError("unreachable")  # pragma: no cover

    def _answer(self, answer: ChatResponse | Failure, called: float) -> ChatResponse:
        if isinstance(answer, Failure):
            raise answer.error()
        return answer.model_copy(update={"latency_s": time.perf_counter() - called})

    def _error(self, exc: Exception, attempt: int) -> tuple[ShoalError, bool]:
        """The shoal error for a failure of the Ray call (its `attempt`-th try), and whether its
        replica was lost (another may take it)."""
        from ray import exceptions as ray_errors
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        if isinstance(exc, BackPressureError):
            return OverloadedError(
                f"{self.id}: every replica is busy and its queue is full ({exc})",
                retry_after_s=exc.retry_after_s or 1.0,
            ), False
        if isinstance(exc, DeploymentUnavailableError):
            self._handle = None  # the next call deploys it again, or finds it
            return NoReplicaError(
                f"{self.id}: its deployment on Ray is gone (deleted, or failed to start)",
                retry_after_s=RETRY_AFTER_S,
            ), False
        if isinstance(exc, ray_errors.RayActorError | ray_errors.ActorUnavailableError):
            return NoReplicaError(
                f"{self.id}: its replica was lost mid-call ({attempt} of {self.attempts} tries)"
                f": {type(exc).__name__}",
                retry_after_s=RETRY_AFTER_S,
            ), True
        return BackendError(f"{self.id}: the Ray call failed: {type(exc).__name__}: {exc}"), False
