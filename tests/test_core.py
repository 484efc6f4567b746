"""Core types, prices, the public API and the package's fakes."""

from __future__ import annotations

import subprocess
import sys

import pydantic
import pytest

import shoal
from shoal import ChatRequest, FakeModel, FunctionModel, HostPrice, TokenPrice, Usage
from shoal.cards import published_prices
from shoal.messages import Completed, TextDelta


def test_public_api_is_sorted_and_importable() -> None:
    assert shoal.__all__ == sorted(shoal.__all__)
    for name in shoal.__all__:
        assert getattr(shoal, name) is not None


def test_importing_shoal_does_no_io_and_loads_no_backends() -> None:
    probe = (
        "import builtins, socket, sys\n"
        "def refuse(*a, **k): raise AssertionError(f'I/O at import: {a}')\n"
        "builtins.open = refuse\n"
        "socket.socket.connect = refuse\n"
        "import shoal\n"
        "heavy = [m for m in ('llama_cpp', 'aiohttp', 'numpy', 'jsonschema') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True)


def test_requests_validate_their_fields() -> None:
    with pytest.raises(pydantic.ValidationError):
        ChatRequest(messages=())
    with pytest.raises(pydantic.ValidationError):
        ChatRequest.of("hi", max_tokens=0)
    with pytest.raises(pydantic.ValidationError, match="top_logprobs needs logprobs"):
        ChatRequest.of("hi", top_logprobs=3)
    with pytest.raises(pydantic.ValidationError):
        ChatRequest.of("hi", temperature=-1)
    request = ChatRequest.of("hi", system="be brief")
    assert [m.role for m in request.messages] == ["system", "user"]
    assert not request.wants_json
    assert ChatRequest.of("hi", json_object=True).wants_json


def test_token_prices() -> None:
    price = TokenPrice(input_per_mtok=2.5, output_per_mtok=10.0)
    assert price.cost(Usage(input_tokens=1000, output_tokens=200), 99.0) == pytest.approx(0.0045)


def test_host_prices_charge_compute_time_only() -> None:
    price = HostPrice(per_hour=0.09)
    assert price.cost(Usage(input_tokens=10**6), 3600.0) == pytest.approx(0.09)
    assert price.cost(Usage(), 2.0) == pytest.approx(0.00005)


def test_the_bundled_price_table_is_dated_and_complete() -> None:
    table = published_prices()
    assert table.as_of
    for model in ("gpt-4o-mini", "gpt-4o", "gpt-3.5-turbo", "claude-3-haiku", "gemini-1.5-flash"):
        entry = table.get(model)
        assert 0 < entry.input_per_mtok <= entry.output_per_mtok
        assert entry.context >= 16000
    with pytest.raises(shoal.UnknownModelError):
        table.get("gpt-99")


async def test_fake_model_cycles_its_answers_and_streams_them() -> None:
    model = FakeModel(["one two three", "four"])
    assert (await model.generate(ChatRequest.of("a"))).text == "one two three"
    events = [e async for e in model.stream(ChatRequest.of("b"))]
    assert [e.text for e in events if isinstance(e, TextDelta)] == ["four"]
    assert isinstance(events[-1], Completed)
    assert (await model.generate(ChatRequest.of("c"))).text == "one two three"
    assert len(model.calls) == 3


async def test_function_model_costs_and_truncates_like_a_model() -> None:
    model = FunctionModel(
        lambda r: "word " * 10,
        model_id="f",
        price=TokenPrice(input_per_mtok=1e6, output_per_mtok=2e6),
    )
    response = await model.generate(ChatRequest.of("two words", max_tokens=4))
    assert response.finish_reason == "length"
    assert response.usage == Usage(input_tokens=2, output_tokens=4)
    assert response.cost_usd == pytest.approx(2 + 8)


def test_errors_say_whether_to_retry() -> None:
    assert shoal.UpstreamHTTPError(503, "busy").retryable
    assert shoal.UpstreamHTTPError(429, "slow down").retryable
    assert not shoal.UpstreamHTTPError(400, "bad").retryable
    assert shoal.BackendTimeoutError("t").retryable
    assert shoal.OverloadedError("full").retryable
    assert not shoal.ConfigError("c").retryable
    assert not shoal.ContextWindowExceededError("m", 10, 5, 12).retryable


def test_output_errors_carry_the_costed_response() -> None:
    from shoal import ChatResponse, OutputInvalidError
    from shoal.models.output import check_json

    schema = {"type": "object", "properties": {"n": {"minimum": 0}}, "required": ["n"]}
    request = ChatRequest.of("q", json_schema=schema)
    for text in ('{"n": -1}', "not json", '{"m": 1}'):
        response = ChatResponse(
            model="m", text=text, finish_reason="stop", usage=Usage(), latency_s=1, cost_usd=0.5
        )
        with pytest.raises(OutputInvalidError) as caught:
            check_json(request, response)
        assert caught.value.response is response
