"""Routing benchmarks: one command per table, JSON to stdout and bench/out/, a PNG per table.

    python bench/routing.py mmlu       # RouteLLM MMLU: GPT-4 vs Mixtral, 5 random 50/50 splits
    python bench/routing.py arc        # RouterBench ARC-Challenge, 11 models, 5 resplits
    python bench/routing.py local      # the local fleet's own outcome table (shoal outcomes build)
    python bench/routing.py decision   # decision time: embedding + policy, per query

Train and test queries are always disjoint. "calibrated" figures choose the route's setting on
the training split only (what a user gets); "frontier" figures are the best setting seen on the
test split (as RouteLLM and RouterBench report). Costs are fractions of the best single model's
mean cost on the test split. Definitions: DESIGN.md "Measuring" and shoal/routing/evaluate.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from shoal.routing import evaluate as ev
from shoal.routing.calibrate import Target, calibrate_cascade, calibrate_predictive
from shoal.routing.importers import routellm_mmlu, routerbench
from shoal.routing.outcomes import OutcomeTable, read_table
from shoal.routing.predictive import Featurizer, minilm_featurizer
from shoal.settings import default_cache_dir

log = logging.getLogger("bench.routing")
OUT = Path(__file__).resolve().parent / "out"
SEEDS = (0, 1, 2, 3, 4)


def featurizer() -> Featurizer:
    return minilm_featurizer(default_cache_dir())


def features(feat: Featurizer, table: OutcomeTable) -> np.ndarray[Any, Any]:
    started = time.perf_counter()
    x = feat(table.prompts)
    log.info("features of %d prompts in %.1f s", len(table), time.perf_counter() - started)
    return x


def _median(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


def _write(name: str, result: dict[str, Any]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"routing_{name}.json").write_text(json.dumps(result, indent=2, default=float), "utf-8")
    print(json.dumps(result, indent=2, default=float))


def prune(train: OutcomeTable, slack: float = 0.02) -> list[str]:
    """Models worth routing to, judged on the training split: each one within `slack` of the
    zero router's hull at its cost (dominated models only add noise to a learned router)."""
    q = train.scores.mean(axis=0)
    c = train.costs.mean(axis=0)
    hc, hq = ev.upper_hull(c, q)
    keep = [m for j, m in enumerate(train.models) if q[j] >= np.interp(c[j], hc, hq) - slack]
    return keep


def run_predictive(
    table: OutcomeTable,
    x: np.ndarray[Any, Any],
    train_idx: np.ndarray[Any, Any],
    test_idx: np.ndarray[Any, Any],
    kinds: list[str],
    target: Target,
    cost_mode: str,
    models: list[str] | None = None,
    zs: tuple[float, ...] = (0.0,),
) -> dict[str, Any]:
    train, test = table.subset(train_idx), table.subset(test_idx)
    sub_train, sub_test = train, test
    if models is not None:
        sub_train, sub_test = train.select_models(models), test.select_models(models)
    ref = ev.Reference.of(test)
    out: dict[str, Any] = {"curves": {}, "calibrated": {}}
    for kind, z in [(k, z) for k in kinds for z in zs]:
        fit = calibrate_predictive(
            sub_train,
            x[train_idx],
            target,
            kind=kind,
            cost_mode=cost_mode,
            test=sub_test,
            x_test=x[test_idx],
            confidence_z=z,
        )
        assert fit.calibration.test_curve is not None
        assert fit.calibration.heldout is not None
        curve = fit.calibration.test_curve
        curve.label = kind
        if z == zs[0]:
            out["curves"][kind] = curve
        held = fit.calibration.heldout
        out["calibrated"][kind if z == 0 else f"{kind} z={z:g}"] = {
            "lambda": fit.lam,
            "met_on_train": fit.calibration.met,
            "quality_ratio": held.quality / ref.q_best,
            "cost_ratio": held.cost / ref.c_best,
            "best_share": held.best_share,
            "met_on_test": held.quality >= target.quality_ratio * ref.q_best
            if target.quality_ratio
            else held.met,
            "quality_ci": held.quality_ci,
        }
    return out


