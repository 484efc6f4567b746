"""Helpers for the server tests: shoal's app on a real socket, and a fast fake OpenAI upstream.

Both run on 127.0.0.1 in a background thread with its own event loop, so tests can talk to them
with the official (blocking or async) `openai` client from the test's own loop.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import uvicorn
from aiohttp import web
from conftest import free_port
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import ASGIApp

from shoal.messages import ChatRequest
from shoal.pipeline.graph import ModelStep, Pipeline, PythonStep


@contextmanager
def serving(app: ASGIApp) -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port; yields its base URL (`.../v1`)."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


DYING = "dying"
"""Streams to this upstream model name break after two chunks."""


def completion(text: str, model: str) -> dict[str, Any]:
    words = len(text.split())
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": words, "total_tokens": 5 + words},
    }


async def _fake_chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    model = body.get("model", "fake")
    text = "hello from the fake upstream"
    if not body.get("stream"):
        return web.json_response(completion(text, model))
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    for i, word in enumerate(text.split()):
        chunk = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "delta": {"content": word if i == 0 else " " + word}}],
        }
        await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        if model == DYING and i == 1:  # the upstream dies mid-stream
            assert request.transport is not None
            await asyncio.sleep(0.05)  # let the two chunks leave before the connection drops
            request.transport.abort()
            return response
    last = completion(text, model)
    tail = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        "usage": last["usage"],
    }
    await response.write(b"data: " + json.dumps(tail).encode() + b"\n\ndata: [DONE]\n\n")
    await response.write_eof()
    return response


@contextmanager
def fake_upstream() -> Iterator[str]:
    """A fast OpenAI-compatible upstream that always answers the same five words."""
    port = free_port()
    ready = threading.Event()
    stop: dict[str, asyncio.Event] = {}
    loop_box: dict[str, asyncio.AbstractEventLoop] = {}

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", _fake_chat)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        stop["event"] = asyncio.Event()
        loop_box["loop"] = asyncio.get_running_loop()
        ready.set()
        await stop["event"].wait()
        await runner.cleanup()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("the fake upstream did not start")
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        loop_box["loop"].call_soon_threadsafe(stop["event"].set)
        thread.join(timeout=10)


def scraped(text: str, metric: str, /, **labels: str) -> float | None:
    """The value of one sample in a Prometheus exposition (labels in any order), or None."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == metric and sample.labels == labels:
                return float(sample.value)
    return None


def make_key(path: Path, name: str, *, budget: float | None = None, rpm: int | None = None) -> str:
    from shoal.server.keys import KeyStore

    store = KeyStore(path)
    try:
        return store.create(name, budget_usd=budget, rpm=rpm)[0]
    finally:
        store.close()


# -- a served pipeline: a model shouts the text, then shouts each word ------------------------


def shout(request: ChatRequest) -> str:
    return request.messages[-1].content.upper()


def split(loud: str) -> list[str]:
    return loud.split()


def join(each: list[str | None]) -> str:
    return "-".join(word or "?" for word in each)


def shout_pipeline() -> Pipeline:
    return Pipeline(
        "shout",
        inputs=["text"],
        output="joined",
        steps=[
            ModelStep("loud", model="shouter", prompt="{text}", inputs=("text",), max_tokens=16),
            PythonStep("words", split, inputs=("loud",)),
            ModelStep(
                "each",
                model="shouter",
                prompt="{item}!",
                inputs=("words",),
                map_over="words",
                max_tokens=4,
            ),
            PythonStep("joined", join, inputs=("each",)),
        ],
    )
