"""Prometheus metrics, kept by `prometheus_client` in a registry of the app's own (several apps
coexist in one process; nothing is registered at module level):

    shoal_requests_total{name,route,model,status}      completion requests, by outcome
    shoal_tokens_total{route,model,kind}                prompt and completion tokens
    shoal_cost_usd_total{route,model}                   cost of answered calls
    shoal_request_latency_seconds{name,route}           histogram, request to last byte
    shoal_route_decisions_total{route,model,target_met} what each route chose
    shoal_requests_in_flight                            completions being answered now
    shoal_http_errors_total{status,code}                every error answer, before or after a call
    shoal_key_overrun_usd_total                         cost past what calls held (charged)
    shoal_grammar_cache_entries, _schema_bytes          compiled JSON grammars kept (bounded)
    shoal_grammar_cache_evictions_total                 grammars dropped to keep the bound
    shoal_specialist_serving{route,specialist}          1 while a specialist route uses it
    shoal_specialist_live_agreement{route,specialist}   its recent drift checks' agreement
    shoal_specialist_drift_checks_total{route,specialist,result}   agreed | disagreed
    shoal_specialist_switched_off_total{route,specialist}   times its drift guard stopped it
    process_*                                           the server process: CPU, memory, files

`name` is what the client asked for (a model id or a route name), `route` the route ("" for a
direct model call), `model` the model that answered ("" when none did).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder, generate_latest
from prometheus_client.registry import Collector

from shoal.models.llamacpp import grammar_cache_stats
from shoal.routing.specialist import SpecialistRoute

LATENCY_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5)
LATENCY_BUCKETS += (1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Overrun(Collector):
    """`shoal_key_overrun_usd_total`, read from the figure the server last set at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "shoal_key_overrun_usd",
            "Cost past what calls held, charged.",
            value=self.metrics.overrun_usd,
        )


class _Grammars(Collector):
    """The compiled-grammar caches of the local models in this process, read at scrape time."""

    def collect(self) -> Iterator[Metric]:
        entries, size, evictions = grammar_cache_stats()
        yield GaugeMetricFamily(
            "shoal_grammar_cache_entries", "Compiled JSON grammars kept.", value=entries
        )
        yield GaugeMetricFamily(
            "shoal_grammar_cache_schema_bytes",
            "Bytes of JSON schema behind the grammars kept (the cache's bound).",
            value=size,
        )
        yield CounterMetricFamily(
            "shoal_grammar_cache_evictions",
            "Grammars dropped, least recently used first, to keep the cache bounded.",
            value=evictions,
        )


class _Specialists(Collector):
    """The drift guards of the engine's specialist routes, read at scrape time."""

    def __init__(self, routes: Callable[[], list[object]]) -> None:
        self.routes = routes

    def collect(self) -> Iterator[Metric]:
        labels = ["route", "specialist"]
        serving = GaugeMetricFamily(
            "shoal_specialist_serving",
            "1 while a specialist route uses its specialist.",
            labels=labels,
        )
        live = GaugeMetricFamily(
            "shoal_specialist_live_agreement",
            "Share of a specialist's recent drift checks that agreed with its teacher.",
            labels=labels,
        )
        checks = CounterMetricFamily(
            "shoal_specialist_drift_checks",
            "Specialist answers also asked of the teacher, by result.",
            labels=[*labels, "result"],
        )
        off = CounterMetricFamily(
            "shoal_specialist_switched_off",
            "Times a drift guard switched its specialist off.",
            labels=labels,
        )
        for route in self.routes():
            if not isinstance(route, SpecialistRoute):
                continue
            guard = route.guard
            names = [guard.route, guard.specialist.id]
            counts = guard.counts
            serving.add_metric(names, 0.0 if guard.switched else 1.0)
            if guard.recent:
                live.add_metric(names, sum(guard.recent) / len(guard.recent))
            checks.add_metric([*names, "agreed"], counts.agreed)
            checks.add_metric([*names, "disagreed"], counts.checks - counts.agreed)
            off.add_metric(names, 1.0 if guard.switched else 0.0)
        yield from (serving, live, checks, off)


class _Series(NamedTuple):
    """The labelled series one kind of request updates."""

    requests: Counter
    input_tokens: Counter
    output_tokens: Counter
    cost: Counter
    latency: Histogram


class Metrics:
    """The server's metrics. `request`, `decision` and `error` count; `in_flight` and
    `overrun_usd` are figures the server sets; `render` and `exposition` write them out."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._requests = Counter(
            "shoal_requests",
            "Completion requests, by outcome.",
            ("name", "route", "model", "status"),
            registry=r,
        )
        self._tokens = Counter(
            "shoal_tokens", "Prompt and completion tokens.", ("route", "model", "kind"), registry=r
        )
        self._cost = Counter(
            "shoal_cost_usd", "Cost of answered calls, USD.", ("route", "model"), registry=r
        )
        self._latency = Histogram(
            "shoal_request_latency_seconds",
            "Completion latency, request to end.",
            ("name", "route"),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._decisions = Counter(
            "shoal_route_decisions",
            "Models chosen by each route.",
            ("route", "model", "target_met"),
            registry=r,
        )
        self._errors = Counter(
            "shoal_http_errors",
            "Error answers, by status and code.",
            ("status", "code"),
            registry=r,
        )
        self._series: dict[tuple[str, str, str, str], _Series] = {}
        self.in_flight = 0
        Gauge(
            "shoal_requests_in_flight", "Completions being answered now.", registry=r
        ).set_function(lambda: self.in_flight)
        self.overrun_usd = 0.0
        r.register(_Overrun(self))
        r.register(_Grammars())
        ProcessCollector(registry=r)

    def request(
        self,
        *,
        name: str,
        route: str | None,
        model: str | None,
        status: str,
        latency_s: float,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cost_usd: float = 0.0,
    ) -> None:
        key = (name, route or "", model or "", status)
        series = self._series.get(key)
        if series is None:  # `labels` costs microseconds: look each set up once
            _, route, model, _ = key
            series = self._series[key] = _Series(
                self._requests.labels(*key),
                self._tokens.labels(route, model, "input"),
                self._tokens.labels(route, model, "output"),
                self._cost.labels(route, model),
                self._latency.labels(name, route),
            )
        series.requests.inc()
        if input_tokens or output_tokens:
            series.input_tokens.inc(input_tokens)
            series.output_tokens.inc(output_tokens)
        if cost_usd:
            series.cost.inc(cost_usd)
        series.latency.observe(latency_s)

    def watch_routes(self, routes: Callable[[], list[object]]) -> None:
        """Report the drift guards of the specialist routes among `routes()` (read at scrape
        time)."""
        self.registry.register(_Specialists(routes))

    def error(self, *, status: int, code: str) -> None:
        self._errors.labels(str(status), code).inc()

    def decision(self, *, route: str, model: str, target_met: bool) -> None:
        self._decisions.labels(route, model, "true" if target_met else "false").inc()

    def sample(self, metric: str, /, **labels: str) -> float:
        """One sample's value (0 when it was never counted):
        `sample("shoal_requests_total", name="x", route="", model="", status="ok")`."""
        return self.registry.get_sample_value(metric, labels) or 0.0

    def render(self) -> str:
        """The Prometheus text format (version 0.0.4)."""
        return generate_latest(self.registry).decode("utf-8")

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The body and content type a scraper's `Accept` header asks for (Prometheus text by
        default, OpenMetrics when asked)."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type
