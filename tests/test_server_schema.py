"""The server's edge without a socket: parsing a request body, the error table, SSE encoding and
metrics. The wire format's own translations are tested in `test_openai_wire.py`."""

from __future__ import annotations

import json

import pytest

from shoal.errors import InvalidRequestError
from shoal.messages import TextDelta
from shoal.openai_wire import ChunkWriter
from shoal.server import sse
from shoal.server.errors import (
    AuthenticationError,
    BudgetExceededError,
    PayloadTooLargeError,
    RateLimitedError,
    error_reply,
)
from shoal.server.metrics import Metrics
from shoal.server.routes import parse_request


@pytest.mark.parametrize(
    ("body", "kind", "param"),
    [
        (b"{not json", "MalformedRequestError", None),
        (b"", "MalformedRequestError", None),
        (b"[1, 2]", "MalformedRequestError", None),
        (b'{"model": "m"}', "MalformedRequestError", "messages"),
        (
            b'{"model": "m", "messages": [{"role": "tool", "content": "x"}]}',
            "MalformedRequestError",
            None,
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": []}',
            "UnsupportedParameterError",
            "tools",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 3}',
            "UnsupportedParameterError",
            "n",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], '
            b'"presence_penalty": 1}',
            "UnsupportedParameterError",
            "presence_penalty",
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}',
            "MalformedRequestError",
            None,
        ),
        (
            b'{"model": "m", "messages": [{"role": "user", "content": "x"}], '
            b'"stream_options": {"include_usage": true}}',
            "MalformedRequestError",
            None,
        ),
    ],
)
def test_bad_requests_are_named_errors(body: bytes, kind: str, param: str | None) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_request(body)
    assert type(caught.value).__name__ == kind
    reply = error_reply(caught.value)
    assert reply.status == 400
    if param is not None:
        assert reply.body.error.param == param


def test_error_table_statuses() -> None:
    assert error_reply(AuthenticationError("no")).status == 401
    assert error_reply(BudgetExceededError("no")).status == 402
    assert error_reply(PayloadTooLargeError(10)).status == 413
    limited = error_reply(RateLimitedError("slow down", retry_after_s=2.2))
    assert (limited.status, limited.headers["retry-after"]) == (429, "3")
    unexpected = error_reply(RuntimeError("secret prompt text"))
    assert unexpected.status == 500
    assert "secret" not in unexpected.body.error.message


def test_sse_encoding() -> None:
    chunk = ChunkWriter(
        completion_id="c", created=1, model="m", route=None, include_usage=False, logprobs=False
    ).chunks(TextDelta(text="hi"))[0]
    data = sse.encode(sse.Data(chunk))
    assert data.startswith(b"data: {")
    assert data.endswith(b"\n\n")
    assert sse.encode(sse.Done()) == b"data: [DONE]\n\n"
    failure = sse.encode(sse.Failure(error_reply(RateLimitedError("x")).body))
    assert json.loads(failure[6:])["error"]["code"] == "rate_limit_exceeded"


def test_metrics_exposition() -> None:
    metrics = Metrics()
    metrics.request(
        name="cheap",
        route="cheap",
        model="tiny",
        status="ok",
        latency_s=0.02,
        input_tokens=3,
        output_tokens=4,
        cost_usd=1e-6,
    )
    metrics.request(
        name='we"ird', route=None, model=None, status="model_not_found", latency_s=0.001
    )
    metrics.decision(route="cheap", model="tiny", target_met=True)
    text = metrics.render()
    assert 'shoal_requests_total{name="cheap",route="cheap",model="tiny",status="ok"} 1' in text
    assert 'shoal_tokens_total{route="cheap",model="tiny",kind="output"} 4' in text
    assert 'name="we\\"ird"' in text
    assert 'shoal_request_latency_seconds_bucket{name="cheap",route="cheap",le="0.025"} 1' in text
    assert 'shoal_request_latency_seconds_bucket{name="cheap",route="cheap",le="0.01"} 0' in text
    assert 'shoal_route_decisions_total{route="cheap",model="tiny",target_met="true"} 1' in text
