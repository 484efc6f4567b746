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

    def cost(self, usage: Usage, compute_s: float) -> float:
        return self.price.cost(usage, compute_s)


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
