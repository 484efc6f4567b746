"""Upstream client cost: shoal's aiohttp adapter (`OpenAICompatModel`) against the `openai`
package's `AsyncOpenAI` client, the same requests to the same fast fake upstream, in one run.

The upstream is a child process on 127.0.0.1 (aiohttp): a fixed chat completion, or, when the
body says `"stream": true`, a server-sent-event stream of a role chunk, seven content chunks, a
finish chunk, a usage chunk and `data: [DONE]`. In this process, on one event loop, in rounds
(rotating the order), at concurrency 1 and 16:

    shoal   generate   `OpenAICompatModel.generate(request)`
            stream     `OpenAICompatModel.stream(request)`, every event collected
    openai  create     `AsyncOpenAI(base_url, api_key="x", max_retries=0).chat.completions.create`
            stream     the same with `stream=True` (and `stream_options.include_usage`), every
                       chunk iterated
    aiohttp create     a bare `ClientSession.post` reading the body: the floor, parsing nothing
            stream     the same, reading every byte of the stream

Both clients send the same body (model, messages, max_tokens 16, temperature 0, top_p 1).
Figures, per client, mode and concurrency:

    p50_ms, p99_ms        latency of a call, client-side (a stream: until its last event)
    cpu_ms_per_call       this process's CPU time over a batch, per call, median over rounds: the
                          client's own cost, the least disturbed by other work on the machine
    wall_ms_per_call      a batch's wall time per call, median over rounds (at concurrency 16 the
                          cost of a call to the loop, where p50 also holds 15 others' waiting)

and `openai_minus_shoal` (create against generate, stream against stream): the differences of
p50, of CPU per call and of wall time per call, in ms; and `shoal_postprocess_ms`, the part of
a shoal call that an adapter built on the `openai` client would still do (validate the answer,
build the `ChatResponse`, cost it), timed in-process without the network. The question: would
the `openai` client cost more than 0.2 ms per call? Prints one JSON object (with the load
average at the start and the end: the machine is shared); draws bench/out/upstream_client.png.

    python bench/upstream_client.py                 # about 80 s on 2 busy cores
    python bench/upstream_client.py --rounds 3 --requests 100 --no-plot
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from gateway import (
    ANSWER,
    Party,
    free_port,
    log,
    percentile,
    save_figure,
)  # bench/gateway.py, beside this

SELF = Path(__file__).resolve()
HERE = SELF.parent
QUESTION = "What is the capital of France?"
PIECES = ["Paris", " is", " the", " capital", " of", " France", "."]


def _chunk(delta: dict[str, Any], finish: str | None = None, usage: Any = None) -> bytes:
    choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
    chunk = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "fake",
        "choices": choices,
        "usage": usage,
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


STREAM = [
    _chunk({"role": "assistant", "content": ""}),
    *(_chunk({"content": piece}) for piece in PIECES),
    _chunk({}, finish="stop"),
    _chunk({}, usage={"prompt_tokens": 14, "completion_tokens": 7, "total_tokens": 21}),
    b"data: [DONE]\n\n",
]


# -- the upstream (a child process) ----------------------------------------------------------


def run_upstream(port: int) -> None:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        if not body.get("stream"):
            return web.Response(body=ANSWER, content_type="application/json")
        response = web.StreamResponse(
            headers={"content-type": "text/event-stream", "cache-control": "no-cache"}
        )
        await response.prepare(request)
        for event in STREAM:
            await response.write(event)
        await response.write_eof()
        return response

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# -- the calls -------------------------------------------------------------------------------

Call = Callable[[], Awaitable[None]]


def make_calls(
    base_url: str, session: aiohttp.ClientSession
) -> tuple[dict[tuple[str, str], Call], Call]:
    """The calls to time, by client and mode, and what closes the clients."""
    from openai import AsyncOpenAI

    from shoal.cards import ModelCard, TokenPrice
    from shoal.messages import ChatRequest, Completed
    from shoal.models.openai_compat import OpenAICompatModel

    card = ModelCard(
        id="fake",
        context=8192,
        runs="api",
        where=base_url,
        price=TokenPrice(input_per_mtok=0.15, output_per_mtok=0.6),
        capabilities=frozenset({"stream"}),
    )
    shoal = OpenAICompatModel(card, base_url=base_url, max_concurrency=16)
    client = AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0)
    request = ChatRequest.of(QUESTION, max_tokens=16)
    messages: Any = [{"role": "user", "content": QUESTION}]
    common: dict[str, Any] = {"temperature": 0.0, "top_p": 1.0}
    url = f"{base_url}/chat/completions"
    bodies = {
        stream: json.dumps(
            {
                "model": "fake",
                "messages": messages,
                "max_tokens": 16,
                **common,
                "stream": stream,
                **({"stream_options": {"include_usage": True}} if stream else {}),
            }
        ).encode()
        for stream in (False, True)
    }
    headers = {"content-type": "application/json", "authorization": "Bearer x"}

    async def shoal_generate() -> None:
        response = await shoal.generate(request)
        assert response.text == "".join(PIECES), response.text

    async def shoal_stream() -> None:
        events = [event async for event in shoal.stream(request)]
        last = events[-1]
        assert isinstance(last, Completed)
        assert last.response.usage.output_tokens == 7

    async def openai_create() -> None:
        completion = await client.chat.completions.create(
            model="fake", messages=messages, max_tokens=16, **common
        )
        assert completion.choices[0].message.content == "".join(PIECES)

    async def openai_stream() -> None:
        stream = await client.chat.completions.create(
            model="fake",
            messages=messages,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
            **common,
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 7

    async def aiohttp_create() -> None:
        async with session.post(url, data=bodies[False], headers=headers) as reply:
            await reply.read()

    async def aiohttp_stream() -> None:
        async with session.post(url, data=bodies[True], headers=headers) as reply:
            async for _ in reply.content.iter_any():
                pass

    async def close() -> None:
        await shoal.aclose()
        await client.close()

    calls: dict[tuple[str, str], Call] = {
        ("shoal", "generate"): shoal_generate,
        ("shoal", "stream"): shoal_stream,
        ("openai", "create"): openai_create,
        ("openai", "stream"): openai_stream,
        ("aiohttp", "create"): aiohttp_create,
        ("aiohttp", "stream"): aiohttp_stream,
    }
    return calls, close


def shoal_postprocess_ms(base_url: str, n: int = 2000) -> float:
    """The part of a shoal call after the bytes arrive, without the network (private helpers of
    the adapter: a benchmark may look inside). Median over 5 batches, ms per call."""
    from shoal.cards import ModelCard, TokenPrice
    from shoal.messages import ChatRequest
    from shoal.models.openai_compat import OpenAICompatModel
    from shoal.openai_wire import ChatCompletion, response_of

    card = ModelCard(
        id="fake",
        context=8192,
        runs="api",
        where=base_url,
        price=TokenPrice(input_per_mtok=0.15, output_per_mtok=0.6),
    )
    model = OpenAICompatModel(card, base_url=base_url)
    request = ChatRequest.of(QUESTION, max_tokens=16)
    batches = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(n):
            completion = ChatCompletion.model_validate_json(ANSWER)
            reported = response_of(completion)
            model._answer(
                request,
                reported,
                usage_missing=False,
                output_tokens=7,
                upstream=None,
                latency=0.001,
                ttft=0.001,
            )
        batches.append((time.perf_counter() - started) / n)
    return statistics.median(batches) * 1e3


# -- measuring -------------------------------------------------------------------------------


async def batch(call: Call, n: int, concurrency: int) -> tuple[list[float], float, float]:
    """Latencies of `n` calls, `concurrency` at a time; the batch's wall and CPU seconds."""
    latencies: list[float] = []
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - wall, time.process_time() - cpu


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    load_start = os.getloadavg()
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    upstream = Party(
        "upstream",
        [sys.executable, str(SELF), "--role", "upstream", "--port", str(port)],
        base_url,
        f"http://127.0.0.1:{port}/health",
    )
    latencies: dict[tuple[str, str, int], list[float]] = {}
    per_call: dict[tuple[str, str, int], list[tuple[float, float]]] = {}
    loads: list[float] = [load_start[0]]
    try:
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64), timeout=aiohttp.ClientTimeout(total=60)
        ) as session:
            log(f"upstream ready in {await upstream.ready(session):.1f} s")
            calls, close = make_calls(base_url, session)
            targets = list(calls.items())
            try:
                for concurrency in (1, 16):
                    n = args.requests * (4 if concurrency > 1 else 1)
                    for _, call in targets:  # warm-up: connections, imports, caches
                        await batch(call, max(20, n // 4), concurrency)
                    for r in range(args.rounds):
                        shift = r % len(targets)
                        for (client, mode), call in targets[shift:] + targets[:shift]:
                            got, wall, cpu = await batch(call, n, concurrency)
                            key = (client, mode, concurrency)
                            latencies.setdefault(key, []).extend(got)
                            per_call.setdefault(key, []).append((wall / n, cpu / n))
                        loads.append(os.getloadavg()[0])
                        log(f"concurrency {concurrency}: round {r + 1}/{args.rounds} done")
            finally:
                await close()
    finally:
        upstream.stop()
    post = shoal_postprocess_ms(base_url)
    return report(latencies, per_call, post, load_start, loads, args)


def report(
    latencies: dict[tuple[str, str, int], list[float]],
    per_call: dict[tuple[str, str, int], list[tuple[float, float]]],
    post_ms: float,
    load_start: tuple[float, float, float],
    loads: list[float],
    args: argparse.Namespace,
) -> dict[str, Any]:
    figures: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for (client, mode, concurrency), values in latencies.items():
        batches = per_call[(client, mode, concurrency)]
        figures.setdefault(client, {}).setdefault(mode, {})[f"c{concurrency}"] = {
            "n": len(values),
            "p50_ms": statistics.median(values) * 1e3,
            "p99_ms": percentile(values, 0.99) * 1e3,
            "wall_ms_per_call": statistics.median(w for w, _ in batches) * 1e3,
            "cpu_ms_per_call": statistics.median(c for _, c in batches) * 1e3,
        }
    diffs: dict[str, dict[str, float]] = {}
    for theirs, ours in (("create", "generate"), ("stream", "stream")):
        for c in ("c1", "c16"):
            o, s = figures["openai"][theirs][c], figures["shoal"][ours][c]
            diffs[f"{theirs}_{c}"] = {
                "p50_ms": o["p50_ms"] - s["p50_ms"],
                "cpu_ms_per_call": o["cpu_ms_per_call"] - s["cpu_ms_per_call"],
                "wall_ms_per_call": o["wall_ms_per_call"] - s["wall_ms_per_call"],
            }
    ratios = {
        f"{mode}_{c}": figures["openai"][mode][c]["cpu_ms_per_call"]
        / figures["shoal"]["generate" if mode == "create" else "stream"][c]["cpu_ms_per_call"]
        for mode in ("create", "stream")
        for c in ("c1", "c16")
    }
    load_end = os.getloadavg()
    return {
        "benchmark": "openai AsyncOpenAI against shoal's aiohttp adapter, fake upstream, loopback",
        "rounds": args.rounds,
        "requests_per_round": {"c1": args.requests, "c16": args.requests * 4},
        "load_average": {
            "start": [round(x, 2) for x in load_start],
            "end": [round(x, 2) for x in load_end],
            "1min_during": {
                "min": min(loads),
                "median": statistics.median(loads),
                "max": max(loads),
            },
        },
        "clients": figures,
        "openai_minus_shoal": diffs,
        "openai_over_shoal_cpu_per_call": ratios,
        "shoal_postprocess_ms": post_ms,
        "openai_costs_over_0_2ms_per_call": {
            k: v["cpu_ms_per_call"] > 0.2 and v["p50_ms"] > 0.2 for k, v in diffs.items()
        },
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [
        ("shoal", "generate"),
        ("openai", "create"),
        ("aiohttp", "create"),
        ("shoal", "stream"),
        ("openai", "stream"),
        ("aiohttp", "stream"),
    ]
    clients = result["clients"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, c in zip(axes, ("c1", "c16"), strict=True):
        xs = range(len(labels))
        series = (("p50_ms", "p50 latency"), ("cpu_ms_per_call", "CPU per call (client)"))
        for offset, (key, label) in zip((-0.2, 0.2), series, strict=True):
            values = [clients[cl][mode][c][key] for cl, mode in labels]
            bars = ax.bar([x + offset for x in xs], values, width=0.4, label=label)
            ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=7)
        ax.set_xticks(list(xs), [f"{cl}\n{mode}" for cl, mode in labels], fontsize=8)
        ax.set_ylabel("ms")
        ax.set_title(f"concurrency {c[1:]}")
        ax.legend(fontsize=8)
    load = result["load_average"]["1min_during"]["median"]
    fig.suptitle(f"upstream client cost, fake upstream on loopback (load average {load:.1f})")
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--role", choices=["bench", "upstream"], default="bench")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200, help="per round at concurrency 1")
    parser.add_argument("--no-plot", dest="plot", action="store_false")
    args = parser.parse_args()
    if args.role == "upstream":
        run_upstream(args.port)
        return
    result = asyncio.run(bench(args))
    print(json.dumps(result, indent=2))
    if args.plot:
        out = HERE / "out" / "upstream_client.png"
        plot(result, out)
        log(f"plot: {out}")


if __name__ == "__main__":
    main()
