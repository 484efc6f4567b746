"""The one contract every model keeps."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator
from typing import cast

from shoal.cards import ModelCard
from shoal.errors import BackendError
from shoal.messages import ChatRequest, ChatResponse, Completed, StreamEvent, TextDelta


class Model(ABC):
    """Anything that answers a `ChatRequest`.

    `generate` is the one required method. `stream` yields `TextDelta`s in order and ends with
    one `Completed` carrying the full response, costed exactly as `generate` would cost it;
    adapters that can stream natively override it. What a call is expected to cost and take is
    the card's to say (`ModelCard.worst_case_cost`, `ModelCard.expected_seconds`).
    """

    card: ModelCard

    @property
    def id(self) -> str:
        return self.card.id

    @abstractmethod
    async def generate(self, request: ChatRequest) -> ChatResponse: ...

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        response = await self.generate(request)
        if response.text:
            yield TextDelta(text=response.text, logprobs=response.logprobs or ())
        yield Completed(response=response)

    async def load(self) -> None:
        """Get ready to answer (load weights, open connections) before the first call."""
        return None

    async def aclose(self) -> None:
        """Release connections or native memory held by the model."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.id!r})"


async def events(
    model: Model, request: ChatRequest, *, streamed: bool
) -> AsyncIterator[StreamEvent]:
    """A model's answer as events: its own stream, or (for a caller that wants the answer
    whole) its `generate`, as one delta and the `Completed`. Callers run one loop over either,
    so a plain and a streamed call are accounted alike; only the wire to the model differs."""
    if streamed:
        stream = cast(AsyncGenerator[StreamEvent, None], model.stream(request))
        async with contextlib.aclosing(stream):  # a consumer that leaves stops the model
            async for event in stream:
                yield event
        return
    response = await model.generate(request)
    if response.text:
        yield TextDelta(text=response.text, logprobs=response.logprobs or ())
    yield Completed(response=response)


async def collect(events: AsyncIterator[StreamEvent], name: str) -> ChatResponse:
    """The response a stream ends with: a non-streamed call that runs the streamed path, so the
    two cannot differ. The stream is closed however this ends."""
    try:
        async for event in events:
            if isinstance(event, Completed):
                return event.response
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
    raise BackendError(f"{name}: the stream ended without its answer")
