"""Model cards: what the fleet knows about each model, and how a call is priced.

An API model is priced per token from the bundled, dated price table (`data/prices.yaml`) or the
fleet file. A local model is priced from the host's price per hour times the compute time of the
call, so a streamed and a non-streamed call of the same work cost the same.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from shoal.errors import UnknownModelError
from shoal.messages import Usage

# A 2-vCPU on-demand cloud instance (the class of machine the default fleet is measured on)
# costs about $0.09 per hour. Override per fleet with `host_price_per_hour`.
DEFAULT_HOST_PRICE_PER_HOUR = 0.09


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
    """Speed and memory measured on this machine by `shoal models bench`."""

    load_s: float
    prompt_tok_s: float
    gen_tok_s: float
    peak_rss_mb: float
    measured_at: str


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
    prompt_tok_s: float | None = Field(default=None, gt=0, description="expected prompt speed")
    gen_tok_s: float | None = Field(default=None, gt=0, description="expected generation speed")

    def cost(self, usage: Usage, compute_s: float) -> float:
        return self.price.cost(usage, compute_s)

    def expected_seconds(self, input_tokens: int, output_tokens: int) -> float:
        """Compute time for a call of this size, from measured (else expected) speeds."""
        prompt = self.measured.prompt_tok_s if self.measured else self.prompt_tok_s
        gen = self.measured.gen_tok_s if self.measured else self.gen_tok_s
        if self.runs == "api" and (prompt is None or gen is None):
            return 0.5 + output_tokens / 50.0  # a typical hosted model, when nothing is measured
        return input_tokens / (prompt or _SLOWEST_PROMPT) + output_tokens / (gen or _SLOWEST_GEN)

    def worst_case_cost(self, input_tokens: int, output_tokens: int) -> float:
        """The most a call with at most these token counts can cost.

        Exact for token prices. For a host-priced local model, the expected compute time with a
        margin of `LOCAL_COST_MARGIN` for a busy machine.
        """
        usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
        if isinstance(self.price, TokenPrice):
            return self.price.cost(usage, 0.0)
        seconds = self.expected_seconds(input_tokens, output_tokens) * LOCAL_COST_MARGIN
        return self.price.cost(usage, seconds)


# Speeds assumed for a local model nothing is known about (a slow CPU, a 7B model).
_SLOWEST_PROMPT = 20.0
_SLOWEST_GEN = 2.0
# A local call's worst case is this many times its expected compute time.
LOCAL_COST_MARGIN = 3.0


class PublishedPrice(_Data):
    provider: str
    input_per_mtok: float
    output_per_mtok: float
    context: int

    @property
    def price(self) -> TokenPrice:
        return TokenPrice(input_per_mtok=self.input_per_mtok, output_per_mtok=self.output_per_mtok)


class PriceTable(_Data):
    as_of: str
    models: dict[str, PublishedPrice]

    def get(self, model: str) -> PublishedPrice:
        try:
            return self.models[model]
        except KeyError:
            raise UnknownModelError(model, self.models) from None


@cache
def published_prices() -> PriceTable:
    """The bundled price table (read once, on first use)."""
    text = resources.files("shoal.data").joinpath("prices.yaml").read_text(encoding="utf-8")
    return PriceTable.model_validate(yaml.safe_load(text))