def table_mmlu(args: argparse.Namespace) -> None:
    table = routellm_mmlu()
    feat = featurizer()
    x = features(feat, table)
    kinds = args.kinds.split(",")
    target = Target(quality_ratio=0.95)
    runs = []
    for seed in SEEDS[: args.seeds]:
        order = np.random.default_rng(seed).permutation(len(table))
        half = len(table) // 2
        train_idx, test_idx = np.sort(order[:half]), np.sort(order[half:])
        res = run_predictive(table, x, train_idx, test_idx, kinds, target, "known", zs=(0.0, 1.0))
        test = table.subset(test_idx)
        result = ev.evaluate(test, list(res["curves"].values()))
        runs.append({"seed": seed, "metrics": result["routes"], "calibrated": res["calibrated"]})
        log.info("seed %d: %s", seed, json.dumps(res["calibrated"], default=float))
        if seed == 0:
            marks = [
                (
                    f"{k} calibrated",
                    v["cost_ratio"],
                    v["quality_ratio"] * ev.Reference.of(test).q_best,
                )
                for k, v in res["calibrated"].items()
            ]
            ev.plot(
                test,
                list(res["curves"].values()),
                OUT / "routing_mmlu.png",
                title="RouteLLM MMLU (test half, seed 0): GPT-4 vs Mixtral",
                marks=marks,
            )
            print(ev.format_table(result), file=sys.stderr)
    names = [n for k in kinds for n in (k, f"{k} z=1")]
    _write("mmlu", summarise(runs, names, "RouteLLM MMLU, GPT-4-1106 vs Mixtral-8x7B"))


def summarise(runs: list[dict[str, Any]], kinds: list[str], title: str) -> dict[str, Any]:
    names = list(runs[0]["metrics"])
    summary: dict[str, Any] = {
        "table": title,
        "splits": len(runs),
        "frontier": {},
        "calibrated": {},
    }
    for name in names:
        summary["frontier"][name] = {
            key: _median([r["metrics"][name][key] for r in runs])
            for key in runs[0]["metrics"][name]
        }
    for kind in kinds:
        cal = [r["calibrated"][kind] for r in runs]
        summary["calibrated"][kind] = {
            "cost_ratio_median": _median([c["cost_ratio"] for c in cal]),
            "cost_ratio_each": [round(c["cost_ratio"], 4) for c in cal],
            "quality_ratio_each": [round(c["quality_ratio"], 4) for c in cal],
            "met_on_test": sum(bool(c["met_on_test"]) for c in cal),
            "best_share_median": _median([c["best_share"] for c in cal]),
        }
    summary["runs"] = runs
    return summary


def table_arc(args: argparse.Namespace) -> None:
    table = routerbench("arc_challenge")
    feat = featurizer()
    x = features(feat, table)
    kinds = args.kinds.split(",")
    runs = []
    for seed in SEEDS[: args.seeds]:
        if seed == 0:  # RouterDC's own split first
            train_idx = np.array([i for i, s in enumerate(table.splits) if s == "train"])
            test_idx = np.array([i for i, s in enumerate(table.splits) if s == "test"])
        else:
            order = np.random.default_rng(seed).permutation(len(table))
            cut = len(train_idx)
            train_idx, test_idx = np.sort(order[:cut]), np.sort(order[cut:])
        train, test = table.subset(train_idx), table.subset(test_idx)
        keep = prune(train)
        gpt4 = "gpt-4-1106-preview"
        target = Target(quality_ratio=1.0)
        res = run_predictive(table, x, train_idx, test_idx, kinds, target, "learned", keep)
        curves = list(res["curves"].values())
        full = run_predictive(table, x, train_idx, test_idx, ["knn", "mlp"], target, "learned")
        for k, c in full["curves"].items():
            c.label = f"{k} (all 11 models)"
            curves.append(c)
        result = ev.evaluate(test, curves)
        ref = ev.Reference.of(test)
        runs.append(
            {
                "seed": seed,
                "kept": keep,
                "metrics": result["routes"],
                "calibrated": res["calibrated"],
                "gpt4": ref.q_best,
            }
        )
        log.info("split %d kept %s: %s", seed, keep, json.dumps(res["calibrated"], default=float))
        if seed == 0:
            ev.plot(
                test,
                curves,
                OUT / "routing_arc.png",
                title="RouterBench ARC-Challenge (RouterDC test split)",
            )
            print(ev.format_table(result), file=sys.stderr)
        assert test.models[ref.best] == gpt4
    _write("arc", summarise(runs, kinds, "RouterBench ARC-Challenge, 11 models"))


