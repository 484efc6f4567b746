"""A specialist as a model of the fleet: a card, a cost per call, a calibrated confidence.

`Specialist` answers a request from its last user message: the message is embedded by the
fleet's MiniLM, and the specialist's kind (`kinds.py`) gives the answer and its confidence. The
confidence comes back as the answer's one log-probability, so whatever reads token
probabilities (a cascade's signal) reads it. A call is costed like any local model's: the
seconds it computed times the host's price per hour.

The file loads on the first call (or `load`), checked against its checksum
(`WeightsCorruptedError`) and against the embedder: vectors of another embedder than the one it
was trained on would make its answers meaningless, so it refuses to serve
(`SpecialistStaleError`). It answers only requests in the form it was trained on (the same JSON
schema, or none for a label); `covers` says why not for any other.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoal.cards import SINGLE_TASK, HostPrice, ModelCard
from shoal.errors import (
    InvalidRequestError,
    OverloadedError,
    SpecialistStaleError,
    WeightsCorruptedError,
)
from shoal.messages import ChatRequest, ChatResponse, TokenLogprob, Usage
from shoal.models.base import Model
from shoal.models.embedder import Embedder
from shoal.specialists import files
from shoal.specialists.calibrate import Target
from shoal.specialists.forms import Form
from shoal.specialists.kinds import KINDS, Array, Keys, Kind
from shoal.specialists.train import Distilled, Template, embed, input_tokens

log = logging.getLogger(__name__)

# A specialist reads the first 256 tokens of its input (MiniLM's limit) and generates nothing:
# it takes any prompt, and the card's generation speed only keeps estimates finite.
CONTEXT = 1 << 20
GEN_TOK_S = 1e9
MIN_CONFIDENCE = 1e-12


def input_text(request: ChatRequest) -> str:
    """What a specialist reads of a request: its last user message."""
    for message in reversed(request.messages):
        if message.role == "user":
            return message.content
    return request.messages[-1].content


@dataclass(frozen=True)
class Trained:
    """A specialist's file, loaded and checked."""

    kind: Kind
    threshold: float
    target: Target
    meta: dict[str, Any]
    template: Template = field(default_factory=Template)

    @property
    def form(self) -> Form:
        return self.kind.form

    @property
    def live_floor(self) -> float:
        return float(self.meta["report"].get("live_floor", 0.0))

    @property
    def checksum(self) -> str:
        return str(self.meta["checksum"])


def read(path: Path) -> Trained:
    """A specialist file, checked against its checksum; never one without a calibration."""
    loaded = files.load(path)
    meta = loaded.meta
    kind = KINDS.get(str(meta.get("kind")))
    calibration = meta.get("calibration")
    if kind is None:
        raise WeightsCorruptedError(
            f"{path}: unknown specialist kind {meta.get('kind')!r}; valid: {', '.join(KINDS)}"
        )
    if not isinstance(calibration, dict) or calibration.get("threshold") is None:
        raise WeightsCorruptedError(f"{path} holds no calibration: a specialist never serves so")
    try:
        form = Form.from_json(meta["form"])
        state = kind.restore(form, meta["state"], loaded.arrays)
        target = Target.model_validate(calibration["target"])
        threshold = float(calibration["threshold"])
    except (KeyError, TypeError, ValueError) as exc:
        raise WeightsCorruptedError(f"{path} is not a complete specialist: {exc!r}") from exc
    if not math.isfinite(threshold) or not 0.0 <= threshold <= 1.0:
        raise WeightsCorruptedError(f"{path}: calibrated threshold {threshold} is not in [0, 1]")
    template = Template(**meta.get("template", {}))
    return Trained(state, threshold, target, meta, template)


def write(path: Path, distilled: Distilled, *, target: str, teacher: str, embedder: str) -> str:
    """Save a distilled specialist (atomically); returns its checksum. `target` is what it was
    distilled from (a route, a model, `PIPELINE/STEP`), `embedder` the identity of the
    embedder its vectors came from."""
    kind, report = distilled.kind, distilled.report
    costs = report["costs"]
    seconds, tokens = costs["seconds_per_call"], costs["tokens_per_call"]
    meta = {
        "kind": kind.name,
        "target": target,
        "teacher": teacher,
        "embedder": embedder,
        "created_at": time.time(),
        "form": kind.form.as_json(),
        "template": {"prefix": distilled.template.prefix, "suffix": distilled.template.suffix},
        "state": kind.meta(),
        "params": kind.size,
        "calibration": {
            "threshold": distilled.threshold,
            "target": distilled.target.model_dump(exclude_none=True),
        },
        "speed": {
            "seconds_per_call": seconds,
            "prompt_tok_s": tokens / seconds if seconds > 0 else None,
        },
        "report": report,
    }
    return files.save(path, meta, kind.arrays())


