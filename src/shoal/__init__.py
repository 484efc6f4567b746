"""shoal: many calls to many small models, routed, orchestrated and served as one system."""

from shoal.cards import HostPrice, ModelCard, TokenPrice
from shoal.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
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
from shoal.messages import (
    ChatRequest,
    ChatResponse,
    Completed,
    Message,
    StreamEvent,
    TextDelta,
    TokenLogprob,
    Usage,
)
from shoal.models.base import Model
from shoal.models.fake import FakeModel, FunctionModel

__all__ = [
    "BackendError",
    "BackendTimeoutError",
    "BackendUnavailableError",
    "ChatRequest",
    "ChatResponse",
    "Completed",
    "ConfigError",
    "ContextWindowExceededError",
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
