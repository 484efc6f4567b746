"""Scale-out on Ray, one run, side by side (on a local Ray cluster of this machine).

1. The tiny model (SmolLM2-135M, one llama.cpp thread per copy): in process, on Ray with one
   replica, on Ray with two replicas. At concurrency 1: p50 latency, and the Ray hop (p50 of a
   call's latency less its compute, Ray less in process; goal <= 3 ms). At concurrency 8:
   requests/s, p50 and p95 latency. And Ray's own floor: a call that does nothing, through a
   Serve deployment handle and to a plain actor.
2. The gateway with a fast fake upstream (as in bench/gateway.py): plain `shoal serve` against
   the gateway on Ray (two replicas behind Serve's proxy, one key ledger actor), at concurrency
   16: requests/s, p50 and p95, and p50 added over calling the upstream directly.

Ray reaches beyond loopback when it starts, so the bench runs in a network namespace with only
loopback: started outside one, it runs itself again under `unshare -n` (as root). Prints one
JSON object (with the machine's load average: the figures move with it).

    python bench/ray.py                 # a few minutes
    python bench/ray.py --calls 16 --gateway-calls 400
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# This file is named like the library it measures: take its folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _gateway_bench() -> Any:
    spec = importlib.util.spec_from_file_location("gateway_bench", HERE / "gateway.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


# -- 1. the tiny model -------------------------------------------------------------------------


async def _calls(model: Any, n: int, concurrency: int, max_tokens: int) -> dict[str, Any]:
    from shoal.messages import ChatRequest, Message

    latencies: list[float] = []
    hops: list[float] = []
    remaining = n

    async def worker(w: int) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            request = ChatRequest(
                messages=[Message(role="user", content="Name a fruit.")], max_tokens=max_tokens
            )
            started = time.perf_counter()
            response = await model.generate(request)
            latencies.append(time.perf_counter() - started)
            hops.append(latencies[-1] - response.compute_s)

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall = time.perf_counter() - started
    return {
        "calls": n,
        "requests_per_s": round(n / wall, 2),
        "p50_ms": ms(statistics.median(latencies)),
        "p95_ms": ms(percentile(latencies, 0.95)),
        "p50_not_compute_ms": ms(statistics.median(hops)),
    }


async def models_part(args: argparse.Namespace) -> dict[str, Any]:
    from shoal.backends.ray_model import Deployment, RayModel
    from shoal.fleet import Fleet
    from shoal.models.llamacpp import LlamaCppModel
    from shoal.settings import RayPlacement

    fleet = Fleet()
    card, path = fleet.card("smollm2-135m"), fleet.gguf_path("smollm2-135m")
    targets: dict[str, Any] = {"in_process": LlamaCppModel(card, path=path, threads=1)}
    for replicas in (1, 2):
        placement = RayPlacement(replicas=replicas, num_cpus=0.5, max_ongoing_requests=16)
        named = card.model_copy(update={"id": f"bench-tiny-{replicas}"})
        targets[f"ray_{replicas}_replica"] = RayModel(Deployment(named, path, placement, threads=1))
    out: dict[str, Any] = {}
    for name, model in targets.items():
        log(f"model: {name}")
        await model.load()
        await _calls(model, 3, 1, args.max_tokens)  # warm
        out[name] = {
            "concurrency_1": await _calls(model, args.calls, 1, args.max_tokens),
            "concurrency_8": await _calls(model, args.calls * 2, 8, args.max_tokens),
        }
    here = out["in_process"]
    for name in ("ray_1_replica", "ray_2_replica"):
        out[name]["hop_p50_ms"] = round(
            out[name]["concurrency_1"]["p50_not_compute_ms"]
            - here["concurrency_1"]["p50_not_compute_ms"],
            2,
        )
        out[name]["requests_per_s_ratio_to_in_process"] = round(
            out[name]["concurrency_8"]["requests_per_s"] / here["concurrency_8"]["requests_per_s"],
            2,
        )
    out["goal_hop_p50_ms"] = 3.0
    return out


async def floor_part(calls: int = 200) -> dict[str, float]:
    """Ray's own floor, same machine, same moment: p50 of a call that does nothing (a
    `ChatRequest` sent and returned) through a Serve deployment handle, and to a plain actor."""
    import ray
    from ray import serve

    from shoal.backends.ray_cluster import QUIET_LOGS
    from shoal.messages import ChatRequest, Message

    class Echo:
        async def echo(self, request: Any) -> Any:
            return request

    deployment: Any = serve.deployment(Echo)
    bound = deployment.options(
        max_ongoing_requests=16, ray_actor_options={"num_cpus": 0.25}, logging_config=QUIET_LOGS
    ).bind()
    handle = serve.run(bound, name="bench-echo", route_prefix=None)
    actor = ray.remote(num_cpus=0.25)(Echo).remote()
    request = ChatRequest(messages=[Message(role="user", content="Name a fruit.")], max_tokens=16)
    out: dict[str, float] = {}
    for name, call in (
        ("serve_handle_p50_ms", lambda: handle.echo.remote(request)),
        ("actor_p50_ms", lambda: actor.echo.remote(request)),
    ):
        for _ in range(20):
            await call()
        latencies = []
        for _ in range(calls):
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)
        out[name] = ms(statistics.median(latencies))
    serve.delete("bench-echo")
    ray.kill(actor)
    return out


# -- 2. the gateway ----------------------------------------------------------------------------


async def _load(url: str, headers: dict[str, str], n: int, concurrency: int) -> dict[str, Any]:
    import aiohttp

    gateway = _gateway_bench()
    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    async with aiohttp.ClientSession(connector=connector) as session:
        await gateway.measure(session, url, headers, 20, concurrency)  # warm
        started = time.perf_counter()
        latencies = await gateway.measure(session, url, headers, n, concurrency)
        wall = time.perf_counter() - started
    return {
        "requests_per_s": round(n / wall, 1),
        "p50_ms": ms(statistics.median(latencies)),
        "p95_ms": ms(percentile(latencies, 0.95)),
    }


async def _ready(url: str, timeout_s: float = 90) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url) as reply:
                    if reply.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not answer")


def gateway_part(args: argparse.Namespace, http_port: int) -> dict[str, Any]:
    from shoal.server.keys import KeyStore
    from shoal.server.ray_gateway import run_gateway
    from shoal.settings import FleetSettings, OpenAIModelSpec, ServerSettings

    gateway = _gateway_bench()
    tmp = Path(tempfile.mkdtemp(prefix="shoal-ray-bench-"))
    up_port = gateway.free_port()
    upstream = f"http://127.0.0.1:{up_port}/v1"
    up = subprocess.Popen(
        [sys.executable, str(HERE / "gateway.py"), "--role", "upstream", "--port", str(up_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    plain = None
    try:
        asyncio.run(_ready(f"http://127.0.0.1:{up_port}/health"))
        (tmp / "plain").mkdir()
        plain = gateway.start_shoal(upstream, tmp / "plain")  # `shoal serve`, keys on
        asyncio.run(_ready(plain.health))
        spec = OpenAIModelSpec(
            kind="openai",
            id="fake",
            base_url=upstream,
            price={"input_per_mtok": 0.15, "output_per_mtok": 0.6},  # type: ignore[arg-type]
            context=8192,
            max_concurrency=64,
        )
        keys = tmp / "ray-keys.sqlite"
        store = KeyStore(keys)
        key = store.create("bench", budget_usd=1000.0, rpm=None)[0]
        store.close()
        fleet = FleetSettings(include_default=False, cache_dir=tmp / "cache", models=(spec,))
        log("gateway on Ray: starting 2 replicas")
        handle = run_gateway(
            fleet,
            ServerSettings(keys_path=keys),
            replicas=2,
            num_cpus=0.5,
            trace_path=tmp / "ray-traces.sqlite",
        )
        ray_url = f"http://127.0.0.1:{http_port}/v1"
        c, n = args.gateway_concurrency, args.gateway_calls
        direct = asyncio.run(_load(f"{upstream}/chat/completions", {}, n, c))
        figures = {"direct_upstream": direct}
        for name, url, headers in (
            ("shoal_serve", plain.base_url, plain.headers),
            ("gateway_on_ray_2_replicas", ray_url, {"authorization": f"Bearer {key}"}),
        ):
            log(f"gateway: {name}")
            figures[name] = asyncio.run(_load(f"{url}/chat/completions", headers, n, c))
            figures[name]["added_p50_ms"] = round(figures[name]["p50_ms"] - direct["p50_ms"], 2)
        handle.stop()
        figures["concurrency"] = c  # type: ignore[assignment]
        return figures
    finally:
        if plain is not None:
            plain.stop()
        up.terminate()
        up.wait(timeout=10)


# -- the run -----------------------------------------------------------------------------------


def in_namespace() -> int:
    """Run this bench again inside a loopback-only network namespace; its exit status."""
    if os.geteuid() != 0:
        log("the Ray bench runs in a loopback-only network namespace: run it as root")
        return 2
    env = {**os.environ, "SHOAL_RAY_NETNS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    script = 'ip link set lo up && exec "$@"'
    command = ["unshare", "-n", "sh", "-c", script, "sh", sys.executable, __file__, *sys.argv[1:]]
    return subprocess.run(command, env=env, check=False).returncode


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=24, help="model calls at concurrency 1")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--gateway-calls", type=int, default=1000)
    parser.add_argument("--gateway-concurrency", type=int, default=16)
    args = parser.parse_args()
    if os.environ.get("SHOAL_RAY_NETNS") != "1":
        sys.exit(in_namespace())
    from ray import serve

    from shoal.backends.ray_cluster import connect, start_serve

    gateway = _gateway_bench()
    connect(None)
    http_port = gateway.free_port()
    start_serve("127.0.0.1", http_port)
    result: dict[str, Any] = {"load_average_before": [round(x, 2) for x in os.getloadavg()]}
    result["cpus"] = os.cpu_count()
    started = time.perf_counter()
    result["ray_floor"] = asyncio.run(floor_part())
    result["models"] = asyncio.run(models_part(args))
    log(json.dumps(result["models"]))
    for app in ("bench-tiny-1", "bench-tiny-2"):
        serve.delete("shoal-model-" + app)
    result["gateway"] = gateway_part(args, http_port)
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2), flush=True)  # before Ray's own lines at shutdown
    serve.shutdown()
    import ray

    ray.shutdown()


if __name__ == "__main__":
    main()
