"""The server over a real socket, driven by the official `openai` client, with fake models.

Every answer, stream and error is checked as a client sees it: the OpenAI fields, shoal's
headers and `shoal` object, and the OpenAI-style error body with its status.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from server_support import make_key, scraped, serving
from starlette.applications import Starlette

from shoal import FakeModel, Fleet, FunctionModel, TokenPrice
from shoal.engine import Engine
from shoal.errors import (
    BackendError,
    BackendTimeoutError,
    ContextWindowExceededError,
    OverloadedError,
)
from shoal.messages import ChatRequest, ChatResponse, RouteDecision, TokenLogprob
from shoal.server import create_app
from shoal.server.keys import KeyStore
from shoal.server.openapi import openapi_spec
from shoal.settings import ServerSettings

USER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there shoal"}]
PRICE = TokenPrice(input_per_mtok=0.0, output_per_mtok=10_000.0)  # one cent per output token
MAX_BODY = 8192


class RoutedFake(FunctionModel):
    """A stand-in for a route: answers like a FunctionModel and reports its decision."""

    def _response(self, request: ChatRequest, text: str, started: float) -> ChatResponse:
        response = super()._response(request, text, started)
        decision = RouteDecision(
            route="cheap", models=(self.id,), reason="the cheapest model that meets the target"
        )
        return response.model_copy(update={"decision": decision})


class LogprobFake(FunctionModel):
    def _response(self, request: ChatRequest, text: str, started: float) -> ChatResponse:
        response = super()._response(request, text, started)
        if not request.logprobs:
            return response
        top = (("yes", -0.05), ("no", -3.0))[: request.top_logprobs]
        return response.model_copy(
            update={"logprobs": (TokenLogprob(token="yes", logprob=-0.05, top=top),)}
        )


def _raises(exc: Exception) -> FunctionModel:
    def fail(request: ChatRequest) -> str:
        raise exc

    return FunctionModel(fail, model_id="failing")


def _json_answer(request: ChatRequest) -> str:
    if request.json_schema is not None:
        return json.dumps({"city": "Paris"})
    if request.json_object:
        return json.dumps({"ok": True})
    return "not json"


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    engine = Engine(Fleet(), trace_path=tmp_path_factory.mktemp("traces") / "traces.sqlite")
    engine.add_route("echo", FakeModel())
    engine.add_route("cheap", RoutedFake(lambda r: "Paris is the capital", model_id="tiny-fake"))
    engine.add_route("priced", FunctionModel(lambda r: "a b c d", model_id="priced", price=PRICE))
    engine.add_route("json", FunctionModel(_json_answer, model_id="json-fake"))
    engine.add_route("logprobs", LogprobFake(lambda r: "yes", model_id="lp-fake"))
    engine.add_route("too-long", _raises(ContextWindowExceededError("failing", 5000, 256, 4096)))
    engine.add_route("busy", _raises(OverloadedError("all queues full", retry_after_s=2)))
    engine.add_route("broken", _raises(BackendError("upstream exploded")))
    engine.add_route("stuck", _raises(BackendTimeoutError("no answer within 1 s")))
    yield engine
    asyncio.run(engine.aclose())


@pytest.fixture(scope="module")
def key(keys_path: Path) -> str:
    return make_key(keys_path, "main")


@pytest.fixture(scope="module")
def app(engine: Engine, keys_path: Path) -> Starlette:
    return create_app(engine, ServerSettings(keys_path=keys_path, max_body_bytes=MAX_BODY))


@pytest.fixture(scope="module")
def base_url(app: Starlette) -> Iterator[str]:
    with serving(app) as url:
        yield url


@pytest.fixture(scope="module")
def server_keys(app: Starlette) -> KeyStore:
    """The server's own key store (reads through it see every charge it settled)."""
    keys = app.state.shoal.keys
    assert isinstance(keys, KeyStore)
    return keys


@pytest.fixture
def client(base_url: str, key: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=base_url, api_key=key, max_retries=0) as client:
        yield client


def raw(
    url: str,
    *,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    method: str = "POST",
) -> tuple[int, dict[str, str], Any]:
    """One plain HTTP request: status, headers and JSON body, whatever the status."""
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, dict(reply.headers), json.loads(reply.read() or b"null")
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers), json.loads(exc.read() or b"null")


