"""Specialists distilled from Qwen-1.5B's answers on SST-2 and BoolQ: coverage, accuracy,
agreement and cost against always asking the teacher.

    python bench/distil.py [--table bench/out/distil/teacher-qwen1.5b.csv] [--splits 5]

The teacher's answers come from an outcome table (`shoal outcomes build --dataset sst2 --dataset
boolq --model qwen2.5-coder-1.5b`); gold answers from the shared data. For each data set and
random split, a classifier (MiniLM GGUF vectors, a logistic or MLP head) is trained on the
teacher's answers to at least `--train` inputs and checked on the disjoint rest, twice: calibrated
for agreement with the teacher >= 95%, and for accuracy on gold >= 95% of the teacher's (the
specialist route's cost at >= 95% of always-teacher quality). The threshold is chosen on the
training inputs only (out-of-fold); every figure is on the held-out slice. Medians over splits.

The specialist's cost per call is measured as it is served (`Specialist.generate`: one input
embedded by the MiniLM GGUF on one thread, then the head), times the host price; the teacher's
is what its calls cost in the table. JSON to stdout and bench/out/distil/results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from shoal.cards import DEFAULT_HOST_PRICE_PER_HOUR
from shoal.errors import TargetNotReachedError
from shoal.fleet import Fleet
from shoal.messages import ChatRequest
from shoal.models.embedder import EmbeddingCache, minilm
from shoal.routing import datasets
from shoal.routing.outcomes import read_rows
from shoal.settings import FleetSettings, SpecialistModelSpec, default_cache_dir
from shoal.specialists.calibrate import Target
from shoal.specialists.forms import Form
from shoal.specialists.model import Specialist, write
from shoal.specialists.train import Distilled, Example, distil

log = logging.getLogger("bench.distil")
OUT = Path(__file__).resolve().parent / "out" / "distil"
TEACHER = "qwen2.5-coder-1.5b"
TARGETS = {"agreement": Target(agreement=0.95), "quality": Target(quality_ratio=0.95)}
TIMED = 40  # held-out inputs answered one by one through the served path, per data set


def examples(table: Path, dataset: str) -> list[Example]:
    gold = {item.query_id: item.gold for item in datasets.load(dataset)}
    rows = [r for r in read_rows(table) if r.model == TEACHER and r.group == dataset]
    return [
        Example(r.prompt, r.answer, gold=gold.get(r.query_id), teacher_cost_usd=r.cost_usd)
        for r in rows
    ]


def _median(values: list[Any]) -> float | None:
    got = [float(v) for v in values if v is not None]
    return statistics.median(got) if got else None


def served_cost(distilled: Distilled, cache: Path, inputs: list[str]) -> dict[str, float]:
    """Seconds and dollars per call of the specialist as served, one input at a time."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.npz"
        fleet = Fleet(FleetSettings(cache_dir=cache))
        write(path, distilled, target="bench", teacher=TEACHER, embedder=fleet.embedder().identity)
        spec = SpecialistModelSpec(kind="specialist", id="bench-clf", path=path)
        fleet = Fleet(FleetSettings(cache_dir=cache, models=(spec,)))
        model = fleet.model("bench-clf")
        assert isinstance(model, Specialist)

        async def run() -> list[tuple[float, float]]:
            await model.load()
            out = []
            for text in inputs:
                response = await model.generate(ChatRequest.of(text, max_tokens=3))
                out.append((response.compute_s, response.cost_usd))
            await fleet.aclose()
            return out

        timed = asyncio.run(run())
    return {
        "seconds_per_call": statistics.median(s for s, _ in timed),
        "usd_per_call": statistics.median(c for _, c in timed),
    }


