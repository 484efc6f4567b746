"""OpenAI's chat-completions wire format, and its translation to and from shoal's own types.

This is the one place in the server where OpenAI's field names appear. Requests are validated
strictly: an unknown field is an error naming it (`tools`, `logit_bias`, ...), never silently
ignored, and so is a known field with a value shoal cannot honour (`n` > 1, a non-zero penalty).

What differs from OpenAI, on purpose:
- Unset fields take shoal's defaults (`ChatRequest`): `temperature` 0 and `max_tokens` 256. A
  call's worst-case cost is reserved against its key's budget before it starts, so `max_tokens`
  always has a bound.
- The `developer` role is read as `system`, and a list of text parts as their concatenation.
- Every completion carries a `shoal` object (`ShoalInfo`): the model that answered, the route
  and its decision, the cost and the latency. A stream carries it on its last chunk.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from shoal.messages import (
    ChatRequest,
    ChatResponse,
    Completed,
    FinishReason,
    Message,
    RouteDecision,
    StreamEvent,
    TextDelta,
    TokenLogprob,
    Usage,
)


class _In(BaseModel):
    """A request object: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    """A response object: unknown fields are kept (other OpenAI-compatible servers add some)."""

    model_config = ConfigDict(extra="allow")


# -- request -------------------------------------------------------------------------------------


class TextPart(_In):
    type: Literal["text"]
    text: str


class WireMessage(_In):
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, Field(max_length=1_000_000)] | list[TextPart]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_In):
    include_usage: bool = False


class TextFormat(_In):
    type: Literal["text"]


class JsonObjectFormat(_In):
    type: Literal["json_object"]


class JsonSchemaSpec(_In):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class JsonSchemaFormat(_In):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")
]


class ChatCompletionRequest(_In):
    """`POST /v1/chat/completions`: the fields shoal honours; any other field is an error."""

    model: str = Field(min_length=1, max_length=256, description="a model id or a route name")
    messages: list[WireMessage] = Field(min_length=1, max_length=4096)
    max_tokens: int | None = Field(default=None, ge=1, le=1 << 20)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1 << 20)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(1 << 63), lt=1 << 64)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    n: int | None = Field(default=None, ge=1, description="only 1 is supported")
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, description="only 0")
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, description="only 0")
    user: str | None = Field(default=None, max_length=256, description="recorded nowhere")

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.n not in (None, 1):
            raise _unsupported("n", f"n={self.n}: shoal returns one choice (only n=1)")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise _unsupported(name, f"{name}: only 0 is supported")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("stop takes at most 4 sequences")
        both = self.max_tokens and self.max_completion_tokens
        if both and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens disagree; give one")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _unsupported(param: str, message: str) -> PydanticCustomError:
    return PydanticCustomError(
        "unsupported_parameter", "{message}", {"param": param, "message": message}
    )


def to_chat_request(wire: ChatCompletionRequest) -> ChatRequest:
    """The `ChatRequest` an OpenAI request asks for (raises pydantic's `ValidationError`)."""
    fields: dict[str, Any] = {}
    max_tokens = wire.max_completion_tokens or wire.max_tokens
    if max_tokens is not None:
        fields["max_tokens"] = max_tokens
    if wire.temperature is not None:
        fields["temperature"] = wire.temperature
    if wire.top_p is not None:
        fields["top_p"] = wire.top_p
    if wire.stop:
        fields["stop"] = (wire.stop,) if isinstance(wire.stop, str) else tuple(wire.stop)
    if wire.seed is not None:
        fields["seed"] = wire.seed
    if wire.logprobs:
        fields["logprobs"] = True
        fields["top_logprobs"] = wire.top_logprobs or 0
    fmt = wire.response_format
    if isinstance(fmt, JsonObjectFormat):
        fields["json_object"] = True
    elif isinstance(fmt, JsonSchemaFormat):
        fields["json_schema"] = fmt.json_schema.schema_
    messages = tuple(
        Message(role="system" if m.role == "developer" else m.role, content=m.text)
        for m in wire.messages
    )
    return ChatRequest(messages=messages, **fields)