def assert_error_body(body: Any, code: str) -> dict[str, Any]:
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["code"] == code
    assert isinstance(error["message"], str)
    assert error["message"]
    return dict(error)


# -- answers ---------------------------------------------------------------------------------


def test_chat_through_a_route_name(client: openai.OpenAI, engine: Engine) -> None:
    raw_reply = client.chat.completions.with_raw_response.create(model="cheap", messages=USER)
    completion = raw_reply.parse()
    assert completion.choices[0].message.content == "Paris is the capital"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "tiny-fake"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 4)
    headers = raw_reply.headers
    assert headers["x-shoal-model"] == "tiny-fake"
    route = json.loads(headers["x-shoal-route"])
    assert route["route"] == "cheap"
    assert route["models"] == ["tiny-fake"]
    assert route["reason"] == "the cheapest model that meets the target"
    assert float(headers["x-shoal-cost-usd"]) > 0
    assert float(headers["x-shoal-latency-ms"]) >= 0
    info = completion.model_extra["shoal"] if completion.model_extra else None
    assert info is not None
    assert info["cost_usd"] == float(headers["x-shoal-cost-usd"])
    assert info["decision"]["route"] == "cheap"
    last = engine.traces.calls()[-1]
    assert (last.model, last.route, last.status) == ("tiny-fake", "cheap", "ok")
    assert last.decision is not None
    assert last.decision["reason"] == route["reason"]


def test_chat_with_a_model_id_has_no_route(client: openai.OpenAI) -> None:
    reply = client.chat.completions.with_raw_response.create(model="echo", messages=USER)
    assert reply.parse().choices[0].message.content == "hello there shoal"
    assert reply.headers["x-shoal-route"] == '{"route": "echo"}'


@pytest.mark.parametrize("include_usage", [True, False])
def test_stream(client: openai.OpenAI, include_usage: bool) -> None:
    options: Any = {"include_usage": True} if include_usage else openai.NOT_GIVEN
    with client.chat.completions.with_streaming_response.create(
        model="cheap", messages=USER, stream=True, stream_options=options
    ) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        assert json.loads(reply.headers["x-shoal-route"]) == {"route": "cheap"}
        chunks = list(reply.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Paris is the capital"
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    last = chunks[-1]
    assert last.model == "tiny-fake"
    assert last.model_extra is not None
    info = last.model_extra["shoal"]
    assert info["decision"]["route"] == "cheap"
    if include_usage:
        assert last.choices == []
        assert last.usage is not None
        assert last.usage.completion_tokens == 4
    else:
        assert all(c.usage is None for c in chunks)


def test_streamed_and_unstreamed_calls_cost_the_same(
    base_url: str, keys_path: Path, server_keys: KeyStore
) -> None:
    key = make_key(keys_path, "same-cost", budget=10.0)
    store = server_keys
    with openai.OpenAI(base_url=base_url, api_key=key, max_retries=0) as client:
        plain = client.chat.completions.with_raw_response.create(
            model="priced", messages=USER, max_tokens=8
        )
        spent_plain = store.record("same-cost").spent_usd  # type: ignore[union-attr]
        chunks = list(
            client.chat.completions.create(
                model="priced",
                messages=USER,
                max_tokens=8,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    spent_both = store.record("same-cost").spent_usd  # type: ignore[union-attr]
    streamed = chunks[-1].model_extra["shoal"]["cost_usd"]  # type: ignore[index]
    assert float(plain.headers["x-shoal-cost-usd"]) == streamed == pytest.approx(0.04)
    assert spent_plain == pytest.approx(0.04, abs=1e-12)
    assert spent_both == pytest.approx(0.08, abs=1e-12)


def test_json_modes(client: openai.OpenAI, engine: Engine) -> None:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    }
    answer = client.chat.completions.create(
        model="json",
        messages=USER,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": schema, "strict": True},
        },
    )
    assert json.loads(answer.choices[0].message.content or "") == {"city": "Paris"}
    plain = client.chat.completions.create(
        model="json", messages=USER, response_format={"type": "json_object"}
    )
    assert json.loads(plain.choices[0].message.content or "") == {"ok": True}
    model = engine.model("json")
    assert isinstance(model, FunctionModel)
    assert model.calls[-2].json_schema == schema
    assert model.calls[-1].json_object


def test_logprobs(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model="logprobs", messages=USER, logprobs=True, top_logprobs=2
    )
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.content is not None
    assert logprobs.content[0].token == "yes"
    assert [t.token for t in logprobs.content[0].top_logprobs] == ["yes", "no"]
    plain = client.chat.completions.create(model="logprobs", messages=USER)
    assert plain.choices[0].logprobs is None


def test_models_lists_models_and_routes(client: openai.OpenAI, engine: Engine) -> None:
    listed = client.models.list().data
    assert [m.id for m in listed] == engine.names
    kinds = {m.id: (m.model_extra or {})["shoal"]["kind"] for m in listed}
    assert kinds["smollm2-135m"] == "model"
    assert kinds["cheap"] == "route"


def test_health_metrics_and_openapi(client: openai.OpenAI, base_url: str) -> None:
    client.chat.completions.create(model="cheap", messages=USER)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=USER)
    root = base_url.removesuffix("/v1")
    status, _, health = raw(f"{root}/healthz", method="GET")
    assert status == 200
    assert health["status"] == "ok"
    with urllib.request.urlopen(f"{root}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    answered = {"name": "cheap", "route": "cheap", "model": "tiny-fake", "status": "ok"}
    assert (scraped(text, "shoal_requests_total", **answered) or 0) >= 1
    decided = {"route": "cheap", "model": "tiny-fake", "target_met": "true"}
    assert (scraped(text, "shoal_route_decisions_total", **decided) or 0) >= 1
    errors = scraped(text, "shoal_http_errors_total", status="404", code="model_not_found")
    assert (errors or 0) >= 1
    assert (scraped(text, "process_cpu_seconds_total") or 0) > 0
    status, _, spec = raw(f"{root}/openapi.json", method="GET")
    assert status == 200
    assert (
        "cheap"
        in spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]["model"]["examples"]
    )


