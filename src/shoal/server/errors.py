"""Errors at the HTTP edge: the one table that maps every exception class of shoal's tree
(`shoal.errors`) to an HTTP status and an OpenAI-style body `{"error": {message, type, code,
param}}`.

An exhausted budget is 402, not OpenAI's 429 `insufficient_quota`: a client (the official one
included) retries a 429 on its own, and retrying cannot refill a budget. A budget that is only
held by calls still in flight is a 429 with `Retry-After`: it frees up when they settle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from shoal.errors import (
    AuthenticationError,
    BackendError,
    BackendTimeoutError,
    BudgetExceededError,
    ConfigError,
    ContextWindowExceededError,
    DeadlineReachedError,
    InvalidRequestError,
    MalformedRequestError,
    ModelNotInstalledError,
    OutputInvalidError,
    OutputTruncatedError,
    OverloadedError,
    PayloadTooLargeError,
    RateLimitedError,
    ShoalError,
    SpecialistStaleError,
    UnknownModelError,
    UnknownPipelineError,
    UnknownRouteError,
    UnknownRunError,
    UnsupportedParameterError,
    WeightsCorruptedError,
)
from shoal.openai_wire import ErrorBody, ErrorDetail


@dataclass(frozen=True)
class Rule:
    error: type[BaseException]
    status: int
    type: str
    code: str


# Most specific first: the first rule whose class the exception is an instance of applies.
RULES: tuple[Rule, ...] = (
    Rule(MalformedRequestError, 400, "invalid_request_error", "invalid_request"),
    Rule(UnsupportedParameterError, 400, "invalid_request_error", "unsupported_parameter"),
    Rule(PayloadTooLargeError, 413, "invalid_request_error", "request_too_large"),
    Rule(ContextWindowExceededError, 400, "invalid_request_error", "context_length_exceeded"),
    Rule(InvalidRequestError, 400, "invalid_request_error", "invalid_request"),
    Rule(UnknownModelError, 404, "invalid_request_error", "model_not_found"),
    Rule(UnknownRouteError, 404, "invalid_request_error", "model_not_found"),
    Rule(UnknownPipelineError, 404, "invalid_request_error", "pipeline_not_found"),
    Rule(UnknownRunError, 404, "invalid_request_error", "run_not_found"),
    Rule(AuthenticationError, 401, "authentication_error", "invalid_api_key"),
    Rule(BudgetExceededError, 402, "insufficient_quota", "budget_exceeded"),
    Rule(DeadlineReachedError, 504, "server_error", "deadline_reached"),
    Rule(RateLimitedError, 429, "rate_limit_error", "rate_limit_exceeded"),
    Rule(OverloadedError, 503, "overloaded_error", "overloaded"),
    # The client's max_tokens cut structured output short: ask again with more.
    Rule(OutputTruncatedError, 400, "invalid_request_error", "output_truncated"),
    # The model answered, but not in the form asked for.
    Rule(OutputInvalidError, 502, "server_error", "output_invalid"),
    Rule(BackendTimeoutError, 504, "server_error", "upstream_timeout"),
    Rule(BackendError, 502, "server_error", "upstream_error"),
    Rule(ModelNotInstalledError, 503, "server_error", "model_not_installed"),
    Rule(WeightsCorruptedError, 500, "server_error", "weights_corrupted"),
    # A specialist trained on another embedder's vectors: train it again (shoal distil).
    Rule(SpecialistStaleError, 503, "server_error", "specialist_stale"),
    Rule(ConfigError, 500, "server_error", "configuration_error"),
    Rule(ShoalError, 500, "server_error", "internal_error"),
)

_INTERNAL = Rule(Exception, 500, "server_error", "internal_error")
_PARAMS: dict[type[BaseException], str] = {
    UnknownModelError: "model",
    UnknownRouteError: "model",
    OutputTruncatedError: "max_tokens",
}


def rule_for(exc: BaseException) -> Rule:
    for rule in RULES:
        if isinstance(exc, rule.error):
            return rule
    return _INTERNAL


@dataclass(frozen=True)
class ErrorReply:
    status: int
    body: ErrorBody
    headers: dict[str, str]


def error_reply(exc: BaseException) -> ErrorReply:
    """The HTTP status, body and headers that report `exc` (never the text of an unexpected
    exception: it may quote a prompt)."""
    rule = rule_for(exc)
    message = str(exc) if isinstance(exc, ShoalError) else "internal server error"
    param = getattr(exc, "param", None) if isinstance(exc, InvalidRequestError) else None
    for cls, name in _PARAMS.items():
        if isinstance(exc, cls):
            param = name
    headers: dict[str, str] = {}
    if isinstance(exc, OverloadedError):
        headers["retry-after"] = str(max(1, math.ceil(exc.retry_after_s)))
    body = ErrorBody(
        error=ErrorDetail(message=message, type=rule.type, code=rule.code, param=param)
    )
    return ErrorReply(status=rule.status, body=body, headers=headers)


def http_error_reply(status: int, message: str) -> ErrorReply:
    """A plain HTTP error (no such path, method not allowed) in the same body shape."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(status, "http_error")
    body = ErrorBody(
        error=ErrorDetail(message=message, type="invalid_request_error", code=code, param=None)
    )
    return ErrorReply(status=status, body=body, headers={})