def table_local(args: argparse.Namespace) -> None:
    path = Path(args.outcomes or default_cache_dir() / "outcomes" / "local.csv")
    table = read_table(path)
    feat = featurizer()
    x = features(feat, table)
    kinds = args.kinds.split(",")
    large = "qwen2.5-coder-1.5b"
    order_ids = ["smollm2-135m", "qwen2.5-coder-0.5b", large]
    target = Target(quality_ratio=0.95)
    runs = []
    for seed in SEEDS[: args.seeds]:
        order = np.random.default_rng(seed).permutation(len(table))
        half = len(table) // 2
        train_idx, test_idx = np.sort(order[:half]), np.sort(order[half:])
        train, test = table.subset(train_idx), table.subset(test_idx)
        res = run_predictive(table, x, train_idx, test_idx, kinds, target, "learned")
        curves = list(res["curves"].values())
        cascade_order = [table.models.index(m) for m in order_ids]
        calibrated = dict(res["calibrated"])
        if table.confidence is not None:
            curves.append(ev.cascade_curve(test, cascade_order, "logprob cascade"))
            scored_train, scored_test = scorer_confidence(train, test, x[train_idx], x[test_idx])
            curves.append(ev.cascade_curve(scored_test, cascade_order, "scorer cascade"))
            cal_s = calibrate_cascade(scored_train, cascade_order, target, test=scored_test)
            assert cal_s.heldout is not None
            ref = ev.Reference.of(test)
            calibrated["scorer cascade"] = {
                "threshold": cal_s.setting,
                "met_on_train": cal_s.met,
                "quality_ratio": cal_s.heldout.quality / ref.q_best,
                "cost_ratio": cal_s.heldout.cost / ref.c_best,
                "best_share": cal_s.heldout.best_share,
                "met_on_test": cal_s.heldout.quality >= 0.95 * ref.q_best,
                "quality_ci": cal_s.heldout.quality_ci,
            }
            cal = calibrate_cascade(train, cascade_order, target, test=test)
            assert cal.heldout is not None
            ref = ev.Reference.of(test)
            calibrated["logprob cascade"] = {
                "threshold": cal.setting,
                "met_on_train": cal.met,
                "quality_ratio": cal.heldout.quality / ref.q_best,
                "cost_ratio": cal.heldout.cost / ref.c_best,
                "best_share": cal.heldout.best_share,
                "met_on_test": cal.heldout.quality >= 0.95 * ref.q_best,
                "quality_ci": cal.heldout.quality_ci,
            }
        result = ev.evaluate(test, curves)
        runs.append(
            {
                "seed": seed,
                "metrics": result["routes"],
                "calibrated": calibrated,
                "models": result["models"],
            }
        )
        if seed == 0:
            ev.plot(
                test,
                curves,
                OUT / "routing_local.png",
                title=f"Local fleet, {len(table)} questions (test half, seed 0)",
            )
            print(ev.format_table(result), file=sys.stderr)
    names = kinds + (["logprob cascade", "scorer cascade"] if table.confidence is not None else [])
    summary = summarise(runs, names, f"Local fleet ({len(table)} questions)")
    summary["per_dataset"] = {
        g: {
            m: float(table.scores[[i for i, gg in enumerate(table.groups) if gg == g], j].mean())
            for j, m in enumerate(table.models)
        }
        for g in sorted(set(table.groups))
    }
    _write("local", summary)


def scorer_confidence(
    train: OutcomeTable,
    test: OutcomeTable,
    x_train: np.ndarray[Any, Any],
    x_test: np.ndarray[Any, Any],
) -> tuple[OutcomeTable, OutcomeTable]:
    """The tables with `confidence` replaced by a learned P(correct | query, answer confidence):
    one logistic regression per model on [query features, token confidence]. Train-split
    confidences are out-of-fold, so that thresholds calibrate on honest figures."""
    from copy import copy

    from shoal.routing.predictive import fit_logistic

    assert train.confidence is not None
    assert test.confidence is not None

    def feats(x: np.ndarray[Any, Any], conf: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        return np.hstack([x, 4 * conf[:, None], 4 * conf[:, None] ** 2])

    p_train = np.zeros_like(train.confidence)
    p_test = np.zeros_like(test.confidence)
    folds = np.arange(len(train)) % 5
    for j in range(len(train.models)):
        y = train.scores[:, j : j + 1]
        for k in range(5):
            w, b = fit_logistic(
                feats(x_train[folds != k], train.confidence[folds != k, j]), y[folds != k], l2=10.0
            )
            z = feats(x_train[folds == k], train.confidence[folds == k, j]) @ w + b
            p_train[folds == k, j] = 1 / (1 + np.exp(-z[:, 0]))
        w, b = fit_logistic(feats(x_train, train.confidence[:, j]), y, l2=10.0)
        p_test[:, j] = 1 / (1 + np.exp(-(feats(x_test, test.confidence[:, j]) @ w + b)[:, 0]))
    scored_train, scored_test = copy(train), copy(test)
    scored_train.confidence, scored_test.confidence = p_train, p_test
    return scored_train, scored_test


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
    for kind in ("logistic", "knn", "mlp"):
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
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("table", choices=["mmlu", "arc", "local", "decision"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--kinds", default="knn,logistic,mlp,ensemble")
    parser.add_argument("--outcomes", help="local table file (default: the cache dir's)")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr
    )
    {"mmlu": table_mmlu, "arc": table_arc, "local": table_local, "decision": table_decision}[
        args.table
    ](args)


if __name__ == "__main__":
    main()
