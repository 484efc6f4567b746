"""One exception tree for all of shoal.

    ShoalError                      base
    ├── ConfigError                 a fleet file or setting is invalid (says where)
    │   ├── PipelineError           a pipeline is ill-formed (a cycle, a missing input)
    │   ├── OutcomeTableError       an outcome table is missing, malformed or degenerate
    │   ├── DataFileError           an app's data file is unreadable or lacks columns (names them)
    │   ├── KeysInUseError          another server already serves this keys file (names its pid)
    │   └── DistillationError       the data cannot train a specialist (says what it needs)
    │       └── TargetNotReachedError   held-out data missed the quality target (nothing installed)
    ├── UnknownModelError           no model with that id (lists the valid ids)
    ├── UnknownRouteError           no route with that name (lists the valid routes)
    ├── UnknownPipelineError        no pipeline with that name (lists the valid ones)
    ├── UnknownRunError             no run with that id (or not the caller's)
    ├── ModelNotInstalledError      a model's weights are missing (names the package / command)
    ├── WeightsCorruptedError       weights on disk do not match their sha256 (or their format)
    ├── SpecialistStaleError        a specialist's embedder changed since it was trained
    ├── InvalidRequestError         the request cannot be served as asked
    │   ├── ContextWindowExceededError   prompt (+ max_tokens) longer than the context window
    │   ├── MalformedRequestError   the body is not JSON, or not a valid request
    │   ├── UnsupportedParameterError    a parameter shoal does not honour (tools, n=2, ...)
    │   └── PayloadTooLargeError    the body is over the configured limit
    ├── AuthenticationError         no API key, or an unknown or revoked one
    ├── BudgetExceededError         a budget (a key's, a run's) cannot cover the call's worst case
    ├── DeadlineReachedError        no model can answer in the time left
    ├── StepFailedError             a pipeline step failed (its output never fit, every item failed)
    ├── StepSkippedError            an optional step was skipped: the time left could not fit it
    ├── OutputError                 the model answered, but not in the form asked for
    │   ├── OutputTruncatedError    max_tokens cut structured output short
    │   └── OutputInvalidError      output does not parse / match its schema
    ├── OverloadedError             a bounded queue is full
    │   ├── RateLimitedError        a key's rate limit, or its budget held by calls in flight
    │   └── NoReplicaError          no replica of a model's deployment is left to take the call
    └── BackendError                the model's backend failed
        ├── BackendTimeoutError     no answer in time
        ├── BackendUnavailableError cannot connect
        └── UpstreamHTTPError       an HTTP API answered with an error status

Every class says what it is, as attributes (the one classification; nothing else keeps lists):
- `retryable`: the same call may succeed later.
- `bad_input`: the caller's request or configuration is at fault, not a model or backend.
- `before_work`: raised before any model did work, so the failed call itself cost nothing (only
  the answers it carries in `attempts`, or `response` for an answer in the wrong form).

Boundaries (adapters, server, CLI) map foreign exceptions into this tree with `raise ... from exc`;
the server maps classes to HTTP statuses through one table (`shoal.server.errors`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shoal.messages import ChatResponse


class ShoalError(Exception):
    retryable: bool = False
    bad_input: bool = False
    before_work: bool = False
    # Answers computed before the failure and paid for, though not kept: a cascade's earlier
    # stages when its last one fails.
    attempts: tuple[ChatResponse, ...] = ()
    # The model whose call failed (a route names the stage that failed), when known.
    model_id: str | None = None


class ConfigError(ShoalError):
    bad_input = True
    before_work = True


class PipelineError(ConfigError):
    """A pipeline's graph or spec is invalid; raised before anything runs."""


class OutcomeTableError(ConfigError):
    """An outcome table is missing, empty, malformed or too degenerate to route on."""


class DataFileError(ConfigError):
    """A data file an app reads (a city's listings) is missing, unreadable, or not in the
    layout it expects: the message names the file and what is missing."""


class KeysInUseError(ConfigError):
    """Another server already serves this keys file: one server per file keeps its budgets."""


