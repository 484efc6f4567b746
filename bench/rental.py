"""The rental assistant, routed, against the same pipeline with every step on the large model.

    python bench/rental.py                 # 20 requests, both variants (long: minutes per request)
    python bench/rental.py --n 5 --orchestration 2

For each request three pipelines run on the local fleet (no answer cache): routed, every step
on the large model, and every step on the small model (the other end of the trade). Their
rankings are scored against the all-large one:

- NDCG@5: relevance of a listing = the score the all-large run gave it (0 if it did not rank it);
  the routed top five is discounted by rank and divided by the all-large ideal. Stricter, too:
  how often the top pick is the same, and how often the five finalists are. When the all-large
  run ranks nothing (nothing fits), a routed run that ranks nothing scores 1, else 0.
- constraints met (depends on no model): the share of each variant's top five that meet the
  request's stated hard constraints, written down by hand per request (`STATED`): the price
  within the stated maximum, bedrooms and guests at least as asked, the room type stated, each
  stated must-have in the amenities or the listing's words. Goal: routed no lower than
  all-large.
- cost: what each run's budget was charged (host price x compute time of every call, failed
  ones included); wall: the runs' wall time.
- orchestration (routed runs): the critical-path bound from traced compute times — steps in
  dependency order, and within a step the calls on one model one after another (one llama.cpp
  instance computes one call at a time) — against the run's wall time. The same requests are then
  run as a plain sequential loop of the same calls, and as one unbounded `asyncio.gather` per
  fan-out step, for their wall times.
Goals: NDCG@5 >= 0.9 at <= 40% of the all-large cost; wall <= 1.15 x the critical-path bound.
Progress goes to stderr, one JSON line per request to --log (resumable), the summary to stdout.

    python bench/rental.py --loaded --n 5 --orchestration 0 --no-all-small

`--loaded`: a busy loop holds one core for the whole run, and the routed pipeline runs under the
demo's deadline (`--deadline`, 60 s): the summary adds the share of requests answered with a
complete ranked table within the deadline (goal: 100%), beside the same quality and cost
figures against all-large (which runs with no deadline: the reference).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from shoal.engine import Engine
from shoal.fleet import Fleet
from shoal.messages import ChatRequest, Message, Usage
from shoal.pipeline.graph import ModelStep, Pipeline
from shoal.pipeline.run import Runner
from shoal.traces.store import CallRecord
from shoal_examples.rental import pipeline as rental
from shoal_examples.rental.data import Listing, load_listings
from shoal_examples.rental.quality import Stated, share_met

REQUESTS = [
    "quiet 2-bedroom near downtown under $150 with parking",
    "cheap private room for one person, wifi and a desk to work",
    "family of 5 needs a whole house with a kitchen and washer, up to $300 a night",
    "romantic weekend for two, close to downtown restaurants, a nice view would be great",
    "studio under $70 with air conditioning",
    "3 bedrooms for a group of friends, free parking, budget 250",
    "pet friendly apartment for 2 with a yard, under $130",
    "luxury place with a hot tub, money is no issue",
    "something walkable to downtown for a business trip, 1 guest, must have wifi and workspace",
    "a place for 12 people for under $40 a night",
    "quiet but in the middle of the nightlife, cheap but luxurious",
    "2 bedrooms, 2 bathrooms, kitchen, for a month-long stay, around $120",
    "accessible ground floor unit for an elderly couple, near downtown",
    "student on a tight budget, anything under $60 with wifi",
    "large group reunion, 8 guests, parking for 3 cars",
    "modern loft downtown with a washer and dryer, under $200",
    "cozy room in a house with friendly hosts and breakfast",
    "entire home with a fireplace and parking, 2 bedrooms",
    "no stairs, 1 bedroom, quiet street, under $110",
    "close to the university, 2 guests, kitchen, under $100",
]


# What each request states as hard constraints, read by a person (the truth the constraint
# figure is measured against). A must-have is the words any one of which shows it.
PARKING = ("parking", "garage")
WIFI = ("wifi", "wi-fi")
DESK = ("workspace", "desk")
KITCHEN = ("kitchen",)
STATED = {
    REQUESTS[0]: Stated(max_price=150, bedrooms=2, must_haves=(PARKING,)),
    REQUESTS[1]: Stated(guests=1, room_type="private", must_haves=(WIFI, DESK)),
    REQUESTS[2]: Stated(
        guests=5, max_price=300, room_type="entire", must_haves=(KITCHEN, ("washer", "laundry"))
    ),
    REQUESTS[3]: Stated(guests=2),
    REQUESTS[4]: Stated(max_price=70, must_haves=(("air conditioning", "central air", "a/c"),)),
    REQUESTS[5]: Stated(bedrooms=3, max_price=250, must_haves=(PARKING,)),
    REQUESTS[6]: Stated(
        guests=2,
        max_price=130,
        room_type="entire",
        must_haves=(("pets allowed", "pet friendly", "pet-friendly", "pets"), ("yard", "garden")),
    ),
    REQUESTS[7]: Stated(must_haves=(("hot tub", "jacuzzi", "whirlpool"),)),
    REQUESTS[8]: Stated(guests=1, must_haves=(WIFI, DESK)),
    REQUESTS[9]: Stated(guests=12, max_price=40),
    REQUESTS[10]: Stated(),
    REQUESTS[11]: Stated(bedrooms=2, must_haves=(KITCHEN,)),
    REQUESTS[12]: Stated(
        guests=2,
        must_haves=(
            ("ground floor", "ground-floor", "first floor", "step-free", "no stairs", "elevator"),
        ),
    ),
    REQUESTS[13]: Stated(max_price=60, must_haves=(WIFI,)),
    REQUESTS[14]: Stated(guests=8, must_haves=(PARKING,)),
    REQUESTS[15]: Stated(max_price=200, room_type="entire", must_haves=(("washer",), ("dryer",))),
    REQUESTS[16]: Stated(room_type="private", must_haves=(("breakfast",),)),
    REQUESTS[17]: Stated(room_type="entire", bedrooms=2, must_haves=(("fireplace",), PARKING)),
    REQUESTS[18]: Stated(
        bedrooms=1,
        max_price=110,
        must_haves=(("no stairs", "ground floor", "step-free", "single level", "one level"),),
    ),
    REQUESTS[19]: Stated(guests=2, max_price=100, must_haves=(KITCHEN,)),
}
VARIANTS = ("routed", "large", "small")


def constraints_met(row: dict[str, Any], listings: dict[int, Listing]) -> dict[str, float | None]:
    """Per variant, the share of its top five meeting the request's stated constraints."""
    stated = STATED[row["request"]]
    return {
        v: share_met([r["listing_id"] for r in row[v]["ranked"]], listings, stated)
        for v in VARIANTS
        if row.get(v)
    }


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.mean(known) if known else None


