"""The server answering with the tiny real model (SmolLM2-135M, in process), through the official
`openai` client over a real socket: a chat, a stream, JSON constrained by a schema, logprobs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import TINY
from openai.types.chat import ChatCompletionMessageParam
from server_support import serving

from shoal import Fleet
from shoal.engine import Engine
from shoal.server import create_app
from shoal.settings import ServerSettings

QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France?"}
]


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    engine = Engine(Fleet(), trace_path=tmp_path_factory.mktemp("traces") / "traces.sqlite")
    yield engine
    asyncio.run(engine.aclose())


@pytest.fixture(scope="module")
def client(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    keys: Path = tmp_path_factory.mktemp("keys") / "keys.sqlite"
    app = create_app(engine, ServerSettings(auth=False, keys_path=keys))
    with serving(app) as url, openai.OpenAI(base_url=url, api_key="-", max_retries=0) as client:
        yield client


def test_chat(client: openai.OpenAI, engine: Engine) -> None:
    reply = client.chat.completions.with_raw_response.create(
        model=TINY, messages=QUESTION, max_tokens=12, logprobs=True, top_logprobs=2
    )
    answer = reply.parse()
    text = answer.choices[0].message.content or ""
    assert text.strip()
    assert answer.model == TINY
    assert answer.usage is not None
    assert 0 < answer.usage.completion_tokens <= 12
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.content is not None
    assert len(logprobs.content) == answer.usage.completion_tokens
    assert all(len(item.top_logprobs) == 2 for item in logprobs.content)
    assert reply.headers["x-shoal-model"] == TINY
    assert reply.headers["x-shoal-route"] == "null"
    cost = float(reply.headers["x-shoal-cost-usd"])
    assert cost > 0
    last = engine.traces.calls()[-1]
    assert (last.model, last.output_tokens) == (TINY, answer.usage.completion_tokens)
    assert last.cost_usd == cost


def test_stream(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=TINY,
            messages=QUESTION,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    usage = chunks[-1].usage
    assert usage is not None
    assert 0 < usage.completion_tokens <= 12
    assert chunks[-1].model_extra is not None
    assert chunks[-1].model_extra["shoal"]["cost_usd"] > 0


def test_json_schema(client: openai.OpenAI) -> None:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
    }
    answer = client.chat.completions.create(
        model=TINY,
        messages=[{"role": "user", "content": "Name the capital of France as JSON."}],
        max_tokens=48,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
    )
    value = json.loads(answer.choices[0].message.content or "")
    assert isinstance(value["city"], str)


def test_prompt_over_the_context_window(client: openai.OpenAI) -> None:
    long = [{"role": "user", "content": "word " * 5000}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=TINY, messages=long, max_tokens=8)  # type: ignore[arg-type]
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "context_length_exceeded"
