"""OpenAI's chat-completions wire format, and its translation to and from shoal's own types.

The one place where OpenAI's field names appear: the server reads requests and writes answers
with it, the OpenAI-compatible adapter writes requests and reads answers with it. Each direction
is written once, next to its inverse: `from_chat_request` / `to_chat_request`, `completion_of` /
`response_of`, and for streams `ChunkWriter` / `ChunkReader` (one chunk at a time).

Requests are validated strictly: an unknown field is an error naming it (`tools`, `logit_bias`,
...), and so is a known field with a value shoal cannot honour (`n` > 1, a non-zero penalty).
Answers are read leniently, since other servers write them: unknown fields are kept, `created`,
`model` and `usage` may be missing, and a finish reason shoal does not tell apart
(`content_filter`, `tool_calls`) reads as "stop". shoal itself writes every field.

A JSON schema travels in one of two styles (`JsonSchemaStyle`): OpenAI's `json_schema` response
format, with `strict: true` since shoal checks every JSON answer against its schema anyway (a
client's `strict` is read as true), or the `{"type": "json_object", "schema": ...}` form that
llama.cpp's server wants (it rejects OpenAI's).

What differs from OpenAI, on purpose:
- Unset fields take shoal's defaults (`ChatRequest`): `temperature` 0 and `max_tokens` 256. A
  call's worst-case cost is reserved against its key's budget before it starts, so `max_tokens`
  always has a bound.
- The `developer` role is read as `system`, a list of text parts as their concatenation.
- Every completion carries a `shoal` object (`ShoalInfo`): the model that answered, the route
  and its decision, the cost and the latency; a stream carries it on its last chunk. Reading an
  answer keeps them, so a shoal calling another still knows what a call cost and why.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import pydantic_core
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from shoal.errors import BackendError
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

JsonSchemaStyle = Literal["openai", "llama_cpp"]
STREAM_DONE = "[DONE]"
"""The `data` of the event that ends an OpenAI stream."""


class _In(BaseModel):
    """A request object: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid")


class _Out(BaseModel):
    """An answer object: unknown fields are kept, and fields other servers leave out have
    defaults. shoal writes every field, so its schema lists them all as required."""

    model_config = ConfigDict(extra="allow", json_schema_serialization_defaults_required=True)


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
    """Any JSON object; with a `schema` (llama.cpp's server's form), JSON matching it."""

    type: Literal["json_object"]
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")


