"""The dashboard at scale: each page's server time over a trace store of a million calls.

Fills a trace store with synthetic calls (six models, three routes and direct calls, twenty
keys, 2% errors, 5% inside pipeline runs, spread over the last `--days` days), through
`TraceStore.record_calls`, which writes the rollups with the calls. Then serves it with
`create_app` on loopback, signs in with an admin key, and requests each page `--rounds` times
in turn. Figures:

    fill.calls_per_s                      rate of filling (calls and rollups, 10,000 a commit)
    write_us_per_call.with_rollups        recording one call in a batch of 1,000, rollups too
    write_us_per_call.without_rollups     the same insert without the rollups
    pages.NAME.p50_ms, .p95_ms            a page's time, request to last byte, over loopback
    goal_p95_ms, goal_met                 every page's p95 within the goal (200 ms)

Prints one JSON object; logs progress to stderr.

    python bench/ui.py                    # 1,000,000 calls: about 3-5 minutes on 2 cores
    python bench/ui.py --calls 100000 --rounds 10
    python bench/ui.py --store /tmp/ui.sqlite   # reuse a filled store (filled if empty)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import uvicorn

from shoal import Fleet
from shoal.engine import Engine
from shoal.server import create_app
from shoal.server.keys import KeyStore
from shoal.settings import ServerSettings
from shoal.traces import rollups
from shoal.traces.store import CallRecord, TraceStore

GOAL_P95_MS = 200.0
MODELS = ["smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gpt-4o-mini", "haiku", "m6"]
ROUTES = [None, "cheap-first", "smart", "safe"]
BATCH = 10_000


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def synthetic(
    n: int, *, start: int, total: int, days: float, rng: random.Random
) -> list[CallRecord]:
    """Calls `start` to `start + n` of `total`, spread evenly over the last `days` days."""
    now = time.time()
    span = days * 86400
    calls = []
    for i in range(start, start + n):
        route = ROUTES[i % len(ROUTES)]
        model = MODELS[rng.randrange(3) if route else rng.randrange(len(MODELS))]
        finished = now - span * (1 - (i + 1) / total)
        latency = rng.lognormvariate(-1.5, 1.0)
        decision = None
        if route is not None:
            decision = {
                "route": route,
                "models": [model],
                "reason": "synthetic",
                "estimates": [
                    {"model": m, "quality": q, "cost_usd": c}
                    for m, q, c in zip(
                        MODELS[:3], (0.6, 0.75, 0.9), (1e-6, 4e-6, 1.2e-5), strict=True
                    )
                ],
            }
        in_run = rng.random() < 0.05
        calls.append(
            CallRecord.model_construct(
                model=model,
                status="error" if rng.random() < 0.02 else "ok",
                run_id=f"run-{i // 40}" if in_run else None,
                step="score" if in_run else None,
                item=None,
                route=route,
                error=None,
                input_tokens=rng.randrange(20, 800),
                output_tokens=rng.randrange(1, 200),
                latency_s=latency,
                compute_s=latency,
                cost_usd=round(latency * 1e-5, 12),
                cached=False,
                decision=decision,
                started_at=finished - latency,
                finished_at=finished,
                key=f"key-{rng.randrange(20)}",
                ttft_s=latency / 4,
            )
        )
    return calls


def fill(store: TraceStore, total: int, days: float) -> float:
    have = store.read("SELECT COUNT(*) FROM calls")[0][0]
    rng = random.Random(7)
    started = time.perf_counter()
    for start in range(have, total, BATCH):
        calls = synthetic(min(BATCH, total - start), start=start, total=total, days=days, rng=rng)
        store.record_calls(calls)
        if (start // BATCH) % 10 == 0:
            log(f"filled {start + BATCH:,} calls")
    took = time.perf_counter() - started
    return (total - have) / took if total > have else 0.0


def write_cost(tmp: Path) -> dict[str, float]:
    """Microseconds per call recorded in batches of 1,000, with and without the rollups."""
    rng = random.Random(1)
    figures = {}
    for with_rollups in (True, False):
        store = TraceStore(tmp / f"write-{with_rollups}.sqlite")
        times = []
        for round_ in range(20):
            calls = synthetic(1000, start=round_ * 1000, total=20_000, days=1, rng=rng)
            started = time.perf_counter()
            if with_rollups:
                store.record_calls(calls)
            else:
                with store._write() as db:
                    for call in calls:
                        store._insert(db, call)
            times.append((time.perf_counter() - started) / len(calls) * 1e6)
        store.close()
        figures["with_rollups" if with_rollups else "without_rollups"] = statistics.median(times)
    return figures


class Session:
    """A signed-in admin, over one keep-alive connection."""

    def __init__(self, port: int, key: str) -> None:
        self.connection = HTTPConnection("127.0.0.1", port, timeout=120)
        self.cookies: dict[str, str] = {}
        page = self.get("/ui/login")
        found = re.search(r'name="login_token" value="([^"]+)"', page)
        assert found is not None
        body = urllib.parse.urlencode({"login_token": found.group(1), "key": key})
        status, _ = self.send("POST", "/ui/login", body)
        assert status == 303, status

    def send(self, method: str, path: str, body: str | None = None) -> tuple[int, str]:
        headers = {"cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())}
        if body is not None:
            headers["content-type"] = "application/x-www-form-urlencoded"
        self.connection.request(method, path, body=body, headers=headers)
        response = self.connection.getresponse()
        text = response.read().decode()
        for raw in response.headers.get_all("set-cookie") or []:
            name, _, rest = raw.partition("=")
            self.cookies[name] = rest.split(";")[0]
        return response.status, text

    def get(self, path: str) -> str:
        status, text = self.send("GET", path)
        assert status == 200, (path, status, text[:300])
        return text


def pages(store: TraceStore) -> dict[str, str]:
    last = store.read("SELECT MAX(id) FROM calls")[0][0]
    run = store.read("SELECT run_id FROM calls WHERE run_id IS NOT NULL ORDER BY id DESC LIMIT 1")
    routed = store.read("SELECT id FROM calls WHERE route IS NOT NULL ORDER BY id DESC LIMIT 1")
    return {
        "overview_1h": "/ui/?window=1h",
        "overview_24h": "/ui/?window=24h",
        "overview_7d": "/ui/?window=7d",
        "overview_all": "/ui/?window=all",
        "requests": "/ui/requests",
        "requests_page_deep": f"/ui/requests?before={last // 2}",
        "requests_by_model": "/ui/requests?model=haiku",
        "requests_by_key_and_status": "/ui/requests?key=key-3&status=error",
        "requests_by_route_and_model": "/ui/requests?route=smart&model=qwen2.5-coder-1.5b",
        "requests_by_run": f"/ui/requests?run_id={run[0][0]}",
        "requests_last_24h": "/ui/requests?window=24h",
        "requests_by_model_last_7d": "/ui/requests?window=7d&model=gpt-4o-mini",
        "request": f"/ui/requests/{routed[0][0]}",
        "keys": "/ui/keys",
        "routes": "/ui/routes",
        "runs": "/ui/runs",
        "playground": "/ui/playground",
    }


def measure(store_path: Path, keys_path: Path, rounds: int) -> dict[str, dict[str, float]]:
    store = KeyStore(keys_path)
    key = store.create(
        f"bench-{os.getpid()}-{time.time_ns()}", budget_usd=None, rpm=None, admin=True
    )[0]
    store.close()
    engine = Engine(Fleet(), trace_path=store_path)
    app = create_app(engine, ServerSettings(keys_path=keys_path))
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        session = Session(port, key)
        targets = pages(engine.traces)
        times: dict[str, list[float]] = {name: [] for name in targets}
        for path in targets.values():  # once each to warm up (templates compile)
            session.get(path)
        for round_ in range(rounds):
            for name, path in targets.items():
                started = time.perf_counter()
                session.get(path)
                times[name].append((time.perf_counter() - started) * 1000)
            log(f"round {round_ + 1}/{rounds}")
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        closing = threading.Thread(target=asyncio.run, args=(engine.aclose(),))
        closing.start()
        closing.join()
    return {
        name: {
            "p50_ms": round(statistics.median(values), 2),
            "p95_ms": round(statistics.quantiles(values, n=20, method="inclusive")[-1], 2),
        }
        for name, values in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1_000_000)
    parser.add_argument("--days", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--store", type=Path, help="a trace store to fill (or reuse)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        store_path = args.store or tmp / "traces.sqlite"
        store = TraceStore(store_path)
        log(f"filling {store_path} to {args.calls:,} calls")
        rate = fill(store, args.calls, args.days)
        rows = sum(store.read(f"SELECT COUNT(*) FROM {t}")[0][0] for t in rollups.TABLES)
        store.close()
        result: dict[str, Any] = {
            "calls": args.calls,
            "rollup_rows": rows,
            "fill": {"calls_per_s": round(rate)},
            "write_us_per_call": {k: round(v, 1) for k, v in write_cost(tmp).items()},
            "load_average": [round(x, 2) for x in os.getloadavg()],
        }
        result["pages"] = measure(store_path, tmp / "keys.sqlite", args.rounds)
        worst = max(p["p95_ms"] for p in result["pages"].values())
        result["goal_p95_ms"] = GOAL_P95_MS
        result["worst_p95_ms"] = worst
        result["goal_met"] = worst <= GOAL_P95_MS
        result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        result["histogram_bounds_s"] = list(rollups.LATENCY_BOUNDS_S)
        result["ttft_histogram_bounds_s"] = list(rollups.TTFT_BOUNDS_S)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