def ndcg5(routed: list[dict[str, Any]], large: list[dict[str, Any]]) -> float:
    if not large:
        return 1.0 if not routed else 0.0
    relevance = {r["listing_id"]: r["score"] for r in large}
    dcg = sum(
        relevance.get(r["listing_id"], 0) / math.log2(i + 2) for i, r in enumerate(routed[:5])
    )
    ideal = sorted(relevance.values(), reverse=True)[:5]
    idcg = sum(rel / math.log2(i + 2) for i, rel in enumerate(ideal))
    if idcg == 0:
        same = {r["listing_id"] for r in routed[:5]} == {r["listing_id"] for r in large[:5]}
        return 1.0 if same else 0.0
    return float(dcg / idcg)


def critical_path(pipeline: Pipeline, calls: list[CallRecord]) -> float:
    """Lower bound on wall time: steps in order, calls on one model serialised within a step."""
    per_step: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for call in calls:
        if not call.cached:  # failed calls computed too
            per_step[call.step or ""][call.model] += call.compute_s
    finish: dict[str, float] = {}
    for name in pipeline.order:
        step = pipeline.steps[name]
        start = max((finish[d] for d in step.inputs if d in finish), default=0.0)
        finish[name] = start + max(per_step[name].values(), default=0.0)
    return float(max(finish.values(), default=0.0))


