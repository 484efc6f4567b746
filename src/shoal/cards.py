"""Model cards: what the fleet knows about each model, and how a call is priced.

An API model is priced per token from the fleet file, else from its list price: the data that the
`genai-prices` package bundles (never updated over the network), else, for a model it does not
know, the bundled, dated fallback table (`data/prices.yaml`). A local model is priced from the
host's price per hour times the compute time of the call, so a streamed and a non-streamed call
of the same work cost the same.
"""

from __future__ import annotations

from decimal import Decimal
from functools import cache
from importlib import resources
from typing import Literal, NamedTuple

import yaml
from pydantic import BaseModel, ConfigDict, Field

from shoal.errors import UnknownModelError
from shoal.messages import ChatRequest, Usage
from shoal.money import whole_pico

# A 2-vCPU on-demand cloud instance (the class of machine the default fleet is measured on)
# costs about $0.09 per hour. Override per fleet with `host_price_per_hour`.
DEFAULT_HOST_PRICE_PER_HOUR = 0.09


# The capability of a model that answers one task only (a specialist).
SINGLE_TASK = "single-task"


class _Data(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TokenPrice(_Data):
    """Per-token pricing of an API model, in USD per million tokens."""

    kind: Literal["tokens"] = "tokens"
    input_per_mtok: float = Field(ge=0.0)
    output_per_mtok: float = Field(ge=0.0)

    def cost(self, usage: Usage, compute_s: float) -> float:
        del compute_s
        return (
            usage.input_tokens * self.input_per_mtok + usage.output_tokens * self.output_per_mtok
        ) / 1e6


class HostPrice(_Data):
    """A local model: the host's price per hour, charged for the seconds the model computes."""

    kind: Literal["host"] = "host"
    per_hour: float = Field(default=DEFAULT_HOST_PRICE_PER_HOUR, ge=0.0)

    def cost(self, usage: Usage, compute_s: float) -> float:
        del usage
        return self.per_hour * compute_s / 3600.0


Price = TokenPrice | HostPrice


class Measured(_Data):
    """Speed and memory measured on this machine by `shoal models bench`: the best of `runs`
    runs; `spread` is how far their speeds differed (a share of the fastest), and a `noisy`
    measurement's runs differed too much to trust (a busy machine)."""

    load_s: float
    prompt_tok_s: float
    gen_tok_s: float
    peak_rss_mb: float
    measured_at: str
    runs: int = Field(default=1, ge=1)
    spread: float = Field(default=0.0, ge=0.0)
    noisy: bool = False


class ModelCard(_Data):
    id: str
    tier: str | None = None
    params: int | None = None
    context: int = Field(gt=0)
    runs: Literal["local", "api"]
    where: str
    price: Price = Field(discriminator="kind")
    capabilities: frozenset[str] = frozenset()
    measured: Measured | None = None
    price_source: str | None = Field(
        default=None, description="where a list price came from (None: the fleet file, a host)"
    )
    prompt_tok_s: float | None = Field(default=None, gt=0, description="expected prompt speed")
    gen_tok_s: float | None = Field(default=None, gt=0, description="expected generation speed")

    @property
    def single_task(self) -> bool:
        """A specialist: it answers only the task it was trained for, so it never stands in
        for another model."""
        return SINGLE_TASK in self.capabilities

    def cost(self, usage: Usage, compute_s: float) -> float:
        """What a call of this size cost, in whole picodollars."""
        return whole_pico(self.price.cost(usage, compute_s))

    # -- the one estimator: tokens, time and money of a request before it runs ----------------
    # `live` is how fast the model has been answering lately (`shoal.speeds`), when known: it
    # wins over the card's idle figures.

    def seconds_for(
        self, input_tokens: int, output_tokens: int, live: Speed | None = None
    ) -> float:
        """Compute time for a call of this size, from live, else measured, else expected
        speeds."""
        prompt = self.measured.prompt_tok_s if self.measured else self.prompt_tok_s
        gen = self.measured.gen_tok_s if self.measured else self.gen_tok_s
        if live is not None:
            prompt, gen = live.prompt_tok_s or prompt, live.gen_tok_s or gen
        if self.runs == "api" and (prompt is None or gen is None):
            return 0.5 + output_tokens / 50.0  # a typical hosted model, when nothing is measured
        return input_tokens / (prompt or _SLOWEST_PROMPT) + output_tokens / (gen or _SLOWEST_GEN)

    def expected_seconds(self, request: ChatRequest, live: Speed | None = None) -> float:
        """Seconds `request` is expected to take here: the wait in the model's queue lately,
        and the compute of its expected token counts."""
        tokens = estimate_tokens(request)
        wait = live.wait_s if live is not None else 0.0
        return wait + self.seconds_for(tokens.input, tokens.output, live)

    def expected_cost(self, request: ChatRequest) -> float:
        tokens = estimate_tokens(request)
        usage = Usage(input_tokens=tokens.input, output_tokens=tokens.output)
        return self.cost(usage, self.seconds_for(tokens.input, tokens.output))

    def worst_case_cost(self, request: ChatRequest, live: Speed | None = None) -> float:
        """The most `request` can cost here (reserved against budgets before it starts).

        Exact for token prices: every prompt byte a token, `max_tokens` generated. For a
        host-priced local model, the compute time those token counts take at the card's speed,
        times `LOCAL_COST_MARGIN` for a busy machine.
        """
        tokens = estimate_tokens(request)
        usage = Usage(input_tokens=tokens.input_max, output_tokens=tokens.output_max)
        if isinstance(self.price, TokenPrice):
            return self.cost(usage, 0.0)
        seconds = self.seconds_for(tokens.input_max, tokens.output_max, live) * LOCAL_COST_MARGIN
        return self.cost(usage, seconds)

    def partial_cost(self, request: ChatRequest, *, seconds: float, delivered: int) -> float:
        """What a call that did not complete consumed: for a host-priced model, the seconds it
        ran; for a token-priced one, the prompt (expected tokens) and the `delivered` text
        events (one token each, as OpenAI-compatible servers stream)."""
        if isinstance(self.price, HostPrice):
            return self.cost(Usage(), seconds)
        usage = Usage(input_tokens=estimate_tokens(request).input, output_tokens=delivered)
        return self.cost(usage, 0.0)


class Speed(NamedTuple):
    """How fast a model has been answering lately: tokens a second (None: not seen yet) and
    the seconds a call waited in its queue."""

    prompt_tok_s: float | None
    gen_tok_s: float | None
    wait_s: float = 0.0


class TokenEstimate(NamedTuple):
    """A request's token counts before it runs: expected, and an upper bound."""

    input: int
    output: int
    input_max: int
    output_max: int


# No tokenizer makes more tokens than UTF-8 bytes; a chat template adds at most this many a
# message. Expected: about 4 bytes a token, a few template tokens a message, and half of
# `max_tokens` generated.
_TEMPLATE_MAX = 48
_TEMPLATE_EXPECTED = 8
_BYTES_PER_TOKEN = 4


def estimate_tokens(request: ChatRequest) -> TokenEstimate:
    """The one token estimate every plan, budget and deadline uses."""
    size = sum(len(m.content.encode("utf-8")) for m in request.messages)
    turns = len(request.messages) + 1
    return TokenEstimate(
        input=-(-size // _BYTES_PER_TOKEN) + _TEMPLATE_EXPECTED * turns,
        output=-(-request.max_tokens // 2),
        input_max=size + _TEMPLATE_MAX * turns,
        output_max=request.max_tokens,
    )


# Speeds assumed for a local model nothing is known about (a slow CPU, a 7B model).
_SLOWEST_PROMPT = 20.0
_SLOWEST_GEN = 2.0
# A local call's worst case is this many times its expected compute time.
LOCAL_COST_MARGIN = 3.0


class PublishedPrice(_Data):
    """A model's published list price, its context window when known, and where they came from."""

    provider: str
    input_per_mtok: float
    output_per_mtok: float
    context: int | None = Field(default=None, gt=0)
    source: str = ""

    @property
    def price(self) -> TokenPrice:
        return TokenPrice(input_per_mtok=self.input_per_mtok, output_per_mtok=self.output_per_mtok)


class PriceTable(_Data):
    as_of: str
    models: dict[str, PublishedPrice]

    @property
    def source(self) -> str:
        return f"shoal's price table of {self.as_of}"

    def get(self, model: str) -> PublishedPrice:
        try:
            entry = self.models[model]
        except KeyError:
            raise UnknownModelError(model, self.models) from None
        return entry.model_copy(update={"source": self.source})


@cache
def published_prices() -> PriceTable:
    """The bundled price table (read once, on first use)."""
    text = resources.files("shoal.data").joinpath("prices.yaml").read_text(encoding="utf-8")
    return PriceTable.model_validate(yaml.safe_load(text))


def list_price(model: str) -> PublishedPrice:
    """The published list price of the API model `model` (its upstream name, as its provider
    spells it): from `genai-prices`' bundled data, else from the bundled fallback table.

    Raises `UnknownModelError` when neither knows the model; it lists the fallback table's models
    (genai-prices knows thousands, too many to list: `genai_prices_source()` names its release).
    """
    return _genai_price(model) or published_prices().get(model)


def genai_prices_source() -> str:
    """The release of genai-prices whose bundled data prices API models."""
    from importlib.metadata import version

    return f"genai-prices {version('genai-prices')}"


def _genai_price(model: str) -> PublishedPrice | None:
    """`model`'s list price from genai-prices, or None when it does not know the model.

    Reads the data the package bundles; shoal never starts its network updater (`UpdatePrices`).
    Should another library in the process have started it, the source says so and when it fetched.
    A price with tiers (a dearer rate past some prompt size) gives its base rate: a token price
    here is one rate.
    """
    import genai_prices  # its data takes ~0.15 s to load: only when a price is looked up

    try:
        calc = genai_prices.calc_price(genai_prices.Usage(input_tokens=0, output_tokens=0), model)
    except LookupError:
        return None
    rates = calc.model_price
    input_rate, output_rate = _base_rate(rates.input_mtok), _base_rate(rates.output_mtok)
    if input_rate is None or output_rate is None:  # not priced per token (audio, images)
        return None
    source = genai_prices_source()
    if calc.auto_update_timestamp is not None:
        source += f", data fetched {calc.auto_update_timestamp:%Y-%m-%d %H:%M}"
    return PublishedPrice(
        provider=calc.provider.id,
        input_per_mtok=float(input_rate),
        output_per_mtok=float(output_rate),
        context=calc.model.context_window,
        source=source,
    )


def _base_rate(rate: object) -> Decimal | None:
    from genai_prices.types import TieredPrices

    if isinstance(rate, TieredPrices):
        return rate.base
    return rate if isinstance(rate, Decimal) else None
