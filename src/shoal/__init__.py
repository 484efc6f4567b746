"""shoal: many calls to many small models, routed, orchestrated and served as one system."""

from shoal.calls import CallPlan
from shoal.cards import HostPrice, ModelCard, TokenPrice
from shoal.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    BudgetExceededError,
    ConfigError,
    ContextWindowExceededError,
    InvalidRequestError,
    ModelNotInstalledError,
    OutputError,
    OutputInvalidError,
    OutputTruncatedError,
    OverloadedError,
    ShoalError,
    UnknownModelError,
    UnknownRouteError,
    UpstreamHTTPError,
    WeightsCorruptedError,
)
from shoal.fleet import Fleet
from shoal.ledger import Account
from shoal.messages import (
    ChatRequest,
    ChatResponse,
    Completed,
    Escalated,
    Message,
    StreamEvent,
    TextDelta,
    TokenLogprob,
    Usage,
)
from shoal.models.base import Model
from shoal.models.fake import FakeModel, FunctionModel

__all__ = [
    "Account",
    "BackendError",
    "BackendTimeoutError",
    "BackendUnavailableError",
    "BudgetExceededError",
    "CallPlan",
    "ChatRequest",
    "ChatResponse",
    "Completed",
    "ConfigError",
    "ContextWindowExceededError",
    "Escalated",
    "FakeModel",
    "Fleet",
    "FunctionModel",
    "HostPrice",
    "InvalidRequestError",
    "Message",
    "Model",
    "ModelCard",
    "ModelNotInstalledError",
    "OutputError",
    "OutputInvalidError",
    "OutputTruncatedError",
    "OverloadedError",
    "ShoalError",
    "StreamEvent",
    "TextDelta",
    "TokenLogprob",
    "TokenPrice",
    "UnknownModelError",
    "UnknownRouteError",
    "UpstreamHTTPError",
    "Usage",
    "WeightsCorruptedError",
]