# -- errors, as the client sees them ---------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "status", "code", "kind"),
    [
        ("no-such-model", 404, "model_not_found", openai.NotFoundError),
        ("too-long", 400, "context_length_exceeded", openai.BadRequestError),
        ("busy", 503, "overloaded", openai.InternalServerError),
        ("broken", 502, "upstream_error", openai.InternalServerError),
        ("stuck", 504, "upstream_timeout", openai.InternalServerError),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_model_errors(
    client: openai.OpenAI,
    model: str,
    status: int,
    code: str,
    kind: type[openai.APIStatusError],
    stream: bool,
) -> None:
    with pytest.raises(kind) as caught:
        client.chat.completions.create(model=model, messages=USER, stream=stream)
    assert caught.value.status_code == status
    error = assert_error_body(caught.value.body and {"error": caught.value.body}, code)
    if code == "model_not_found":
        assert error["param"] == "model"
        assert "cheap" in error["message"]
        assert "smollm2-135m" in error["message"]
    if code == "overloaded":
        assert caught.value.response.headers["retry-after"] == "2"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ],
)
def test_unsupported_parameters_are_named(
    client: openai.OpenAI, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="echo", messages=USER, **fields)
    error = assert_error_body({"error": caught.value.body}, "unsupported_parameter")
    assert error["param"] == param
    assert param in error["message"]


def test_malformed_json_is_400(base_url: str, key: str) -> None:
    auth = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    status, _, body = raw(f"{base_url}/chat/completions", body=b'{"model": "echo", ', headers=auth)
    assert status == 400
    assert_error_body(body, "invalid_request")
    status, _, body = raw(
        f"{base_url}/chat/completions", body=b'{"model": "echo", "messages": []}', headers=auth
    )
    assert status == 400
    assert assert_error_body(body, "invalid_request")["param"] == "messages"


def test_oversize_body_is_413(client: openai.OpenAI) -> None:
    big = [{"role": "user", "content": "x" * (MAX_BODY + 1)}]
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="echo", messages=big)  # type: ignore[arg-type]
    assert caught.value.status_code == 413
    assert_error_body({"error": caught.value.body}, "request_too_large")


