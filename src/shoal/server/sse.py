"""Server-sent events: typed events in, bytes out, at the last moment.

An OpenAI stream is `data: <chunk JSON>` events, an error as `data: {"error": {...}}` (which the
official client raises as an `APIError`), and `data: [DONE]` at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from shoal.openai_wire import ErrorBody


@dataclass(frozen=True)
class Data:
    """One event carrying a JSON object."""

    payload: BaseModel


@dataclass(frozen=True)
class Failure:
    """The stream failed after it started: the error, in the shape of an HTTP error body."""

    error: ErrorBody


@dataclass(frozen=True)
class Done:
    """The end of the stream."""


Event = Data | Failure | Done

DONE_BYTES = b"data: [DONE]\n\n"
# A comment line: clients ignore it; it tells them, and any proxy between, that the stream is
# alive while a model evaluates a long prompt or a cascade judges an earlier answer.
KEEP_ALIVE_BYTES = b": waiting for the model\n\n"


def encode(event: Event) -> bytes:
    if isinstance(event, Data):
        return b"data: " + event.payload.model_dump_json().encode() + b"\n\n"
    if isinstance(event, Failure):
        return b"data: " + event.error.model_dump_json().encode() + b"\n\n"
    return DONE_BYTES
