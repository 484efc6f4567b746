"""Decision time per routed call: how often a route decides, and what deciding costs, per call.

A pipeline step and a direct call go through a predictive route whose router embeds the query
with MiniLM (the real embedder, GGUF when converted by `shoal route setup`), over answer-free
models (fakes that answer at once), so the figures are the routing layer's own. The router is
wrapped to count its `choose` calls and time them.

    decisions_per_call     `choose` calls per model call (1 is the floor)
    decision_ms_per_call   median wall time spent deciding, per model call
    call_ms                median wall time of the whole call (plan, run, charge, trace)

Prints one JSON object. Run it on two checkouts to compare (the script only uses the public
`Engine`, `Runner` and `RoutedModel` API):

    python bench/decisions.py --calls 40
    PYTHONPATH=/path/to/other/checkout/src python bench/decisions.py --calls 40
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from shoal import ChatRequest, Fleet, FunctionModel, TokenPrice
from shoal.cards import ModelCard
from shoal.engine import Engine
from shoal.messages import ChatResponse, RouteDecision
from shoal.pipeline.graph import ModelStep, Pipeline
from shoal.pipeline.run import Runner
from shoal.routing.base import RoutedModel, Router, RouteStats
from shoal.routing.predictive import KNNPredictor, PredictiveRouter, minilm_featurizer

PRICE = {"cheap": TokenPrice(input_per_mtok=0.1, output_per_mtok=0.4)}
PRICE["strong"] = TokenPrice(input_per_mtok=2.5, output_per_mtok=10.0)
QUESTIONS = [
    "What is 17 + 25?",
    "Who wrote the novel Middlemarch?",
    "Is a 2-bedroom flat enough for three guests?",
    "Summarise the plot of Hamlet in one sentence.",
    "Which is larger, 3/7 or 4/9?",
    "Name the capital of Australia.",
]


class Timed(Router):
    """Counts and times the decisions of the router it wraps."""

    def __init__(self, inner: Router) -> None:
        self.inner = inner
        self.choices = 0
        self.seconds = 0.0
        self.blocking = getattr(inner, "blocking", False)

    def choose(
        self, request: ChatRequest, candidates: Sequence[ModelCard], stats: RouteStats
    ) -> RouteDecision:
        started = time.perf_counter()
        try:
            return self.inner.choose(request, candidates, stats)
        finally:
            self.seconds += time.perf_counter() - started
            self.choices += 1

    def accept(
        self, request: ChatRequest, response: ChatResponse, earlier: Sequence[ChatResponse] = ()
    ) -> tuple[bool, float]:
        return self.inner.accept(request, response, earlier)

    def rename(self, name: str) -> None:
        self.name = name
        self.inner.rename(name)


def router(cache_dir: Path) -> Timed:
    features = minilm_featurizer(cache_dir, cached=False)
    x = features(QUESTIONS * 2)
    y = np.array([[1.0, 1.0], [0.0, 1.0]] * len(QUESTIONS))
    knn = KNNPredictor(k=3, prior_weight=0.1, embed_dim=x.shape[1]).fit(x, y)
    inner = PredictiveRouter(["cheap", "strong"], features, knn, lam=0.2, cost_mode="known")
    return Timed(inner)


async def measure(calls: int, cache_dir: Path) -> dict[str, object]:
    timed = router(cache_dir)
    with tempfile.TemporaryDirectory() as tmp:
        engine = Engine(Fleet(), trace_path=Path(tmp) / "traces.sqlite")
        models = [FunctionModel(lambda r: "yes", model_id=m, price=PRICE[m]) for m in PRICE]
        engine.add_route("smart", RoutedModel("smart", timed, models))
        pipeline = Pipeline(
            "ask",
            inputs=["q"],
            steps=[ModelStep("answer", prompt="{q}", model="smart", inputs=("q",), max_tokens=16)],
            output="answer",
        )
        runner = Runner(engine, traces=engine.traces)
        figures: dict[str, object] = {}
        for path in ("pipeline_step", "engine_generate"):
            timed.choices, timed.seconds = 0, 0.0
            per_call_ms, decide_ms = [], []
            for i in range(calls):
                question = QUESTIONS[i % len(QUESTIONS)] + f" ({i})"
                before_s, before_n = timed.seconds, timed.choices
                started = time.perf_counter()
                if path == "pipeline_step":
                    result = await runner.run(pipeline, {"q": question}, budget_usd=1.0)
                    assert result.status == "ok", result.stop_reason
                else:
                    await engine.generate("smart", ChatRequest.of(question, max_tokens=16))
                per_call_ms.append((time.perf_counter() - started) * 1000)
                decide_ms.append((timed.seconds - before_s) * 1000)
                assert timed.choices > before_n
            figures[path] = {
                "decisions_per_call": timed.choices / calls,
                "decision_ms_per_call": round(statistics.median(decide_ms), 3),
                "call_ms": round(statistics.median(per_call_ms), 3),
            }
        await engine.aclose()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()
    cache_dir = Fleet().cache_dir
    figures = asyncio.run(measure(args.calls, cache_dir))
    figures["load_average_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