def token_cost(engine: Engine, calls: list[CallRecord]) -> float:
    """The calls priced from their tokens at the cards' expected speeds: what they cost on an
    idle machine, free of the load other programs put on this one while the bench ran."""
    total = 0.0
    for call in calls:
        if call.cached or call.model not in engine.fleet.ids:
            continue
        card = engine.fleet.card(call.model)
        seconds = card.seconds_for(call.input_tokens, call.output_tokens)
        total += card.cost(
            Usage(input_tokens=call.input_tokens, output_tokens=call.output_tokens), seconds
        )
    return total


async def run(
    engine: Engine, pipeline: Pipeline, request: str, city: str, deadline_s: float | None = None
) -> dict[str, Any]:
    runner = Runner(engine, traces=engine.traces, concurrency=8)
    result = await runner.run(
        pipeline, {"request": request, "city": city}, budget_usd=1.0, deadline_s=deadline_s
    )
    calls = engine.traces.calls(result.run_id)
    return {
        "run_id": result.run_id,
        "status": result.status,
        "stop_reason": result.stop_reason,
        "cost_usd": result.cost_usd,
        "token_cost_usd": token_cost(engine, calls),
        "wall_s": result.wall_s,
        "bound_s": critical_path(pipeline, calls),
        "calls": len(calls),
        "ranked": (result.output or {}).get("ranked", []),
        "criteria": (result.output or {}).get("criteria"),
        "explained_by": (result.output or {}).get("explained_by"),
        "explanation": (result.output or {}).get("explanation"),
        "finalists": [f["listing"]["id"] for f in result.values.get("finalists") or []],
        "calls_by_step": dict(Counter(c.step for c in calls if not c.cached)),
        "degraded": {
            k: v["degraded"] for k, v in result.model_dump()["steps"].items() if v["degraded"]
        },
        "in_time": bool((result.output or {}).get("ranked"))
        and (deadline_s is None or result.wall_s <= deadline_s + 0.5),
    }


async def plain(engine: Engine, request: str, city: str, *, gather: bool) -> float:
    """The routed pipeline's calls without shoal's runner: a sequential loop, or one unbounded
    `asyncio.gather` per fan-out step. Returns wall seconds."""
    pipeline = rental.build()
    steps = pipeline.steps

    def ask(name: str, fields: dict[str, Any]) -> ChatRequest:
        step = steps[name]
        assert isinstance(step, ModelStep)
        messages = [Message(role="system", content=step.system or "")]
        messages.append(Message(role="user", content=step.prompt.format(**fields)))
        schema = step.output.model_json_schema() if step.output else None
        return ChatRequest(messages=tuple(messages), max_tokens=step.max_tokens, json_schema=schema)

    async def call(name: str, fields: dict[str, Any]) -> str:
        step = steps[name]
        assert isinstance(step, ModelStep)
        return (await engine.generate(step.model, ask(name, fields))).text

    started = time.monotonic()
    read = rental.Reading.model_validate_json(await call("read", {"request": request}))
    criteria = rental.criteria(request, read)
    found = rental.candidates(criteria, city)
    picks = []
    for menu in rental.menus(found):
        picks.append(
            rental.Picks.model_validate_json(
                await call("shortlist", {"request": request, "item": menu})
            )
        )
    finalists = rental.finalists(found, picks, city)
    wishes = rental.wishes(criteria)
    fields = [{"request": request, "wishes": wishes, "item": f.card()} for f in finalists]
    if gather:
        texts = await asyncio.gather(*(call("scores", f) for f in fields))
    else:
        texts = [await call("scores", f) for f in fields]
    ranked = rental.rank(criteria, finalists, [rental.Fit.model_validate_json(t) for t in texts])
    for brief in rental.briefs(ranked):
        await call("explain", {"request": request, "item": brief})
    return time.monotonic() - started


