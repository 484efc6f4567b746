"""The fleet: the configured set of models, their cards, and the models themselves.

Cards are cheap and always available; a model is built on first use, and a local model loads
its weights on its first call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from shoal.cards import (
    HostPrice,
    Measured,
    ModelCard,
    PublishedPrice,
    genai_prices_source,
    list_price,
    published_prices,
)
from shoal.errors import ConfigError, ModelNotInstalledError, UnknownModelError
from shoal.models.base import Model
from shoal.settings import (
    FleetSettings,
    GGUFModelSpec,
    ModelSpec,
    OpenAIModelSpec,
    RayPlacement,
    SpecialistModelSpec,
    default_cache_dir,
    load_fleet,
    parse_fleet,
)

if TYPE_CHECKING:
    from shoal.models.embedder import Embedder

log = logging.getLogger(__name__)

MEASUREMENTS_FILE = "measurements.json"


@cache
def default_specs() -> tuple[ModelSpec, ...]:
    """The embedded default fleet (tiny, small, large), read once from package data."""
    text = resources.files("shoal.data").joinpath("default_fleet.yaml").read_text("utf-8")
    return parse_fleet(text, source="shoal/data/default_fleet.yaml").models


class Fleet:
    def __init__(self, settings: FleetSettings | None = None) -> None:
        self.settings = settings or FleetSettings()
        self.cache_dir = self.settings.cache_dir or default_cache_dir()
        specs = list(default_specs()) if self.settings.include_default else []
        built_in = {spec.id for spec in specs}
        for spec in self.settings.models:
            if spec.id in built_in and not spec.replace:
                raise ConfigError(
                    f"model id {spec.id!r} is a built-in model of the default fleet: give "
                    "yours another id, or say `replace: true` to replace the built-in one"
                )
            if spec.replace and self.settings.include_default and spec.id not in built_in:
                raise ConfigError(
                    f"model {spec.id!r} says `replace: true`, but no built-in model has that id "
                    f"(built-in: {', '.join(sorted(built_in))})"
                )
        own = {spec.id for spec in self.settings.models}
        specs = [s for s in specs if s.id not in own] + list(self.settings.models)
        if not specs:
            raise ConfigError("the fleet has no models (include_default is false and none listed)")
        self._specs: dict[str, ModelSpec] = {spec.id: spec for spec in specs}
        measured = self._read_measurements()
        self._cards = {spec.id: self._card(spec, measured.get(spec.id)) for spec in specs}
        self._models: dict[str, Model] = {}
        self._embedder: Embedder | None = None
        self._embedder_lock = threading.Lock()  # specialists load from worker threads

    @classmethod
    def from_file(cls, path: str | Path | None) -> Fleet:
        """The fleet in `path`, or the embedded default fleet when `path` is None."""
        if path is None:
            return cls()
        settings = load_fleet(path)
        try:
            return cls(settings)
        except ConfigError as exc:  # say which file
            raise ConfigError(f"{Path(path).expanduser()}: {exc}") from exc

    # -- cards -------------------------------------------------------------------------------

    @property
    def ids(self) -> list[str]:
        return list(self._specs)

    def spec(self, model_id: str) -> ModelSpec:
        try:
            return self._specs[model_id]
        except KeyError:
            raise UnknownModelError(model_id, self._specs) from None

    def card(self, model_id: str) -> ModelCard:
        self.spec(model_id)
        return self._cards[model_id]

    def runs_locally(self, model_id: str) -> bool:
        """Whether `model_id` is a model of this fleet that runs in this process."""
        card = self._cards.get(model_id)
        return card is not None and card.runs == "local"

    def cards(self) -> list[ModelCard]:
        return list(self._cards.values())

    def installed(self, model_id: str) -> bool:
        spec = self.spec(model_id)
        if isinstance(spec, OpenAIModelSpec):
            return True
        if isinstance(spec, SpecialistModelSpec):
            return spec.path.expanduser().is_file()
        if spec.packaged is not None:
            return spec.packaged.installed()
        return spec.path is not None and spec.path.expanduser().is_file()

    def _card(self, spec: ModelSpec, measured: Measured | None) -> ModelCard:
        if isinstance(spec, SpecialistModelSpec):
            from shoal.specialists.model import card_for

            return card_for(spec.id, spec.path.expanduser(), self.settings.host_price_per_hour)
        if isinstance(spec, GGUFModelSpec):
            return ModelCard(
                id=spec.id,
                tier=spec.tier,
                params=spec.params,
                context=spec.context,
                runs="local",
                where=(
                    "llama.cpp on ray"
                    if (spec.backend or self.settings.backend) == "ray"
                    else "llama.cpp"
                ),
                price=HostPrice(per_hour=self.settings.host_price_per_hour),
                capabilities=frozenset({"stream", "logprobs", "json_schema"}),
                measured=measured,
                prompt_tok_s=spec.prompt_tok_s,
                gen_tok_s=spec.gen_tok_s,
            )
        listed: PublishedPrice | None = None
        if spec.price is None or spec.context is None:
            with contextlib.suppress(UnknownModelError):
                listed = list_price(spec.upstream_model)
        price = spec.price or (listed.price if listed else None)
        context = spec.context or (listed.context if listed else None)
        if price is None or context is None:
            missing = " and ".join(
                name for name, v in (("price", price), ("context", context)) if v is None
            )
            table = published_prices()
            raise ConfigError(
                f"model {spec.id!r}: give its {missing} in the fleet file (neither "
                f"{genai_prices_source()} nor {table.source} lists {spec.upstream_model!r}; "
                f"that table knows: {', '.join(sorted(table.models))})"
            )
        return ModelCard(
            id=spec.id,
            tier=spec.tier,
            params=spec.params,
            context=context,
            runs="api",
            where=spec.base_url,
            price=price,
            capabilities=frozenset({"stream", "logprobs", "json_schema"}),
            measured=measured,
            price_source=listed.source if listed and spec.price is None else None,
        )

    # -- measurements (written by `shoal models bench`) ----------------------------------------

    def _read_measurements(self) -> dict[str, Measured]:
        path = self.cache_dir / MEASUREMENTS_FILE
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return {k: Measured.model_validate(v) for k, v in raw.items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable measurements in %s: %s", path, exc)
            return {}

    def record_measurement(self, model_id: str, measured: Measured) -> None:
        self.spec(model_id)
        path = self.cache_dir / MEASUREMENTS_FILE
        current = self._read_measurements()
        current[model_id] = measured
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps({k: v.model_dump() for k, v in current.items()}, indent=2), "utf-8"
        )
        tmp.replace(path)
        self._cards[model_id] = self._cards[model_id].model_copy(update={"measured": measured})

    # -- models ------------------------------------------------------------------------------

    def model(self, model_id: str) -> Model:
        """The model with this id, built on first use (a local model loads on its first call)."""
        spec = self.spec(model_id)
        if model_id not in self._models:
            self._models[model_id] = self._build(spec)
        return self._models[model_id]

    def placement(self, model_id: str) -> RayPlacement | None:
        """How a local model runs on Ray (`backend: ray`, its own or the fleet's), or None when
        it runs in this process."""
        spec = self.spec(model_id)
        if not isinstance(spec, GGUFModelSpec):
            return None
        if (spec.backend or self.settings.backend) != "ray":
            return None
        return spec.ray or self.settings.ray

    def gguf_path(self, model_id: str) -> Path:
        """The verified GGUF file of a local model (joining packaged chunks when needed)."""
        spec = self.spec(model_id)
        if not isinstance(spec, GGUFModelSpec):
            raise ConfigError(f"model {model_id!r} is not a local GGUF model")
        if spec.packaged is not None:
            return spec.packaged.resolve(self.cache_dir / "weights")
        assert spec.path is not None
        path = spec.path.expanduser()
        if not path.is_file():
            raise ModelNotInstalledError(f"model {model_id!r}: GGUF file {path} does not exist")
        return path

    def embedder(self) -> Embedder:
        """The sentence embedder specialists read their inputs with (MiniLM, loaded once). One
        thread: a 22M model gains little from a second, and llama.cpp's second thread spins
        and stalls whenever another process holds a core (a query then takes a second, not
        10 ms)."""
        with self._embedder_lock:
            if self._embedder is None:
                from shoal.models.embedder import minilm

                self._embedder = minilm(self.cache_dir, threads=1)
            return self._embedder

    def _build(self, spec: ModelSpec) -> Model:
        card = self._cards[spec.id]
        if isinstance(spec, SpecialistModelSpec):
            from shoal.specialists.model import Specialist

            return Specialist(card, spec.path.expanduser(), self.embedder, max_queue=spec.max_queue)
        if isinstance(spec, OpenAIModelSpec):
            from shoal.models.openai_compat import OpenAICompatModel

            return OpenAICompatModel(
                card,
                base_url=spec.base_url,
                upstream_model=spec.upstream_model,
                api_key_env=spec.api_key_env,
                timeout_s=spec.timeout_s,
                max_concurrency=spec.max_concurrency,
                max_queue=spec.max_queue,
                schema_style=spec.json_schema_style,
            )
        placement = self.placement(spec.id)
        if placement is not None:  # a Ray Serve deployment, deployed on first use
            from shoal.backends.ray_model import Deployment, RayModel

            return RayModel(
                Deployment(
                    card,
                    self.gguf_path(spec.id),
                    placement,
                    threads=spec.threads,
                    batch=spec.batch,
                    max_queue=spec.max_queue,
                )
            )
        from shoal.models.llamacpp import LlamaCppModel

        return LlamaCppModel(
            card,
            path=self.gguf_path(spec.id),
            threads=spec.threads,
            batch=spec.batch,
            max_queue=spec.max_queue,
        )

    async def aclose(self) -> None:
        for model in self._models.values():
            await model.aclose()
        self._models.clear()
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None
