"""The fleet file: one schema for the embedded default fleet and the user's own YAML.

```yaml
host_price_per_hour: 0.09        # prices local models (USD per hour of compute)
include_default: true            # keep the embedded tiny/small/large fleet
backend: local                   # GGUF models run in process, or on Ray (docs/scale.md)
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

import ipaddress
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


# A model whose id is a built-in model's must say so: a silent replacement would change what a
# familiar name runs and costs.
_REPLACE = "replace the built-in model of the same id (else reusing its id is an error)"


Backend = Literal["local", "ray"]


class RayPlacement(_Spec):
    """How a model runs on a Ray cluster (`backend: ray`): a Ray Serve deployment of replicas,
    each with llama.cpp inside. A fixed number of `replicas`, or autoscaling between
    `min_replicas` and `max_replicas` aiming at `target_ongoing_requests` per replica."""

    replicas: int | None = Field(default=None, ge=1, description="fixed count (default 1)")
    min_replicas: int | None = Field(default=None, ge=0, description="autoscaling floor")
    max_replicas: int | None = Field(default=None, ge=1, description="autoscaling ceiling")
    target_ongoing_requests: float = Field(default=2.0, gt=0, description="autoscaling aim")
    num_cpus: float = Field(
        default=1.0, gt=0, description="CPUs each replica reserves (fractions allowed)"
    )
    max_ongoing_requests: int = Field(default=16, ge=1, description="calls one replica takes")
    max_queued_requests: int = Field(
        default=64, ge=1, description="calls that may wait for a replica (more get 503)"
    )

    @model_validator(mode="after")
    def _fixed_or_autoscaled(self) -> RayPlacement:
        autoscaled = self.min_replicas is not None or self.max_replicas is not None
        if autoscaled and self.replicas is not None:
            raise ValueError("give either 'replicas' or 'min_replicas'/'max_replicas', not both")
        if autoscaled and (self.min_replicas is None or self.max_replicas is None):
            raise ValueError("autoscaling needs both 'min_replicas' and 'max_replicas'")
        if autoscaled and self.min_replicas > self.max_replicas:  # type: ignore[operator]
            raise ValueError("min_replicas is more than max_replicas")
        return self


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
    prompt_tok_s: float | None = Field(default=None, gt=0, description="expected prompt speed")
    replace: bool = Field(default=False, description=_REPLACE)
    backend: Backend | None = Field(default=None, description="where it runs (default: fleet's)")
    ray: RayPlacement | None = Field(default=None, description="placement (default: fleet's)")

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
    replace: bool = Field(default=False, description=_REPLACE)

    @property
    def upstream_model(self) -> str:
        return self.model or self.id


class SpecialistModelSpec(_Spec):
    """A specialist written by `shoal distil`: a small model for one task, in one file."""

    kind: Literal["specialist"]
    id: ModelId
    path: Path = Field(description="its file (.npz), as `shoal distil` wrote it")
    teacher: ModelId | None = Field(default=None, description="the model it learned from")
    max_queue: int = Field(default=64, ge=1, description="calls that may wait for the model")
    replace: bool = Field(default=False, description=_REPLACE)


ModelSpec = Annotated[
    GGUFModelSpec | OpenAIModelSpec | SpecialistModelSpec, Field(discriminator="kind")
]


# -- routes (built by shoal.routing.config) -------------------------------------------------------

RouteName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)]


class RouteTarget(_Spec):
    """What a route must achieve: exactly one of the three."""

    quality_ratio: float | None = Field(
        default=None, gt=0.0, le=1.0, description="share of the best model's quality"
    )
    min_quality: float | None = Field(default=None, ge=0.0, le=1.0)
    max_cost_ratio: float | None = Field(
        default=None, gt=0.0, description="cost cap, as a share of the best model's cost"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> RouteTarget:
        given = [v for v in (self.quality_ratio, self.min_quality, self.max_cost_ratio) if v]
        if len(given) != 1:
            raise ValueError("give exactly one of quality_ratio, min_quality, max_cost_ratio")
        return self


class ShadowSpec(_Spec):
    """A candidate model or route asked a sampled share of a route's live requests, off the
    request path, to see how it would have done (`shoal route report NAME`)."""

    candidate: ModelId
    share: float = Field(default=0.05, gt=0.0, le=1.0, description="live calls also asked")
    budget_usd_per_hour: float = Field(default=0.05, ge=0.0, description="spent on the candidate")
    max_in_flight: int = Field(default=1, ge=1, description="candidate calls running at once")
    agreement: str = Field(default="auto", description="auto | exact | f1 | judge:MODEL")


class _RouteSpec(_Spec):
    name: RouteName
    deadline_s: float | None = Field(
        default=None, gt=0, description="only models whose p95 latency fits (latency SLO)"
    )
    record: bool = Field(
        default=False, description="record each answer with its request, for `shoal distil`"
    )
    shadow: ShadowSpec | None = None


class FixedRouteSpec(_RouteSpec):
    kind: Literal["fixed"]
    model: ModelId


class FallbackRouteSpec(_RouteSpec):
    kind: Literal["fallback"]
    models: tuple[ModelId, ...] = Field(min_length=1)


class CascadeRouteSpec(_RouteSpec):
    """Cheapest first; escalate while the answer's confidence is under the threshold."""

    kind: Literal["cascade"]
    models: tuple[ModelId, ...] = Field(min_length=2, description="in escalation order")
    signal: Literal["logprob", "agreement"] = "logprob"
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)


