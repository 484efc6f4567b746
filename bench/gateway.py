"""Gateway overhead: the latency shoal's server adds over calling the upstream directly, next to
LiteLLM's proxy and a bare aiohttp passthrough, in the same run, on loopback.

Every party is its own process on 127.0.0.1:

    upstream     a fast fake OpenAI-compatible endpoint (aiohttp; a fixed answer)
    passthrough  a bare aiohttp server forwarding each request with an aiohttp client
    shoal        `shoal serve` with one `openai`-kind fleet model pointing at the upstream, an API
                 key with a budget (so every call is authenticated, reserved, settled and traced)
    litellm      LiteLLM's proxy (installed in its own venv, see bench/README.md), one model
                 pointing at the upstream

The client (aiohttp, in this process) sends the same non-streamed chat request to each target
in turn, interleaved in rounds (direct, passthrough, shoal, litellm, rotating the order), at
concurrency 1 and 16. Figures, per target and concurrency:

    p50_ms, p99_ms     latency of a call, client-side
    overhead_p50_ms    p50 of the target minus p50 of the direct calls at the same concurrency
    overhead_p99_ms    the same for p99

and the goals: shoal's p50 overhead at concurrency 1 <= 1 ms, and <= 1/3 of LiteLLM's.
Prints one JSON object; draws bench/out/gateway.png.

    python bench/gateway.py                       # about a minute (LiteLLM starts in ~10 s)
    python bench/gateway.py --no-litellm --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

SELF = Path(__file__).resolve()
HERE = SELF.parent
LITELLM = HERE / ".venv-litellm" / "bin" / "litellm"
ANSWER = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": "fake",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Paris is the capital of France."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 14, "completion_tokens": 7, "total_tokens": 21},
    }
).encode()
BODY = json.dumps(
    {
        "model": "fake",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16,
    }
).encode()


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the parties that run as child processes -------------------------------------------------


def run_upstream(port: int) -> None:
    async def chat(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=ANSWER, content_type="application/json")

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def run_passthrough(port: int, upstream: str) -> None:
    session: dict[str, aiohttp.ClientSession] = {}

    async def start(app: web.Application) -> None:
        session["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))

    async def stop(app: web.Application) -> None:
        await session["s"].close()

    async def chat(request: web.Request) -> web.Response:
        body = await request.read()
        async with session["s"].post(
            f"{upstream}/chat/completions", data=body, headers={"content-type": "application/json"}
        ) as reply:
            data = await reply.read()
            return web.Response(body=data, status=reply.status, content_type="application/json")

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# -- orchestration ---------------------------------------------------------------------------


class Party:
    def __init__(self, name: str, command: list[str], base_url: str, health: str, **env: str):
        self.name = name
        self.base_url = base_url
        self.health = health
        self.headers = {"content-type": "application/json"}
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 (lives as long as the process)
            prefix=f"gateway-{name}-", suffix=".log", delete=False
        )
        self.process = subprocess.Popen(
            command,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
        )

    async def ready(self, session: aiohttp.ClientSession, timeout_s: float = 90) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                break
            try:
                async with session.get(self.health) as reply:
                    if reply.status == 200:
                        return time.monotonic() - started
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        tail = self.tail()
        raise RuntimeError(f"{self.name} did not start:\n{tail}")

    def tail(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


def start_shoal(upstream: str, tmp: Path) -> Party:
    from shoal.server.keys import KeyStore

    fleet = tmp / "fleet.yaml"
    fleet.write_text(
        json.dumps(
            {
                "include_default": False,
                "cache_dir": str(tmp / "cache"),
                "models": [
                    {
                        "id": "fake",
                        "kind": "openai",
                        "base_url": upstream,
                        "price": {"input_per_mtok": 0.15, "output_per_mtok": 0.6},
                        "context": 8192,
                        "max_concurrency": 64,
                    }
                ],
            }
        )
    )
    keys = tmp / "keys.sqlite"
    store = KeyStore(keys)
    key = store.create("bench", budget_usd=1000.0, rpm=None)[0]
    store.close()
    port = free_port()
    command = [sys.executable, "-m", "shoal.cli.main", "serve", "--fleet", str(fleet)]
    command += ["--port", str(port), "--keys", str(keys), "--traces", str(tmp / "traces.sqlite")]
    party = Party(
        "shoal", command, f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port}/healthz"
    )
    party.headers["authorization"] = f"Bearer {key}"
    return party


def start_litellm(upstream: str, tmp: Path) -> Party:
    master_key = "sk-" + secrets.token_urlsafe(32)  # the proxy, like shoal, checks a key
    config = tmp / "litellm.yaml"
    config.write_text(
        json.dumps(
            {
                "model_list": [
                    {
                        "model_name": "fake",
                        "litellm_params": {
                            "model": "openai/fake",
                            "api_base": upstream,
                            "api_key": "unused",
                        },
                    }
                ],
                "litellm_settings": {"telemetry": False, "drop_params": True},
                "general_settings": {"master_key": master_key},
            }
        )
    )
    port = free_port()
    command = [str(LITELLM), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    party = Party(
        "litellm",
        command,
        f"http://127.0.0.1:{port}/v1",
        f"http://127.0.0.1:{port}/health/liveliness",
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_TELEMETRY="False",
        LITELLM_LOG="ERROR",
        NO_DOCS="True",
    )
    party.headers["authorization"] = f"Bearer {master_key}"
    return party


async def measure(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], n: int, concurrency: int
) -> list[float]:
    latencies: list[float] = []
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            async with session.post(url, data=BODY, headers=headers) as reply:
                await reply.read()
                if reply.status != 200:
                    raise RuntimeError(f"{url} answered {reply.status}")
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="shoal-gateway-"))
    up_port = free_port()
    upstream_url = f"http://127.0.0.1:{up_port}/v1"
    me = [sys.executable, str(SELF)]
    parties: list[Party] = []
    try:
        upstream = Party(
            "upstream",
            [*me, "--role", "upstream", "--port", str(up_port)],
            upstream_url,
            f"http://127.0.0.1:{up_port}/health",
        )
        parties.append(upstream)
        pt_port = free_port()
        parties.append(
            Party(
                "passthrough",
                [*me, "--role", "passthrough", "--port", str(pt_port), "--upstream", upstream_url],
                f"http://127.0.0.1:{pt_port}/v1",
                f"http://127.0.0.1:{pt_port}/health",
            )
        )
        parties.append(start_shoal(upstream_url, tmp))
        if args.litellm:
            if not LITELLM.exists():
                raise SystemExit(f"LiteLLM is not installed at {LITELLM}: see bench/README.md")
            parties.append(start_litellm(upstream_url, tmp))
        starts: dict[str, float] = {}
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64), timeout=aiohttp.ClientTimeout(total=60)
        ) as session:
            for party in parties:
                starts[party.name] = await party.ready(session)
                log(f"{party.name} ready in {starts[party.name]:.1f} s")
            targets = [(p.name if p is not upstream else "direct", p) for p in parties]
            samples: dict[tuple[str, int], list[float]] = {}
            for concurrency in (1, 16):
                n = args.requests * (4 if concurrency > 1 else 1)
                for _, party in targets:  # warm-up
                    url = f"{party.base_url}/chat/completions"
                    await measure(session, url, party.headers, max(20, n // 4), concurrency)
                for r in range(args.rounds):
                    shift = r % len(targets)
                    for name, party in targets[shift:] + targets[:shift]:
                        url = f"{party.base_url}/chat/completions"
                        got = await measure(session, url, party.headers, n, concurrency)
                        samples.setdefault((name, concurrency), []).extend(got)
                    log(f"concurrency {concurrency}: round {r + 1}/{args.rounds} done")
    finally:
        for party in reversed(parties):
            party.stop()
    return report(samples, starts, args)


def report(
    samples: dict[tuple[str, int], list[float]], starts: dict[str, float], args: argparse.Namespace
) -> dict[str, Any]:
    figures: dict[str, dict[str, dict[str, float]]] = {}
    for (name, concurrency), values in samples.items():
        figures.setdefault(name, {})[f"c{concurrency}"] = {
            "n": len(values),
            "p50_ms": statistics.median(values) * 1e3,
            "p99_ms": percentile(values, 0.99) * 1e3,
        }
    for by_c in figures.values():
        for c, f in by_c.items():
            direct = figures["direct"][c]
            f["overhead_p50_ms"] = f["p50_ms"] - direct["p50_ms"]
            f["overhead_p99_ms"] = f["p99_ms"] - direct["p99_ms"]
    shoal = figures["shoal"]
    ratios: dict[str, float] = {}
    goals: dict[str, bool] = {"shoal_p50_overhead_c1_le_1ms": shoal["c1"]["overhead_p50_ms"] <= 1.0}
    for other in ("litellm", "passthrough"):
        if other not in figures:
            continue
        for c in ("c1", "c16"):
            theirs = figures[other][c]["overhead_p50_ms"]
            ratios[f"shoal_over_{other}_p50_{c}"] = shoal[c]["overhead_p50_ms"] / theirs
    if "litellm" in figures:
        goals["shoal_le_third_of_litellm_p50_c1"] = ratios["shoal_over_litellm_p50_c1"] <= 1 / 3
    return {
        "benchmark": "gateway overhead over a fast fake upstream, loopback, non-streamed chat",
        "rounds": args.rounds,
        "requests_per_round": {"c1": args.requests, "c16": args.requests * 4},
        "start_s": starts,
        "targets": figures,
        "ratios": ratios,
        "goals": goals,
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("passthrough", "shoal", "litellm") if n in result["targets"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, c in zip(axes, ("c1", "c16"), strict=True):
        p50 = [result["targets"][n][c]["overhead_p50_ms"] for n in names]
        p99 = [result["targets"][n][c]["overhead_p99_ms"] for n in names]
        xs = range(len(names))
        for offset, values, label in ((-0.2, p50, "p50"), (0.2, p99, "p99")):
            bars = ax.bar([x + offset for x in xs], values, width=0.4, label=label)
            ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=8)
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_xticks(list(xs), names)
        ax.set_title(f"added latency, concurrency {c[1:]}")
        ax.set_ylabel("ms over calling the upstream directly")
        ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> None:
    """Write `fig` to `path` as PNG, whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--role", choices=["bench", "upstream", "passthrough"], default="bench")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", default="")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=100, help="per round at concurrency 1")
    parser.add_argument("--no-litellm", dest="litellm", action="store_false")
    parser.add_argument("--no-plot", dest="plot", action="store_false")
    args = parser.parse_args()
    if args.role == "upstream":
        run_upstream(args.port)
        return
    if args.role == "passthrough":
        run_passthrough(args.port, args.upstream)
        return
    result = asyncio.run(bench(args))
    if args.plot:
        out = HERE / "out" / "gateway.png"
        plot(result, out)
        log(f"plot: {out}")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