class DistillationError(ConfigError):
    """The data cannot train a specialist: too few examples per class, a single class, no answer
    that parses, a schema with free-text fields. The message says what it needs."""


class TargetNotReachedError(DistillationError):
    """A trained specialist missed its quality target on held-out data: nothing is installed.
    `coverage` is the share of held-out calls it could have answered while keeping the target
    (0 when none); `report` the figures it reached."""

    def __init__(self, message: str, *, coverage: float, report: dict[str, object]) -> None:
        self.coverage = coverage
        self.report = report
        super().__init__(message)


class _Unknown(ShoalError):
    bad_input = True
    before_work = True
    what = "name"
    empty = "none configured"

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        choices = ", ".join(self.known) or self.empty
        super().__init__(f"unknown {self.what} {name!r}; valid {self.what}s: {choices}")


class UnknownModelError(_Unknown):
    what = "model"


class UnknownRouteError(_Unknown):
    what = "route"
    empty = "none configured (add a `routes:` section)"


class UnknownPipelineError(_Unknown):
    what = "pipeline"
    empty = "none served"


class UnknownRunError(ShoalError):
    bad_input = True
    before_work = True

    def __init__(self, pipeline: str, run_id: str) -> None:
        super().__init__(f"pipeline {pipeline!r} has no run {run_id!r}")


class ModelNotInstalledError(ShoalError):
    bad_input = True
    before_work = True

    def __init__(self, message: str, *, install_command: str | None = None) -> None:
        self.install_command = install_command
        if install_command:
            message = f"{message}; install it with: {install_command}"
        super().__init__(message)


class WeightsCorruptedError(ShoalError):
    bad_input = True
    before_work = True


class SpecialistStaleError(ShoalError):
    """A specialist was trained on sentence vectors of another embedder than the fleet's now:
    its answers would be meaningless, so it refuses to serve until it is trained again."""

    bad_input = True
    before_work = True


class InvalidRequestError(ShoalError):
    bad_input = True
    before_work = True

    def __init__(self, message: str, *, param: str | None = None) -> None:
        self.param = param
        super().__init__(message)


class ContextWindowExceededError(InvalidRequestError):
    def __init__(self, model_id: str, prompt_tokens: int, max_tokens: int, context: int) -> None:
        self.model_id = model_id
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context = context
        super().__init__(
            f"{model_id}: prompt of {prompt_tokens} tokens + max_tokens {max_tokens} "
            f"exceeds the context window of {context} tokens",
            param="messages",
        )


class MalformedRequestError(InvalidRequestError):
    pass


class UnsupportedParameterError(InvalidRequestError):
    pass


class PayloadTooLargeError(InvalidRequestError):
    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"the request body is over the limit of {limit} bytes")


class AuthenticationError(ShoalError):
    bad_input = True
    before_work = True


class BudgetExceededError(ShoalError):
    """A budget cannot cover a call's worst case: retrying cannot refill it."""

    before_work = True


class DeadlineReachedError(ShoalError):
    before_work = True


class StepFailedError(ShoalError):
    pass


class StepSkippedError(ShoalError):
    """An optional step was skipped before it started: the time left could not fit it."""

    before_work = True


class OutputError(ShoalError):
    """`text` is what the model wrote; `response` (when known) carries its usage and cost, since
    the work was done and paid for."""

    def __init__(self, message: str, *, text: str, response: ChatResponse | None = None) -> None:
        self.text = text
        self.response = response
        super().__init__(message)


class OutputTruncatedError(OutputError):
    pass


class OutputInvalidError(OutputError):
    pass


class OverloadedError(ShoalError):
    retryable = True
    before_work = True

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class RateLimitedError(OverloadedError):
    pass


class NoReplicaError(OverloadedError):
    """No replica of a model's deployment is left to take the call (every one lost, or the
    deployment deleted); one may be started again, so the call may succeed later."""


class BackendError(ShoalError):
    retryable = True


class BackendTimeoutError(BackendError):
    pass


class BackendUnavailableError(BackendError):
    before_work = True


class UpstreamHTTPError(BackendError):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"upstream answered HTTP {status}: {message}")

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        return self.status == 429 or self.status >= 500