class PredictiveRouteSpec(_RouteSpec):
    """Predicts each model's quality per query; calibrated on an outcome table to a target."""

    kind: Literal["predictive"]
    models: tuple[ModelId, ...] = Field(min_length=2)
    predictor: Literal["knn", "logistic", "mlp", "mf", "ensemble", "cluster"] = "ensemble"
    target: RouteTarget = RouteTarget(quality_ratio=0.95)
    outcomes: Path | None = Field(
        default=None, description="outcome table to calibrate on (default: the local one)"
    )
    min_quality: float | None = Field(default=None, ge=0.0, le=1.0)


class DriftSpec(_Spec):
    """A specialist route's drift guard: the teacher shadows a share of the specialist's
    answers (off the request path, within a budget); when their agreement falls below the
    floor, the route stops using the specialist."""

    share: float = Field(default=0.05, ge=0.0, le=1.0, description="answers checked (0: none)")
    budget_usd_per_hour: float = Field(default=0.05, ge=0.0, description="spent on checks")
    max_in_flight: int = Field(default=1, ge=1, description="checks running at once")
    min_checks: int = Field(default=20, ge=1, description="checks before it may switch off")
    min_agreement: float | None = Field(
        default=None, ge=0.0, le=1.0, description="the floor (default: the specialist's own)"
    )


class SpecialistRouteSpec(_RouteSpec):
    """A specialist answers when its calibrated confidence clears its threshold (calibrated by
    `shoal distil` to the route's quality target); otherwise the teacher answers."""

    kind: Literal["specialist"]
    specialist: ModelId
    teacher: ModelId
    drift: DriftSpec = DriftSpec()

    @model_validator(mode="after")
    def _drift_is_its_shadow(self) -> SpecialistRouteSpec:
        if self.shadow is not None:
            raise ValueError(
                "a specialist route's shadow is its drift guard (the teacher): set `drift:` "
                "instead of `shadow:`"
            )
        return self


RouteSpec = Annotated[
    FixedRouteSpec
    | FallbackRouteSpec
    | CascadeRouteSpec
    | PredictiveRouteSpec
    | SpecialistRouteSpec,
    Field(discriminator="kind"),
]


class FleetSettings(_Spec):
    host_price_per_hour: float = Field(default=DEFAULT_HOST_PRICE_PER_HOUR, ge=0.0)
    include_default: bool = True
    cache_dir: Path | None = None
    models: tuple[ModelSpec, ...] = ()
    routes: tuple[RouteSpec, ...] = ()
    backend: Backend = Field(default="local", description="where local models run: local | ray")
    ray: RayPlacement = Field(default=RayPlacement(), description="default placement on Ray")

    @model_validator(mode="after")
    def _unique_ids(self) -> FleetSettings:
        seen: set[str] = set()
        for spec in self.models:
            if spec.id in seen:
                raise ValueError(f"model id {spec.id!r} is listed twice")
            seen.add(spec.id)
        for route in self.routes:
            if route.name in seen:
                raise ValueError(f"route name {route.name!r} is already a model id or route")
            seen.add(route.name)
        return self


class ServerSettings(_Spec):
    """`shoal serve`: where it listens and what it lets in (flags of the same names)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    auth: bool = Field(default=True, description="require an API key (see `shoal keys`)")
    keys_path: Path | None = Field(default=None, description="default: keys.sqlite in the cache")
    public: bool = Field(default=False, description="may bind beyond loopback (needs auth)")
    tls_cert: Path | None = Field(default=None, description="serve HTTPS: certificate (PEM)")
    tls_key: Path | None = Field(default=None, description="serve HTTPS: its private key (PEM)")
    max_body_bytes: int = Field(default=1 << 20, ge=1024, description="larger bodies get 413")
    max_schema_bytes: int = Field(
        default=64 * 1024, ge=1024, description="larger JSON schemas (response_format) get 400"
    )
    log_prompts: bool = Field(default=False, description="log prompts and answers (debug only)")
    metrics_auth: bool = Field(default=False, description="/metrics needs an API key too")
    pipelines: tuple[str, ...] = Field(
        default=(),
        description="pipelines to serve: registered names (`shoal pipelines list`) or YAML files",
    )

    @model_validator(mode="after")
    def _metrics_auth_needs_keys(self) -> ServerSettings:
        if self.metrics_auth and not self.auth:
            raise ValueError("metrics_auth needs auth: without API keys no key can be checked")
        return self

    @model_validator(mode="after")
    def _exposure(self) -> ServerSettings:
        if not is_loopback(self.host):
            if not self.public:
                raise ValueError(
                    f"host {self.host!r} is not a loopback address: anyone who can reach this "
                    "machine could call the server; set public (--public) to mean it"
                )
            if not self.auth:
                raise ValueError(
                    f"refusing to serve beyond loopback (host {self.host!r}) without API keys "
                    "(auth off, --no-auth): anyone who reaches it would spend"
                )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together (--tls-cert, --tls-key)")
        for name, path in (("tls_cert", self.tls_cert), ("tls_key", self.tls_key)):
            if path is not None and not path.is_file():
                raise ValueError(f"{name}: no such file: {path}")
        return self


def is_loopback(host: str) -> bool:
    """Whether a server bound to `host` is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
