"""Models for tests of the layers above: no weights, no network, fully deterministic."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

from shoal.cards import HostPrice, ModelCard, Price
from shoal.messages import (
    ChatRequest,
    ChatResponse,
    Completed,
    FinishReason,
    StreamEvent,
    TextDelta,
    Usage,
)
from shoal.models.base import Model

AnswerFunction = Callable[[ChatRequest], str | Awaitable[str]]


def fake_card(model_id: str, *, price: Price | None = None, context: int = 4096) -> ModelCard:
    return ModelCard(
        id=model_id,
        context=context,
        runs="local",
        where="in process (fake)",
        price=price or HostPrice(),
        capabilities=frozenset({"stream"}),
        # Fakes answer at once: nothing should route around them for being slow.
        prompt_tok_s=1e6,
        gen_tok_s=1e6,
    )


def _count_tokens(text: str) -> int:
    return len(text.split())


class FunctionModel(Model):
    """Answers with `function(request)`; usage counts whitespace-separated words as tokens.

    `delay_s` is slept per call (and counted as compute time), so routing and orchestration
    layers can be tested with realistic latencies and costs.
    """

    def __init__(
        self,
        function: AnswerFunction,
        *,
        model_id: str = "function",
        price: Price | None = None,
        delay_s: float = 0.0,
        context: int = 4096,
    ) -> None:
        self.card = fake_card(model_id, price=price, context=context)
        self._function = function
        self._delay_s = delay_s
        self.calls: list[ChatRequest] = []

    async def _answer(self, request: ChatRequest) -> str:
        self.calls.append(request)
        answer = self._function(request)
        if not isinstance(answer, str):
            answer = await answer
        if self._delay_s:
            await asyncio.sleep(self._delay_s)
        return answer

    def _response(self, request: ChatRequest, text: str, started: float) -> ChatResponse:
        words = text.split()
        finish: FinishReason = "length" if len(words) > request.max_tokens else "stop"
        if finish == "length":
            text = " ".join(words[: request.max_tokens])
        usage = Usage(
            input_tokens=sum(_count_tokens(m.content) for m in request.messages),
            output_tokens=_count_tokens(text),
        )
        elapsed = time.perf_counter() - started
        return ChatResponse(
            model=self.id,
            text=text,
            finish_reason=finish,
            usage=usage,
            latency_s=elapsed,
            compute_s=elapsed,
            ttft_s=elapsed,
            cost_usd=self.card.cost(usage, elapsed),
        )

    async def generate(self, request: ChatRequest) -> ChatResponse:
        started = time.perf_counter()
        return self._response(request, await self._answer(request), started)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        started = time.perf_counter()
        response = self._response(request, await self._answer(request), started)
        for i, word in enumerate(response.text.split()):
            yield TextDelta(text=word if i == 0 else " " + word)
        yield Completed(response=response)


class FakeModel(FunctionModel):
    """Answers with the given texts in turn (cycling), or echoes the last user message."""

    def __init__(self, answers: Iterable[str] | None = None, **options: object) -> None:
        self._answers = list(answers) if answers is not None else None
        self._turn = 0
        options.setdefault("model_id", "fake")
        super().__init__(self._next, **options)  # type: ignore[arg-type]

    def _next(self, request: ChatRequest) -> str:
        if self._answers is None:
            return request.messages[-1].content
        answer = self._answers[self._turn % len(self._answers)]
        self._turn += 1
        return answer
