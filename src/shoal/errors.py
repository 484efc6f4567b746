"""One exception tree for all of shoal.

    ShoalError                      base; `.retryable` says whether the same call may succeed later
    ├── ConfigError                 a fleet file or setting is invalid (says where)
    ├── UnknownModelError           no model with that id (lists the valid ids)
    ├── UnknownRouteError           no route with that name (lists the valid routes)
    ├── ModelNotInstalledError      a model's weights are missing (names the package / command)
    ├── WeightsCorruptedError       weights on disk do not match their sha256
    ├── InvalidRequestError         the request cannot be served as asked
    │   └── ContextWindowExceededError   prompt (+ max_tokens) longer than the context window
    ├── OutputError                 the model answered, but not in the form asked for
    │   ├── OutputTruncatedError    max_tokens cut structured output short
    │   └── OutputInvalidError      output does not parse / match its schema
    ├── OverloadedError             a bounded queue is full (retryable)
    └── BackendError                the model's backend failed (retryable unless said otherwise)
        ├── BackendTimeoutError     no answer in time
        ├── BackendUnavailableError cannot connect
        └── UpstreamHTTPError       an HTTP API answered with an error status

Boundaries (adapters, server, CLI) map foreign exceptions into this tree with `raise ... from exc`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shoal.messages import ChatResponse


class ShoalError(Exception):
    retryable: bool = False
    # Answers computed before the failure and paid for, though not kept: a cascade's earlier
    # stages when its last one fails.
    attempts: tuple[ChatResponse, ...] = ()

    @property
    def paid_usd(self) -> float:
        """What the failed call cost before it failed: its earlier answers, and for an answer
        in the wrong form, that answer."""
        response = getattr(self, "response", None)
        if response is not None:  # already carries the earlier answers
            return float(response.total_cost_usd)
        return sum(a.total_cost_usd for a in self.attempts)


class ConfigError(ShoalError):
    pass


class UnknownModelError(ShoalError):
    def __init__(self, model_id: str, known: Iterable[str]) -> None:
        self.model_id = model_id
        self.known = sorted(known)
        choices = ", ".join(self.known) or "none configured"
        super().__init__(f"unknown model {model_id!r}; valid models: {choices}")


class UnknownRouteError(ShoalError):
    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        choices = ", ".join(self.known) or "none configured (add a `routes:` section)"
        super().__init__(f"unknown route {name!r}; valid routes: {choices}")


class ModelNotInstalledError(ShoalError):
    def __init__(self, message: str, *, install_command: str | None = None) -> None:
        self.install_command = install_command
        if install_command:
            message = f"{message}; install it with: {install_command}"
        super().__init__(message)


class WeightsCorruptedError(ShoalError):
    pass


class InvalidRequestError(ShoalError):
    pass


class ContextWindowExceededError(InvalidRequestError):
    def __init__(self, model_id: str, prompt_tokens: int, max_tokens: int, context: int) -> None:
        self.model_id = model_id
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.context = context
        super().__init__(
            f"{model_id}: prompt of {prompt_tokens} tokens + max_tokens {max_tokens} "
            f"exceeds the context window of {context} tokens"
        )


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

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class BackendError(ShoalError):
    retryable = True


class BackendTimeoutError(BackendError):
    pass


class BackendUnavailableError(BackendError):
    pass


class UpstreamHTTPError(BackendError):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(f"upstream answered HTTP {status}: {message}")

    @property
    def retryable(self) -> bool:  # type: ignore[override]
        return self.status == 429 or self.status >= 500
