"""The fleet file: one schema for the embedded default fleet and the user's own YAML.

```yaml
host_price_per_hour: 0.09        # prices local models (USD per hour of compute)
include_default: true            # keep the embedded tiny/small/large fleet
models:
  - id: my-phi                   # a GGUF file on disk
    kind: gguf
    path: ~/models/phi-3-mini.Q4_K_M.gguf
    context: 4096
  - id: gpt-4o-mini              # an OpenAI-compatible endpoint
    kind: openai
    base_url: https://api.openai.com/v1
    api_key_env: OPENAI_API_KEY  # the key is read from this variable at call time
```
An API model's price and context come from the bundled price table when its upstream model is
listed there, else they must be given. Unknown keys and bad values are errors that say where.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shoal.cards import DEFAULT_HOST_PRICE_PER_HOUR, TokenPrice
from shoal.errors import ConfigError
from shoal.weights import PackagedWeights

ModelId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$", max_length=128)]


class _Spec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GGUFModelSpec(_Spec):
    """A GGUF model run in process by llama.cpp: a file path, or weights shipped in packages."""

    kind: Literal["gguf"] = "gguf"
    id: ModelId
    tier: str | None = None
    params: int | None = Field(default=None, gt=0)
    context: int = Field(default=4096, ge=128, le=1 << 20)
    path: Path | None = None
    packaged: PackagedWeights | None = None
    threads: int | None = Field(default=None, ge=1)
    batch: int = Field(default=512, ge=1)
    max_queue: int = Field(default=64, ge=1, description="calls that may wait for the model")
    gen_tok_s: float | None = Field(default=None, gt=0, description="expected generation speed")

    @model_validator(mode="after")
    def _one_source(self) -> GGUFModelSpec:
        if (self.path is None) == (self.packaged is None):
            raise ValueError("give exactly one of 'path' or 'packaged'")
        return self


class OpenAIModelSpec(_Spec):
    """A model behind an OpenAI-compatible /v1/chat/completions endpoint."""

    kind: Literal["openai"]
    id: ModelId
    base_url: str = Field(pattern=r"^https?://")
    model: str | None = Field(default=None, description="upstream model name; defaults to id")
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    tier: str | None = None
    params: int | None = Field(default=None, gt=0)
    context: int | None = Field(default=None, gt=0)
    price: TokenPrice | None = None
    timeout_s: float = Field(default=60.0, gt=0)
    max_concurrency: int = Field(default=16, ge=1)
    max_queue: int = Field(default=256, ge=1)
    json_schema_style: Literal["openai", "llama_cpp"] = Field(
        default="openai",
        description="how the endpoint takes a JSON schema: OpenAI's json_schema, or llama.cpp's",
    )

    @property
    def upstream_model(self) -> str:
        return self.model or self.id


ModelSpec = Annotated[GGUFModelSpec | OpenAIModelSpec, Field(discriminator="kind")]


class FleetSettings(_Spec):
    host_price_per_hour: float = Field(default=DEFAULT_HOST_PRICE_PER_HOUR, ge=0.0)
    include_default: bool = True
    cache_dir: Path | None = None
    models: tuple[ModelSpec, ...] = ()

    @model_validator(mode="after")
    def _unique_ids(self) -> FleetSettings:
        seen: set[str] = set()
        for spec in self.models:
            if spec.id in seen:
                raise ValueError(f"model id {spec.id!r} is listed twice")
            seen.add(spec.id)
        return self


class ServerSettings(_Spec):
    """`shoal serve`: where it listens and what it lets in (flags of the same names)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    auth: bool = Field(default=True, description="require an API key (see `shoal keys`)")
    keys_path: Path | None = Field(default=None, description="default: keys.sqlite in the cache")
    max_body_bytes: int = Field(default=1 << 20, ge=1024, description="larger bodies get 413")
    log_prompts: bool = Field(default=False, description="log prompts and answers (debug only)")


def default_cache_dir() -> Path:
    """`$SHOAL_CACHE_DIR`, else `$XDG_CACHE_HOME/shoal`, else `~/.cache/shoal`."""
    if explicit := os.environ.get("SHOAL_CACHE_DIR"):
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "shoal"


def parse_fleet(text: str, *, source: str) -> FleetSettings:
    """Parse fleet YAML; every problem is a `ConfigError` naming the file, line or field."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected a mapping at the top level, got {type(data).__name__}"
        )
    try:
        return FleetSettings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"{source}: {problems}") from exc


def load_fleet(path: str | os.PathLike[str]) -> FleetSettings:
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read fleet file {path}: {exc.strerror}") from exc
    return parse_fleet(text, source=str(path))