def from_chat_request(
    request: ChatRequest, model: str, *, stream: bool = False
) -> ChatCompletionRequest:
    """The OpenAI request that asks for `request` (the inverse of `to_chat_request`)."""
    fmt: TextFormat | JsonObjectFormat | JsonSchemaFormat | None = None
    if request.json_schema is not None:
        fmt = JsonSchemaFormat(
            type="json_schema",
            json_schema=JsonSchemaSpec(name="output", schema=request.json_schema),
        )
    elif request.json_object:
        fmt = JsonObjectFormat(type="json_object")
    return ChatCompletionRequest(
        model=model,
        messages=[WireMessage(role=m.role, content=m.content) for m in request.messages],
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        stop=list(request.stop) or None,
        seed=request.seed,
        stream=stream or None,
        response_format=fmt,
        logprobs=request.logprobs or None,
        top_logprobs=request.top_logprobs or None,
    )


# -- response ------------------------------------------------------------------------------------


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None = None


class LogprobItem(_Out):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(_Out):
    content: list[LogprobItem] | None = None
    refusal: None = None


class AssistantMessage(_Out):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: None = None


class Choice(_Out):
    index: int = 0
    message: AssistantMessage
    finish_reason: FinishReason
    logprobs: ChoiceLogprobs | None = None


class WireUsage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ShoalInfo(_Out):
    """What shoal adds to a completion: who answered, why, at what cost and how fast."""

    model: str
    route: str | None = None
    decision: RouteDecision | None = None
    cost_usd: float
    latency_ms: float
    usage_estimated: bool = False


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: WireUsage
    system_fingerprint: str | None = None
    shoal: ShoalInfo | None = None


class Delta(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(_Out):
    index: int = 0
    delta: Delta
    finish_reason: FinishReason | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: WireUsage | None = None
    system_fingerprint: str | None = None
    shoal: ShoalInfo | None = None


def wire_usage(usage: Usage) -> WireUsage:
    return WireUsage(
        prompt_tokens=usage.input_tokens,
        completion_tokens=usage.output_tokens,
        total_tokens=usage.total_tokens,
    )


def wire_logprobs(logprobs: tuple[TokenLogprob, ...]) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            LogprobItem(
                token=lp.token,
                logprob=lp.logprob,
                bytes=list(lp.token.encode("utf-8")),
                top_logprobs=[
                    TopLogprob(token=t, logprob=p, bytes=list(t.encode("utf-8"))) for t, p in lp.top
                ],
            )
            for lp in logprobs
        ]
    )


def shoal_logprobs(wire: ChoiceLogprobs | None) -> tuple[TokenLogprob, ...]:
    if wire is None or not wire.content:
        return ()
    return tuple(
        TokenLogprob(
            token=item.token,
            logprob=item.logprob,
            top=tuple((t.token, t.logprob) for t in item.top_logprobs),
        )
        for item in wire.content
    )


def shoal_info(response: ChatResponse, *, route: str | None) -> ShoalInfo:
    return ShoalInfo(
        model=response.model,
        route=route,
        decision=response.decision,
        cost_usd=response.total_cost_usd,
        latency_ms=response.latency_s * 1000.0,
        usage_estimated=response.usage_estimated,
    )


def completion_of(
    response: ChatResponse, *, completion_id: str, created: int, route: str | None
) -> ChatCompletion:
    """The OpenAI completion that reports `response`."""
    return ChatCompletion(
        id=completion_id,
        created=created,
        model=response.model,
        choices=[
            Choice(
                message=AssistantMessage(content=response.text),
                finish_reason=response.finish_reason,
                logprobs=wire_logprobs(response.logprobs)
                if response.logprobs is not None
                else None,
            )
        ],
        usage=wire_usage(response.usage),
        shoal=shoal_info(response, route=route),
    )


def response_of(completion: ChatCompletion) -> ChatResponse:
    """The `ChatResponse` an OpenAI completion reports (the inverse of `completion_of`).

    Cost, latency and the route's decision come from the `shoal` object when there is one.
    """
    choice = completion.choices[0]
    usage = Usage(
        input_tokens=completion.usage.prompt_tokens,
        output_tokens=completion.usage.completion_tokens,
    )
    info = completion.shoal
    return ChatResponse(
        model=completion.model,
        text=choice.message.content or "",
        finish_reason=choice.finish_reason,
        usage=usage,
        latency_s=info.latency_ms / 1000.0 if info else 0.0,
        cost_usd=info.cost_usd if info else 0.0,
        logprobs=shoal_logprobs(choice.logprobs) if choice.logprobs is not None else None,
        usage_estimated=info.usage_estimated if info else False,
        decision=info.decision if info else None,
    )