def card_for(model_id: str, path: Path, host_price_per_hour: float) -> ModelCard:
    """The card of the specialist in `path`, from its header (a damaged file still gets a card:
    its calls fail, with the reason, when it is asked)."""
    try:
        meta = files.read_meta(path)
    except WeightsCorruptedError as exc:
        log.warning("specialist %s: %s", model_id, exc)
        meta = {}
    speed = meta.get("speed") or {}
    kind = meta.get("kind", "specialist")
    return ModelCard(
        id=model_id,
        tier="specialist",
        params=meta.get("params") or None,
        context=CONTEXT,
        runs="local",
        where=f"{kind} over MiniLM ({path.name})",
        price=HostPrice(per_hour=host_price_per_hour),
        capabilities=frozenset({"logprobs", "json_schema", SINGLE_TASK}),
        prompt_tok_s=speed.get("prompt_tok_s") or None,
        gen_tok_s=GEN_TOK_S,
    )


class Specialist(Model):
    """A trained task model (see the module's docstring). `embedder` gives the fleet's MiniLM
    (called on first use)."""

    def __init__(
        self,
        card: ModelCard,
        path: Path,
        embedder: Callable[[], Embedder],
        *,
        max_queue: int = 64,
    ) -> None:
        self.card = card
        self.path = path
        self._embedder = embedder
        self._loading = threading.Lock()
        self._trained: Trained | None = None
        self._embedder_now: Embedder | None = None
        self.max_queue = max_queue
        self._waiting = 0

    # -- loading -------------------------------------------------------------------------------

    def trained(self) -> Trained:
        """The loaded file, checked (once) against its checksum and the fleet's embedder."""
        with self._loading:
            if self._trained is None:
                trained = read(self.path)
                embedder = self._embedder()
                if embedder.identity != trained.meta.get("embedder"):
                    raise SpecialistStaleError(
                        f"specialist {self.id!r} was trained on the vectors of "
                        f"{trained.meta.get('embedder')!r}, and the fleet's embedder is now "
                        f"{embedder.identity!r}: its answers would be meaningless, so it does "
                        f"not serve; train it again (shoal distil {trained.meta.get('target')})"
                    )
                self._trained, self._embedder_now = trained, embedder
            return self._trained

    async def load(self) -> None:
        await asyncio.to_thread(self.trained)

    def covers(self, request: ChatRequest) -> str | None:
        """Why this specialist cannot answer `request` (None when it can)."""
        form = self.trained().form
        if form.kind == "label":
            if request.wants_json:
                return "it answers with a label, and the request asks for JSON"
            return None
        if request.json_schema != form.schema:
            return "the request's JSON schema is not the one it was trained on"
        return None

    # -- answering -----------------------------------------------------------------------------

    def predict(self, inputs: Sequence[str]) -> tuple[list[str], list[Keys], Array]:
        """Answers, their keys and calibrated confidences for `inputs` (blocking: embeds)."""
        trained = self.trained()
        assert self._embedder_now is not None
        texts = [trained.template.strip(t) for t in inputs]
        return trained.kind.predict(embed(self._embedder_now, texts))

    def answer(self, text: str) -> tuple[str, float]:
        """The answer to one input and its calibrated confidence (blocking: embeds)."""
        texts, _, confidence = self.predict([text])
        return texts[0], float(confidence[0])

    def _serve(self, request: ChatRequest) -> tuple[str, float, float]:
        """(answer, confidence, seconds computed) for a request it covers (blocking)."""
        why = self.covers(request)
        if why is not None:
            raise InvalidRequestError(f"specialist {self.id!r} cannot answer: {why}")
        started = time.perf_counter()
        answer, confidence = self.answer(input_text(request))
        return answer, confidence, time.perf_counter() - started

    async def generate(self, request: ChatRequest) -> ChatResponse:
        if self._waiting >= self.max_queue:
            raise OverloadedError(f"specialist {self.id!r}: {self._waiting} calls are waiting")
        text = input_text(request)
        self._waiting += 1
        started = time.perf_counter()
        try:
            answer, confidence, seconds = await asyncio.to_thread(self._serve, request)
        finally:
            self._waiting -= 1
        wall = time.perf_counter() - started
        usage = Usage(input_tokens=input_tokens(text), output_tokens=0)
        logprob = math.log(max(confidence, MIN_CONFIDENCE))
        return ChatResponse(
            model=self.id,
            text=answer,
            finish_reason="stop",
            usage=usage,
            latency_s=max(wall, seconds),
            compute_s=seconds,
            ttft_s=seconds,
            cost_usd=self.card.cost(usage, seconds),
            logprobs=(TokenLogprob(token=answer, logprob=logprob),),
        )

    def agree(self, a: str, b: str) -> bool | None:
        """Whether two answers to one request say the same (None: one does not parse)."""
        return self.trained().form.agree(a, b)
