"""Routing benchmarks: one command per table, JSON to stdout and bench/out/, a PNG per table.

    python bench/routing.py mmlu       # RouteLLM MMLU: GPT-4 vs Mixtral
    python bench/routing.py mt-bench   # RouteLLM MT-Bench: GPT-4 vs Mixtral, judged 1-10
    python bench/routing.py arc        # RouterBench ARC-Challenge, 11 models
    python bench/routing.py mbpp       # RouterBench MBPP, 11 models
    python bench/routing.py local      # the local fleet's own outcome table (shoal outcomes build)
    python bench/routing.py all        # every table above that exists
    python bench/routing.py decision   # decision time: embedding + policy, and the scorer

Every table runs the same experiment (`shoal.routing.experiment`, what `shoal route eval`
runs): 5 splits (the table's own first, where it has one), train and test queries disjoint;
every route calibrated to ≥ 95% of the best model's quality on the train split only (with a
margin of one standard error) and reported on the test split ("calibrated"), next to the best
setting seen on the test split ("frontier", as RouteLLM and RouterBench report). Costs are
fractions of the best single model's mean cost on the test split. Definitions: DESIGN.md
"Measuring" and shoal/routing/evaluate.py.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # threaded BLAS crawls on busy shared cores

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from shoal.routing import evaluate as ev
from shoal.routing.calibrate import Target
from shoal.routing.experiment import Experiment, split_indices, summarise
from shoal.routing.importers import routellm_mmlu, routellm_mt_bench, routerbench
from shoal.routing.outcomes import OutcomeTable, read_table
from shoal.routing.predictive import Featurizer, minilm_featurizer
from shoal.settings import default_cache_dir

log = logging.getLogger("bench.routing")
OUT = Path(__file__).resolve().parent / "out"
SEEDS = (0, 1, 2, 3, 4)
QUERY_ONLY = ["logistic", "knn", "cluster"]
WITH_ANSWERS = [*QUERY_ONLY, "cascade", "logistic+cascade", "cluster+cascade"]


def featurizer() -> Featurizer:
    return minilm_featurizer(default_cache_dir())


def _write(name: str, result: dict[str, Any]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"routing_{name}.json").write_text(json.dumps(result, indent=2, default=float), "utf-8")
    brief = {k: v for k, v in result.items() if k != "each_split"}
    print(json.dumps(brief, indent=2, default=float))


def local_table(path: str | None) -> OutcomeTable:
    return read_table(Path(path or default_cache_dir() / "outcomes" / "local.csv"))


# name -> (loader, cost mode, routes)
TABLES: dict[str, tuple[Callable[[argparse.Namespace], OutcomeTable], str, list[str]]] = {
    "mmlu": (lambda a: routellm_mmlu(), "known", QUERY_ONLY),
    "mt-bench": (lambda a: routellm_mt_bench(), "learned", WITH_ANSWERS),
    "arc": (lambda a: routerbench("arc_challenge"), "learned", WITH_ANSWERS),
    "mbpp": (lambda a: routerbench("mbpp"), "learned", WITH_ANSWERS),
    "local": (lambda a: local_table(a.outcomes), "learned", WITH_ANSWERS),
}


def run_table(name: str, args: argparse.Namespace) -> dict[str, Any]:
    loader, cost_mode, routes = TABLES[name]
    table = loader(args)
    if args.routes:
        routes = args.routes.split(",")
    if table.answers is None:
        routes = [r for r in routes if "cascade" not in r]
    feat = featurizer()
    started = time.perf_counter()
    x = feat(table.prompts)
    log.info(
        "%s: features of %d prompts in %.1f s", name, len(table), time.perf_counter() - started
    )
    rows = {p: i for i, p in enumerate(table.prompts)}
    load_before = os.getloadavg()
    summaries = {}
    for ratio in args.targets:
        exp = Experiment(
            table,
            lambda texts: x[[rows[t] for t in texts]],
            routes=routes,
            target=Target(quality_ratio=ratio),
            cost_mode=cost_mode,
            embed_answers=lambda texts: feat.embedder.embed(texts).astype(np.float64),
            confidence_z=args.z,
        )
        results = []
        for seed, train_idx, test_idx in split_indices(table, list(SEEDS[: args.seeds])):
            t0 = time.perf_counter()
            results.append(exp.run(seed, train_idx, test_idx))
            log.info(
                "%s split %d (target %.2f) in %.1f s", name, seed, ratio, time.perf_counter() - t0
            )
        summary = summarise(results, table.name)
        summaries[f"{ratio:g}"] = summary
        first = results[0]
        if ratio == args.targets[0]:
            ref = ev.Reference.of(first.test)
            marks = [
                (f"{k} calibrated", v["cost_ratio"], v["quality_ratio"] * ref.q_best)
                for k, v in first.calibrated.items()
            ]
            ev.plot(
                first.test,
                first.curves,
                OUT / f"routing_{name}.png",
                title=f"{table.name} (split {first.seed}, held-out queries)",
                marks=marks,
            )
            print(ev.format_table({"routes": first.metrics}), file=sys.stderr)
    return {
        "table": table.name,
        "queries": len(table),
        "models": table.mean_scores(),
        "costs": table.mean_costs(),
        "cost_mode": cost_mode,
        "z": args.z,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "targets": summaries,
    }


def table_decision(args: argparse.Namespace) -> None:
    """p50 decision time per query: embedding (GGUF MiniLM, uncached) + policy."""
    from shoal.cards import TokenPrice
    from shoal.messages import ChatRequest
    from shoal.models.embedder import minilm
    from shoal.models.fake import fake_card
    from shoal.routing.calibrate import calibrate_predictive as fit_route
    from shoal.routing.predictive import PredictiveRouter

    table = routellm_mmlu()
    cached = featurizer()
    n_train = 3000
    train = table.subset(np.arange(n_train))
    x_train = cached(train.prompts)
    results: dict[str, Any] = {}
    raw = Featurizer(minilm(default_cache_dir(), "gguf", threads=args.threads))
    prompts = table.prompts[n_train : n_train + args.queries]
    cards = [
        fake_card(
            "mistralai/Mixtral-8x7B-Instruct-v0.1",
            price=TokenPrice(input_per_mtok=0.6, output_per_mtok=0.6),
        ),
        fake_card("gpt-4-1106-preview", price=TokenPrice(input_per_mtok=10, output_per_mtok=30)),
    ]
    load_before = os.getloadavg()
    for kind in ("logistic", "knn", "cluster"):
        fit = fit_route(train, x_train, Target(quality_ratio=0.95), kind=kind, cost_mode="known")
        router = PredictiveRouter(
            train.models, raw, fit.predictor, lam=fit.lam, ref_cost=fit.ref_cost, cost_mode="known"
        )
        embed_t, policy_t, full_t, predict_t = [], [], [], []
        for p in prompts[:5]:
            router.choose(ChatRequest.of(p, max_tokens=1), cards, {})
        for p in prompts:
            request = ChatRequest.of(p, max_tokens=1)
            t0 = time.perf_counter()
            xq = raw([p])
            t1 = time.perf_counter()
            router.choose_from_features(xq, request, cards, {})
            t2 = time.perf_counter()
            q = fit.predictor.predict(xq)
            int(np.argmax(q[0] - fit.lam * np.array([1.0, 17.0]) / 17.0))
            t3 = time.perf_counter()
            embed_t.append(t1 - t0)
            policy_t.append(t2 - t1)
            predict_t.append(t3 - t2)
            full_t.append(t2 - t0)
        results[kind] = {
            "p50_total_ms": statistics.median(full_t) * 1e3,
            "p50_embedding_ms": statistics.median(embed_t) * 1e3,
            "p50_policy_us": statistics.median(policy_t) * 1e6,
            "p50_predict_and_pick_us": statistics.median(predict_t) * 1e6,
            "p95_total_ms": float(np.percentile(full_t, 95)) * 1e3,
        }
        log.info("%s: %s", kind, results[kind])
    lengths = [len(p) for p in prompts]
    _write(
        "decision",
        {
            "queries": len(prompts),
            "threads": args.threads,
            "prompt_chars_median": statistics.median(lengths),
            "routers": results,
            "scorer": scorer_times(cached, raw, args.queries),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
        },
    )


def scorer_times(cached: Featurizer, raw: Featurizer, n: int) -> dict[str, Any]:
    """p50 time to score one cheap answer (a cascade's work on top of the cheap call): embed
    the answer (GGUF, uncached), its features, the logistic scorer. The query's features are
    already there (the pre-route computed them)."""
    from shoal.routing.scorer import AnswerScorer, answer_features

    out: dict[str, Any] = {}
    for name, table, model in (
        ("arc (option letters)", routerbench("arc_challenge"), "mistralai/mistral-7b-chat"),
        ("mbpp (code)", routerbench("mbpp"), "mistralai/mixtral-8x7b-chat"),
    ):
        assert table.answers is not None
        j = table.model_index(model)
        answers = [row[j] or " " for row in table.answers]
        half = len(table) // 2
        xq = cached(table.prompts)
        vecs = cached.embedder.embed(answers[:half]).astype(np.float64)
        scorer = AnswerScorer().fit(
            answer_features(xq[:half], vecs, answers[:half]), table.scores[:half, j]
        )
        times = []
        for i in range(half, min(len(table), half + n)):
            t0 = time.perf_counter()
            vec = raw.embedder.embed([answers[i]]).astype(np.float64)
            scorer.predict(answer_features(xq[i : i + 1], vec, answers[i : i + 1]))
            times.append(time.perf_counter() - t0)
        out[name] = {
            "p50_ms": statistics.median(times) * 1e3,
            "p95_ms": float(np.percentile(times, 95)) * 1e3,
            "answer_chars_median": statistics.median(len(a) for a in answers[half:]),
        }
        log.info("scorer %s: %s", name, out[name])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("table", choices=[*TABLES, "all", "decision"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--routes", help="comma-separated (default: every route the table allows)")
    parser.add_argument(
        "--targets", type=lambda v: [float(t) for t in v.split(",")], default=[0.95]
    )
    parser.add_argument("--z", type=float, default=1.0, help="margin asked of the target on train")
    parser.add_argument("--outcomes", help="local table file (default: the cache dir's)")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr
    )
    if args.table == "decision":
        table_decision(args)
        return
    names = list(TABLES) if args.table == "all" else [args.table]
    for name in names:
        if (
            name == "local"
            and args.table == "all"
            and not (args.outcomes or (default_cache_dir() / "outcomes" / "local.csv").is_file())
        ):
            log.info("no local outcome table: skipped (build one with `shoal outcomes build`)")
            continue
        _write(name, run_table(name, args))


if __name__ == "__main__":
    main()
