"""A call's plan: what one call by name will run, decided once, before it runs.

`Engine.plan(name, request)` resolves a model id or a route name, lets the route decide, and
prices the call with the card's estimator (`ModelCard.worst_case_cost`, `expected_seconds`).
Every caller (the Python API, a pipeline step, the HTTP server, plain or streamed) then reserves
`worst_usd` on its ledger account and executes the plan: the decision in it is run, never made
again.
"""

from __future__ import annotations

from dataclasses import dataclass

from shoal.messages import ChatRequest, RouteDecision


@dataclass(frozen=True)
class CallPlan:
    """`name` is what was asked for (a model id or a route name); `models` the models the call
        may use, in the order it uses them (one, or a cascade); `worst_usd` the most it can cost
        (reserved before it starts) and `expected_s` how long it is expected to take. `record` names
    the target its answer is recorded under for distillation (opt-in; None records nothing)."""

    name: str
    request: ChatRequest
    models: tuple[str, ...]
    worst_usd: float
    expected_s: float
    route: str | None = None
    decision: RouteDecision | None = None
    record: str | None = None