def _all_small(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not rows:
        return None
    large = [r["large"] for r in rows]
    return {
        "requests": len(rows),
        "ndcg5_mean": statistics.mean(r["ndcg5_all_small"] for r in rows),
        "token_cost_ratio": sum(r["small"]["token_cost_usd"] for r in rows)
        / max(sum(x["token_cost_usd"] for x in large), 1e-12),
        "cost_ratio": sum(r["small"]["cost_usd"] for r in rows)
        / max(sum(x["cost_usd"] for x in large), 1e-12),
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    xs = range(len(rows))
    left.bar(
        [x - 0.2 for x in xs], [r["routed"]["cost_usd"] * 1e3 for r in rows], 0.4, label="routed"
    )
    left.bar(
        [x + 0.2 for x in xs], [r["large"]["cost_usd"] * 1e3 for r in rows], 0.4, label="all large"
    )
    left.set(xlabel="request", ylabel="cost (m$)", title="cost per request")
    left.legend()
    right.scatter(
        [r["routed"]["cost_usd"] / r["large"]["cost_usd"] for r in rows], [r["ndcg5"] for r in rows]
    )
    right.axhline(0.9, ls="--", c="grey")
    right.axvline(0.4, ls="--", c="grey")
    right.set(
        xlabel="routed cost / all-large cost", ylabel="NDCG@5 vs all-large", title="quality vs cost"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=len(REQUESTS))
    parser.add_argument("--city", default="albany", help="a bundled city, or a listings file")
    parser.add_argument("--orchestration", type=int, default=3, help="requests to run plain")
    parser.add_argument("--no-all-small", action="store_true", help="skip the all-small runs")
    parser.add_argument("--log", type=Path, default=Path("bench/out/rental.jsonl"))
    parser.add_argument("--plot", type=Path, default=Path("bench/out/rental.png"))
    parser.add_argument("--loaded", action="store_true", help="a busy loop holds one core")
    parser.add_argument("--deadline", type=float, default=60.0, help="the routed run's, loaded")
    args = parser.parse_args()
    busy = None
    deadline = args.deadline if args.loaded else None
    if args.loaded:
        busy = await asyncio.create_subprocess_exec(sys.executable, "-c", "while True: pass")
        if args.log == parser.get_default("log"):
            args.log = Path("bench/out/rental-loaded.jsonl")
    engine = Engine(Fleet())
    rental.register_routes(engine)
    listings = {x.id: x for x in load_listings(args.city)}
    done = {}
    if args.log.is_file():
        for line in args.log.read_text().splitlines():
            row = json.loads(line)
            done[row["request"]] = row
    args.log.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, request in enumerate(REQUESTS[: args.n]):
        if request in done:
            rows.append(done[request])
            continue
        print(f"[{i + 1}/{args.n}] {request}", file=sys.stderr)
        # Alternate which variant goes first: the second one finds the shared prompts (the
        # criteria call) already in llama.cpp's prompt cache.
        if i % 2 == 0:
            routed = await run(engine, rental.build(), request, args.city, deadline)
            large = await run(engine, rental.all_large(), request, args.city)
        else:
            large = await run(engine, rental.all_large(), request, args.city)
            routed = await run(engine, rental.build(), request, args.city, deadline)
        # The other end of the trade: every step on the small model.
        small = None
        if not args.no_all_small:
            all_small = rental.build({n: rental.SMALL for n in rental.ROUTED})
            small = await run(engine, all_small, request, args.city)
        row = {
            "request": request,
            "routed": routed,
            "large": large,
            "small": small,
            "ndcg5": ndcg5(routed["ranked"], large["ranked"]),
            "ndcg5_all_small": ndcg5(small["ranked"], large["ranked"]) if small else None,
        }
        row["constraints_met"] = constraints_met(row, listings)
        print(
            f"    NDCG@5 {row['ndcg5']:.2f}, "
            f"cost {routed['cost_usd'] / max(large['cost_usd'], 1e-12):.0%} of all-large, "
            f"constraints met {row['constraints_met']}",
            file=sys.stderr,
        )
        with args.log.open("a") as log:
            log.write(json.dumps(row) + "\n")
        rows.append(row)
    orchestration = []
    for request in REQUESTS[: min(args.orchestration, args.n)]:
        row = next(r for r in rows if r["request"] == request)
        sequential = await plain(engine, request, args.city, gather=False)
        gathered = await plain(engine, request, args.city, gather=True)
        orchestration.append(
            {
                "request": request,
                "shoal_wall_s": row["routed"]["wall_s"],
                "bound_s": row["routed"]["bound_s"],
                "sequential_wall_s": sequential,
                "gather_wall_s": gathered,
            }
        )
    await engine.aclose()
    if busy is not None:
        busy.kill()
        await busy.wait()
    routed_cost = sum(r["routed"]["cost_usd"] for r in rows)
    large_cost = sum(r["large"]["cost_usd"] for r in rows)
    ratios = [
        r["routed"]["wall_s"] / r["routed"]["bound_s"] for r in rows if r["routed"]["bound_s"]
    ]
    summary = {
        "requests": len(rows),
        "ndcg5_mean": statistics.mean(r["ndcg5"] for r in rows) if rows else None,
        "ndcg5_median": statistics.median(r["ndcg5"] for r in rows) if rows else None,
        # Stricter than NDCG: the same first choice, and the same five finalists scored.
        "same_top_pick": statistics.mean(
            (r["routed"]["ranked"] or [{}])[0].get("listing_id")
            == (r["large"]["ranked"] or [{}])[0].get("listing_id")
            for r in rows
        )
        if rows
        else None,
        "same_finalists": statistics.mean(
            set(r["routed"].get("finalists", [])) == set(r["large"].get("finalists", []))
            for r in rows
        )
        if rows
        else None,
        "all_small": _all_small([r for r in rows if r.get("small")]),
        # The share of the top five meeting the stated constraints, mean over the requests
        # where the variant ranked something, and how many those were.
        "constraints_met": {
            v: _mean([r["constraints_met"].get(v) for r in rows]) for v in VARIANTS
        },
        "constraints_judged": {
            v: sum(r["constraints_met"].get(v) is not None for r in rows) for v in VARIANTS
        },
        "routed_cost_usd": routed_cost,
        "all_large_cost_usd": large_cost,
        "cost_ratio": routed_cost / large_cost if large_cost else None,
        "token_cost_ratio": (
            sum(r["routed"]["token_cost_usd"] for r in rows)
            / max(sum(r["large"]["token_cost_usd"] for r in rows), 1e-12)
        ),
        "routed_wall_s_median": statistics.median(r["routed"]["wall_s"] for r in rows)
        if rows
        else None,
        "all_large_wall_s_median": statistics.median(r["large"]["wall_s"] for r in rows)
        if rows
        else None,
        "wall_over_critical_path_median": statistics.median(ratios) if ratios else None,
        "orchestration": orchestration,
        "loaded": args.loaded,
        "deadline_s": deadline,
        "answered_in_time": statistics.mean(bool(r["routed"].get("in_time")) for r in rows)
        if rows
        else None,
        "goals": {},
    }
    if rows:
        summary["goals"] = {
            "ndcg5>=0.9": summary["ndcg5_mean"] >= 0.9,
            "cost<=40%": (summary["cost_ratio"] or 1) <= 0.4,
            "token_cost<=40%": summary["token_cost_ratio"] <= 0.4,
            "wall<=1.15x_bound": (summary["wall_over_critical_path_median"] or 9) <= 1.15,
            "constraints_routed>=all_large": (summary["constraints_met"]["routed"] or 0)
            >= (summary["constraints_met"]["large"] or 0),
        }
        if args.loaded:
            summary["goals"]["answered_in_time==100%"] = summary["answered_in_time"] == 1.0
        plot(rows, args.plot)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