class JsonSchemaSpec(_In):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


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

    def body(self) -> dict[str, Any]:
        """The JSON body that sends this request, without the options left unset."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


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
    if isinstance(fmt, JsonSchemaFormat):
        fields["json_schema"] = fmt.json_schema.schema_
    elif isinstance(fmt, JsonObjectFormat) and fmt.schema_ is not None:
        fields["json_schema"] = fmt.schema_
    elif isinstance(fmt, JsonObjectFormat):
        fields["json_object"] = True
    messages = tuple(
        Message(role="system" if m.role == "developer" else m.role, content=m.text)
        for m in wire.messages
    )
    return ChatRequest(messages=messages, **fields)


def from_chat_request(
    request: ChatRequest,
    model: str,
    *,
    stream: bool = False,
    schema_style: JsonSchemaStyle = "openai",
) -> ChatCompletionRequest:
    """The OpenAI request that asks for `request` (the inverse of `to_chat_request`).

    A stream asks for its usage (`include_usage`). The request is built, not validated: the
    limits the server puts on its clients (at most 4 stop sequences, a message's size) are its
    own policy, not the upstream's.
    """
    return ChatCompletionRequest.model_construct(
        model=model,
        messages=[
            WireMessage.model_construct(role=m.role, content=m.content) for m in request.messages
        ],
        max_tokens=request.max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        stop=list(request.stop) or None,
        seed=request.seed,
        stream=stream,
        stream_options=StreamOptions(include_usage=True) if stream else None,
        response_format=_response_format(request, schema_style),
        logprobs=request.logprobs or None,
        top_logprobs=request.top_logprobs or None,
    )


def _response_format(
    request: ChatRequest, style: JsonSchemaStyle
) -> JsonObjectFormat | JsonSchemaFormat | None:
    schema = request.json_schema
    if schema is not None and style == "llama_cpp":
        return JsonObjectFormat.model_construct(type="json_object", schema_=schema)
    if schema is not None:
        spec = JsonSchemaSpec.model_construct(name="output", schema_=schema, strict=True)
        return JsonSchemaFormat.model_construct(type="json_schema", json_schema=spec)
    if request.json_object:
        return JsonObjectFormat(type="json_object")
    return None


# -- response ------------------------------------------------------------------------------------


def _read_finish(value: object) -> object:
    # shoal tells apart only a cut answer ("length") and a whole one: "eos", "content_filter",
    # "tool_calls" and a completion's null all read as "stop"; a chunk's null stays null.
    return value if value in ("length", None) else "stop"


_Finish = Annotated[FinishReason, BeforeValidator(lambda v: _read_finish(v) or "stop")]
_ChunkFinish = Annotated[FinishReason | None, BeforeValidator(_read_finish)]


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int] | None = None


class LogprobItem(_Out):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: Annotated[list[TopLogprob], BeforeValidator(lambda v: v or [])] = []


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
    finish_reason: _Finish
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
    created: int = 0
    model: str = ""
    choices: list[Choice] = Field(min_length=1)
    usage: WireUsage | None = None
    system_fingerprint: str | None = None
    shoal: ShoalInfo | None = None


class Delta(_Out):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(_Out):
    index: int = 0
    delta: Delta
    finish_reason: _ChunkFinish = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(_Out):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = 0
    model: str = ""
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

    Cost, latency, the route's decision and whether usage was estimated come from the `shoal`
    object when there is one (another shoal answered); otherwise cost and latency are 0. A
    completion without usage reads as 0 tokens, flagged `usage_estimated`.
    """
    choice, usage, info = completion.choices[0], completion.usage, completion.shoal
    return ChatResponse(
        model=completion.model,
        text=choice.message.content or "",
        finish_reason=choice.finish_reason,
        usage=Usage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens)
        if usage is not None
        else Usage(),
        latency_s=info.latency_ms / 1000.0 if info else 0.0,
        cost_usd=info.cost_usd if info else 0.0,
        logprobs=shoal_logprobs(choice.logprobs) if choice.logprobs is not None else None,
        usage_estimated=usage is None or (info is not None and info.usage_estimated),
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
        if not isinstance(event, Completed):
            return out  # other events (a cascade's escalation) have no OpenAI form
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


class ChunkReader:
    """Turns OpenAI chunks, as they arrive, into shoal's stream events (the inverse of
    `ChunkWriter`).

    `read` gives a chunk's deltas: a choice with text or logprobs becomes a `TextDelta` (a chunk
    with only the role, the finish reason or the usage gives none). `response` is what the
    chunks read so far add up to, read as `response_of` reads a completion; `usage` and `shoal`
    stay None until a chunk carries them.
    """

    def __init__(self) -> None:
        self.model = ""
        self.deltas = 0
        self.usage: WireUsage | None = None
        self.shoal: ShoalInfo | None = None
        self._parts: list[str] = []
        self._logprobs: list[LogprobItem] = []
        self._finish: FinishReason = "stop"

    def read(self, chunk: ChatCompletionChunk) -> list[TextDelta]:
        self.model = chunk.model or self.model
        self.usage = chunk.usage or self.usage
        self.shoal = chunk.shoal or self.shoal
        deltas: list[TextDelta] = []
        for choice in chunk.choices:
            if choice.finish_reason is not None:
                self._finish = choice.finish_reason
            text = choice.delta.content or ""
            items = choice.logprobs.content if choice.logprobs else None
            if text or items:
                deltas.append(TextDelta(text=text, logprobs=shoal_logprobs(choice.logprobs)))
                self._parts.append(text)
                self._logprobs.extend(items or ())
        self.deltas += len(deltas)
        return deltas

    def response(self) -> ChatResponse:
        logprobs = ChoiceLogprobs(content=self._logprobs) if self._logprobs else None
        choice = Choice(
            message=AssistantMessage(content="".join(self._parts)),
            finish_reason=self._finish,
            logprobs=logprobs,
        )
        return response_of(
            ChatCompletion(
                id="", model=self.model, choices=[choice], usage=self.usage, shoal=self.shoal
            )
        )


def events_of(chunks: list[ChatCompletionChunk]) -> list[StreamEvent]:
    """The shoal stream events that a list of chunks reports (the inverse of `ChunkWriter`).

    Needs the usage chunk (`include_usage`) and the `shoal` object to rebuild `Completed`.
    """
    reader = ChunkReader()
    events: list[StreamEvent] = [delta for chunk in chunks for delta in reader.read(chunk)]
    if reader.usage is None or reader.shoal is None:
        raise ValueError("the chunks carry no usage or no shoal object: the stream is cut short")
    events.append(Completed(response=reader.response()))
    return events


def read_chunk(data: str) -> ChatCompletionChunk:
    """The chunk one `data` field of an OpenAI stream carries (other than `STREAM_DONE`).

    An error object (`{"error": {...}}`, how OpenAI and shoal report a stream that fails after it
    started) raises `BackendError` with its message; anything else that is not a chunk raises
    `ValueError` (pydantic's `ValidationError`).
    """
    payload = pydantic_core.from_json(data)
    if isinstance(payload, dict) and "error" in payload:
        raise BackendError(f"upstream error in stream: {error_message(data)}")
    return ChatCompletionChunk.model_validate(payload)


# -- errors and models ---------------------------------------------------------------------------


class ErrorDetail(_Out):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorBody(_Out):
    error: ErrorDetail


def error_message(text: str) -> str:
    """The message of an error body (at most 500 characters): OpenAI's
    `{"error": {"message": ...}}`, the `{"error": "..."}` or `{"message": ...}` other servers
    send, or else the text itself."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return text[:500]
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])[:500]
        if isinstance(error, str):
            return error[:500]
    return text[:500]


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