def test_missing_or_bad_key_is_401(base_url: str) -> None:
    body = json.dumps({"model": "echo", "messages": USER}).encode()
    status, _, reply = raw(f"{base_url}/chat/completions", body=body)
    assert status == 401
    assert_error_body(reply, "invalid_api_key")
    with openai.OpenAI(base_url=base_url, api_key="sk-shoal-wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            client.chat.completions.create(model="echo", messages=USER)
        assert_error_body({"error": caught.value.body}, "invalid_api_key")
        with pytest.raises(openai.AuthenticationError):
            client.models.list()


def test_revoked_key_is_401_from_the_next_request(base_url: str, keys_path: Path) -> None:
    key = make_key(keys_path, "soon-revoked")
    with openai.OpenAI(base_url=base_url, api_key=key, max_retries=0) as client:
        client.chat.completions.create(model="echo", messages=USER)
        store = KeyStore(keys_path)  # as `shoal keys revoke` does, while the server runs
        store.revoke("soon-revoked")
        store.close()
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="echo", messages=USER)


def test_exhausted_budget_is_402(base_url: str, keys_path: Path) -> None:
    key = make_key(keys_path, "poor", budget=0.05)
    with openai.OpenAI(base_url=base_url, api_key=key, max_retries=0) as client:
        # max_tokens 4 at a cent a token: a worst case of $0.04, then $0.01 is left.
        client.chat.completions.create(model="priced", messages=USER, max_tokens=4)
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="priced", messages=USER, max_tokens=4)
        assert caught.value.status_code == 402
        error = assert_error_body({"error": caught.value.body}, "budget_exceeded")
        assert "max_tokens" in error["message"]
        # A call whose worst case fits what is left still goes through.
        client.chat.completions.create(model="priced", messages=USER, max_tokens=1)


def test_rate_limit_is_429_with_retry_after(base_url: str, keys_path: Path) -> None:
    key = make_key(keys_path, "slow", rpm=2)
    with openai.OpenAI(base_url=base_url, api_key=key, max_retries=0) as client:
        client.chat.completions.create(model="echo", messages=USER)
        client.chat.completions.create(model="echo", messages=USER)
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="echo", messages=USER)
    assert_error_body({"error": caught.value.body}, "rate_limit_exceeded")
    assert int(caught.value.response.headers["retry-after"]) >= 1


def test_unknown_path_and_method_are_json(base_url: str, key: str) -> None:
    auth = {"authorization": f"Bearer {key}"}
    status, _, body = raw(f"{base_url}/nothing", headers=auth, method="GET")
    assert status == 404
    assert_error_body(body, "not_found")
    status, _, body = raw(f"{base_url}/chat/completions", headers=auth, method="GET")
    assert status == 405
    assert_error_body(body, "method_not_allowed")


def test_metrics_can_require_a_key(engine: Engine, tmp_path: Path) -> None:
    keys_path = tmp_path / "keys.sqlite"  # one server per keys file
    key = make_key(keys_path, "scraper")
    app = create_app(engine, ServerSettings(keys_path=keys_path, metrics_auth=True))
    with serving(app) as url:
        root = url.removesuffix("/v1")
        status, _, body = raw(f"{root}/metrics", method="GET")
        assert status == 401
        assert_error_body(body, "invalid_api_key")
        wrong = {"authorization": "Bearer sk-shoal-wrong"}
        assert raw(f"{root}/metrics", headers=wrong, method="GET")[0] == 401
        scrape = urllib.request.Request(
            f"{root}/metrics", headers={"authorization": f"Bearer {key}"}
        )
        with urllib.request.urlopen(scrape, timeout=10) as reply:
            assert reply.status == 200
            assert reply.headers["content-type"].startswith("text/plain")
            text = reply.read().decode()
    errors = scraped(text, "shoal_http_errors_total", status="401", code="invalid_api_key")
    assert errors == 2
    spec = openapi_spec(names=["echo"], auth=True, metrics_auth=True)["paths"]["/metrics"]["get"]
    assert spec["security"] == [{"bearer": []}]
    assert "401" in spec["responses"]
    with pytest.raises(ValueError, match="metrics_auth needs auth"):
        ServerSettings(auth=False, metrics_auth=True)