def one(
    rows: list[Example], embedder: Any, *, head: str, target: str, seed: int, train: int
) -> dict[str, Any]:
    holdout = 1.0 - train / len(rows)
    started = time.perf_counter()
    try:
        distilled = distil(
            rows,
            Form.label(),
            embedder,
            target=TARGETS[target],
            head=head,  # type: ignore[arg-type]
            holdout=holdout,
            seed=seed,
        )
        report, met = distilled.report, True
    except TargetNotReachedError as exc:
        distilled, report, met = None, dict(exc.report), False
    held = report["heldout"]
    teacher_usd = report["costs"]["teacher_usd_per_call"]
    return {
        "seed": seed,
        "met": met,
        "train": report["train"],
        "test": report["heldout_examples"],
        "unparsed": report["unparsed"],
        "threshold": report["threshold"],
        "coverage": held["coverage"] if met else 0.0,
        "coverage_possible": held["coverage_possible"],
        "agreement_all": held.get("agreement_all"),
        "agreement_answered": held.get("agreement_answered"),
        "route_agreement": held.get("route_agreement") if met else 1.0,
        "accuracy_all": held.get("accuracy_all"),
        "accuracy_answered": held.get("accuracy_answered"),
        "route_accuracy": held.get("route_accuracy") if met else held.get("teacher_accuracy"),
        "teacher_accuracy": held.get("teacher_accuracy"),
        "teacher_usd_per_call": teacher_usd,
        "fit_s": time.perf_counter() - started,
        "distilled": distilled,
    }


def summarise(runs: list[dict[str, Any]], cost: dict[str, float]) -> dict[str, Any]:
    keys = [k for k in runs[0] if k not in ("seed", "distilled", "met")]
    out: dict[str, Any] = {k: _median([r[k] for r in runs]) for k in keys}
    out["met_on_heldout"] = sum(r["met"] for r in runs)
    out["splits"] = len(runs)
    teacher = out["teacher_usd_per_call"]
    own = cost["usd_per_call"]
    out["cost_ratio"] = own / teacher if teacher else None
    coverage = [r["coverage"] for r in runs]
    route = [(own + (1 - c) * teacher) / teacher for c in coverage] if teacher else []
    out["route_cost_ratio"] = _median(route)
    possible = [r["coverage_possible"] for r in runs]
    out["frontier_route_cost_ratio"] = (
        _median([(own + (1 - c) * teacher) / teacher for c in possible]) if teacher else None
    )
    quality = [
        r["route_accuracy"] / r["teacher_accuracy"]
        for r in runs
        if r["route_accuracy"] is not None and r["teacher_accuracy"]
    ]
    out["route_quality_ratio"] = _median(quality)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, default=OUT / "teacher-qwen1.5b.csv")
    parser.add_argument("--datasets", nargs="+", default=["sst2", "boolq"])
    parser.add_argument("--splits", type=int, default=5)
    parser.add_argument("--train", type=int, default=600, help="at most (and at least 500)")
    parser.add_argument("--test", type=int, default=200, help="at least, held out")
    parser.add_argument("--heads", nargs="+", default=["logistic", "mlp"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cache = default_cache_dir()
    embedder = EmbeddingCache(minilm(cache, threads=1), cache / "embeddings.sqlite")
    result: dict[str, Any] = {
        "teacher": TEACHER,
        "table": str(args.table),
        "host_price_per_hour": DEFAULT_HOST_PRICE_PER_HOUR,
        "load_average": os.getloadavg(),
        "datasets": {},
    }
    for dataset in args.datasets:
        rows = examples(args.table, dataset)
        train = min(args.train, len(rows) - args.test)
        log.info("%s: %d teacher answers, training on %d per split", dataset, len(rows), train)
        embedder.embed([r.input for r in rows])  # once, into the cache
        per: dict[str, Any] = {"answers": len(rows), "train": train}
        for head in args.heads:
            # What a call costs does not depend on the threshold: measured once per head, on a
            # specialist calibrated to a target any head reaches.
            any_target = distil(
                rows,
                Form.label(),
                embedder,
                target=Target(agreement=0.01),
                head=head,  # type: ignore[arg-type]
            )
            cost = served_cost(any_target, cache, [r.input for r in rows[-TIMED:]])
            per[f"{head}/served"] = cost
            for target in TARGETS:
                runs = [
                    one(rows, embedder, head=head, target=target, seed=s, train=train)
                    for s in range(args.splits)
                ]
                per[f"{head}/{target}"] = summarise(runs, cost)
                log.info("%s %s/%s: %s", dataset, head, target, per[f"{head}/{target}"])
        result["datasets"][dataset] = per
    result["load_average_after"] = os.getloadavg()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(result, indent=2, default=float), "utf-8")
    print(json.dumps(result, indent=2, default=float))


if __name__ == "__main__":
    main()
