"""The one contract every model keeps."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

from shoal.cards import ModelCard
from shoal.messages import ChatRequest, ChatResponse, Completed, StreamEvent, TextDelta


def max_input_tokens(request: ChatRequest) -> int:
    """An upper bound on the prompt tokens of a request, without a tokenizer: no tokenizer
    makes more tokens than UTF-8 bytes, plus what a chat template adds per message."""
    body = sum(len(m.content.encode("utf-8")) for m in request.messages)
    return body + 48 * (len(request.messages) + 1)


def worst_case_cost(card: ModelCard, request: ChatRequest) -> float:
    return card.worst_case_cost(max_input_tokens(request), request.max_tokens)


def expected_latency(card: ModelCard, request: ChatRequest) -> float:
    """Seconds a call is expected to take: a third of its byte bound in prompt tokens, half its
    `max_tokens` generated."""
    return card.expected_seconds(max_input_tokens(request) // 3, request.max_tokens // 2)


class Model(ABC):
    """Anything that answers a `ChatRequest`.

    `generate` is the one required method. `stream` yields `TextDelta`s in order and ends with
    one `Completed` carrying the full response, costed exactly as `generate` would cost it;
    adapters that can stream natively override it.
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

    def worst_case_cost(self, request: ChatRequest) -> float:
        """The most this request can cost here (reserved against budgets before it starts)."""
        return worst_case_cost(self.card, request)

    def expected_latency(self, request: ChatRequest) -> float:
        return expected_latency(self.card, request)

    async def load(self) -> None:
        """Get ready to answer (load weights, open connections) before the first call."""
        return None

    async def aclose(self) -> None:
        """Release connections or native memory held by the model."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.id!r})"
