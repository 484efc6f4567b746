"""shoal's own request and response types.

Every model adapter turns a `ChatRequest` into a `ChatResponse`. Wire formats (OpenAI's field
names, llama.cpp's dicts) are translated to and from these types once, at the edges.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Message(_Frozen):
    role: Role
    content: str


class ChatRequest(_Frozen):
    """One call to a model.

    `json_schema` constrains the output to that JSON schema; `json_object` to any JSON object.
    `logprobs` asks for the log-probability of every generated token (and `top_logprobs`
    alternatives per position). `max_cost_usd` caps what the call may cost: a model priced by
    compute time stops generating before it would pass it (finishing with reason "length").
    """

    messages: tuple[Message, ...] = Field(min_length=1)
    max_tokens: int = Field(default=256, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    json_object: bool = False
    json_schema: dict[str, Any] | None = None
    logprobs: bool = False
    top_logprobs: int = Field(default=0, ge=0, le=20)
    max_cost_usd: float | None = Field(default=None, ge=0.0)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=True")
        return self

    @classmethod
    def of(cls, prompt: str, *, system: str | None = None, **fields: Any) -> ChatRequest:
        """A request with one user message (and an optional system message)."""
        messages = [Message(role="system", content=system)] if system else []
        messages.append(Message(role="user", content=prompt))
        return cls(messages=tuple(messages), **fields)

    @property
    def wants_json(self) -> bool:
        return self.json_object or self.json_schema is not None


class Usage(_Frozen):
    input_tokens: int = Field(default=0, ge=0)
    output_tokens: int = Field(default=0, ge=0)

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class TokenLogprob(_Frozen):
    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


class Estimate(_Frozen):
    """What a route expects of one candidate model for one request."""

    model: str
    quality: float | None = None
    cost_usd: float | None = None
    latency_s: float | None = None
    eligible: bool = True
    note: str = ""


class RouteDecision(_Frozen):
    """A route's choice for one request, with its reasons and evidence.

    `models` is one model, or a cascade in the order it escalates. `target_met` is false when no
    candidate is expected to meet the route's quality target or deadline and the route fell back
    to the best available: the choice is then flagged, never silently swapped.
    """

    route: str
    models: tuple[str, ...] = Field(min_length=1)
    reason: str
    estimates: tuple[Estimate, ...] = ()
    target_met: bool = True
    decision_s: float = 0.0


class ChatResponse(_Frozen):
    """What a model answered, what it cost and how long it took.

    `latency_s` is wall time from the call to the last token; `compute_s` is the time the model
    itself worked (no queueing), which prices a local model; `ttft_s` is time to first token.
    A routed call carries its `decision`, and in `attempts` the answers of the models a cascade
    tried and escalated from (each costed on its own).
    `usage_estimated` is true when the backend did not report token counts (some servers omit
    them from streams) and shoal had to count them itself.
    """

    model: str
    text: str
    finish_reason: FinishReason
    usage: Usage
    latency_s: float = Field(ge=0.0)
    compute_s: float = Field(default=0.0, ge=0.0)
    ttft_s: float | None = None
    cost_usd: float = Field(default=0.0, ge=0.0)
    logprobs: tuple[TokenLogprob, ...] | None = None
    usage_estimated: bool = False
    decision: RouteDecision | None = None
    attempts: tuple[ChatResponse, ...] = ()

    @property
    def total_cost_usd(self) -> float:
        """This answer's cost plus that of every earlier attempt (a cascade's escalations)."""
        return self.cost_usd + sum(a.total_cost_usd for a in self.attempts)


class TextDelta(_Frozen):
    """A piece of generated text, in order."""

    kind: Literal["delta"] = "delta"
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


class Escalated(_Frozen):
    """A cascade stage answered and its answer was not trusted: the answer is paid for (and
    arrives again in the final response's `attempts`); the route asks the next model."""

    kind: Literal["escalated"] = "escalated"
    response: ChatResponse


class StageFailed(_Frozen):
    """A route's stage failed with a retryable error and the route asks the next model: the
    stage is traced and charged what it consumed (nothing when it failed before any work)."""

    kind: Literal["stage_failed"] = "stage_failed"
    model: str
    error: str
    before_work: bool
    seconds: float


class Completed(_Frozen):
    """The last event of a stream: the full response, costed exactly as a non-streamed call."""

    kind: Literal["completed"] = "completed"
    response: ChatResponse


StreamEvent = TextDelta | Escalated | StageFailed | Completed