# -- stream --------------------------------------------------------------------------------------


class ChunkWriter:
    """Turns shoal's stream events into OpenAI chunks, in order, for one completion.

    The first chunk carries the assistant role; each `TextDelta` becomes a content chunk; the
    `Completed` event becomes a chunk with the finish reason and, when the client asked for
    `include_usage`, a last chunk with no choices and the usage. The last chunk carries `shoal`.
    """

    def __init__(
        self,
        *,
        completion_id: str,
        created: int,
        model: str,
        route: str | None,
        include_usage: bool,
        logprobs: bool,
    ) -> None:
        self.completion_id = completion_id
        self.created = created
        self.model = model
        self.route = route
        self.include_usage = include_usage
        self.logprobs = logprobs
        self._started = False

    def _chunk(self, choices: list[ChunkChoice], **fields: Any) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.completion_id,
            created=self.created,
            model=self.model,
            choices=choices,
            **fields,
        )

    def chunks(self, event: StreamEvent) -> list[ChatCompletionChunk]:
        out: list[ChatCompletionChunk] = []
        if isinstance(event, TextDelta):
            role: Literal["assistant"] | None = None if self._started else "assistant"
            self._started = True
            logprobs = wire_logprobs(event.logprobs) if self.logprobs else None
            out.append(
                self._chunk(
                    [ChunkChoice(delta=Delta(role=role, content=event.text), logprobs=logprobs)]
                )
            )
            return out
        response = event.response
        self.model = response.model
        info = shoal_info(response, route=self.route)
        finish = ChunkChoice(
            delta=Delta(role=None if self._started else "assistant"),
            finish_reason=response.finish_reason,
        )
        self._started = True
        if self.include_usage:
            out.append(self._chunk([finish]))
            out.append(self._chunk([], usage=wire_usage(response.usage), shoal=info))
        else:
            out.append(self._chunk([finish], shoal=info))
        return out


def events_of(chunks: list[ChatCompletionChunk]) -> list[StreamEvent]:
    """The shoal stream events that a list of chunks reports (the inverse of `ChunkWriter`).

    Needs the usage chunk (`include_usage`) and the `shoal` object to rebuild `Completed`.
    """
    events: list[StreamEvent] = []
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    finish: FinishReason = "stop"
    usage: WireUsage | None = None
    info: ShoalInfo | None = None
    model = chunks[0].model if chunks else ""
    for chunk in chunks:
        model = chunk.model
        usage = chunk.usage or usage
        info = chunk.shoal or info
        for choice in chunk.choices:
            if choice.finish_reason is not None:
                finish = choice.finish_reason
            pieces = shoal_logprobs(choice.logprobs)
            if choice.delta.content is not None:
                events.append(TextDelta(text=choice.delta.content, logprobs=pieces))
                parts.append(choice.delta.content)
                logprobs.extend(pieces)
    if usage is None or info is None:
        raise ValueError("the chunks carry no usage or no shoal object: the stream is cut short")
    response = ChatResponse(
        model=model,
        text="".join(parts),
        finish_reason=finish,
        usage=Usage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens),
        latency_s=info.latency_ms / 1000.0,
        cost_usd=info.cost_usd,
        logprobs=tuple(logprobs) if logprobs else None,
        usage_estimated=info.usage_estimated,
        decision=info.decision,
    )
    events.append(Completed(response=response))
    return events


# -- errors and models ---------------------------------------------------------------------------


class ErrorDetail(_Out):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorBody(_Out):
    error: ErrorDetail


class ModelInfo(_Out):
    """What `/v1/models` says of each name beyond OpenAI's fields."""

    kind: Literal["model", "route"]
    context: int | None = None
    runs: str | None = None
    tier: str | None = None


class WireModel(_Out):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "shoal"
    shoal: ModelInfo


class ModelList(_Out):
    object: Literal["list"] = "list"
    data: list[WireModel]
