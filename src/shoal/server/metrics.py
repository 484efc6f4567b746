"""Prometheus metrics in the text exposition format, kept in plain dicts (an increment is a dict
update; rendering walks them once per scrape).

    shoal_requests_total{name,route,model,status}      completion requests, by outcome
    shoal_tokens_total{route,model,kind}                prompt and completion tokens
    shoal_cost_usd_total{route,model}                   cost of answered calls
    shoal_request_latency_seconds{name,route}           histogram, request to last byte
    shoal_route_decisions_total{route,model,target_met} what each route chose
    shoal_requests_in_flight                            completions being answered now
    shoal_http_errors_total{status,code}                every error answer, before or after a call
    shoal_key_overrun_usd_total                         cost past what calls held (charged)

`name` is what the client asked for (a model id or a route name), `route` the route ("" for a
direct model call), `model` the model that answered ("" when none did).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

LATENCY_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5)
LATENCY_BUCKETS += (1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    return ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, value)] += 1
        self.total += value


class Metrics:
    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, str, str, str], int] = defaultdict(int)
        self.tokens: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.cost: defaultdict[tuple[str, str], float] = defaultdict(float)
        self.latency: dict[tuple[str, str], Histogram] = {}
        self.decisions: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self.errors: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.in_flight = 0
        self.overrun_usd = 0.0

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
        route = route or ""
        model = model or ""
        self.requests[(name, route, model, status)] += 1
        if input_tokens or output_tokens:
            self.tokens[(route, model, "input")] += input_tokens
            self.tokens[(route, model, "output")] += output_tokens
        if cost_usd:
            self.cost[(route, model)] += cost_usd
        histogram = self.latency.get((name, route))
        if histogram is None:
            histogram = self.latency[(name, route)] = Histogram()
        histogram.observe(latency_s)

    def error(self, *, status: int, code: str) -> None:
        self.errors[(str(status), code)] += 1

    def decision(self, *, route: str, model: str, target_met: bool) -> None:
        self.decisions[(route, model, "true" if target_met else "false")] += 1

    def render(self) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, text: str) -> None:
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")

        def samples(name: str, label_names: tuple[str, ...], items: Iterable[Any]) -> None:
            for values, number in items:
                lines.append(f"{name}{{{_labels(label_names, values)}}} {number!r}")

        family("shoal_requests_total", "counter", "Completion requests, by outcome.")
        samples("shoal_requests_total", ("name", "route", "model", "status"), self.requests.items())
        family("shoal_tokens_total", "counter", "Prompt and completion tokens.")
        samples("shoal_tokens_total", ("route", "model", "kind"), self.tokens.items())
        family("shoal_cost_usd_total", "counter", "Cost of answered calls, USD.")
        samples("shoal_cost_usd_total", ("route", "model"), self.cost.items())
        family("shoal_request_latency_seconds", "histogram", "Completion latency, request to end.")
        for (name, route), histogram in self.latency.items():
            labels = _labels(("name", "route"), (name, route))
            cumulative = 0
            for bound, count in zip(LATENCY_BUCKETS, histogram.counts, strict=False):
                cumulative += count
                lines.append(
                    f'shoal_request_latency_seconds_bucket{{{labels},le="{bound!r}"}} {cumulative}'
                )
            cumulative += histogram.counts[-1]
            lines.append(f'shoal_request_latency_seconds_bucket{{{labels},le="+Inf"}} {cumulative}')
            lines.append(f"shoal_request_latency_seconds_sum{{{labels}}} {histogram.total!r}")
            lines.append(f"shoal_request_latency_seconds_count{{{labels}}} {cumulative}")
        family("shoal_route_decisions_total", "counter", "Models chosen by each route.")
        samples(
            "shoal_route_decisions_total", ("route", "model", "target_met"), self.decisions.items()
        )
        family("shoal_http_errors_total", "counter", "Error answers, by status and code.")
        samples("shoal_http_errors_total", ("status", "code"), self.errors.items())
        family("shoal_requests_in_flight", "gauge", "Completions being answered now.")
        lines.append(f"shoal_requests_in_flight {self.in_flight}")
        family("shoal_key_overrun_usd_total", "counter", "Cost past what calls held, charged.")
        lines.append(f"shoal_key_overrun_usd_total {self.overrun_usd!r}")
        return "\n".join(lines) + "\n"
