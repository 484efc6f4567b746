"""The server's edge without a socket: parsing a request body, the error table, SSE encoding and
metrics. The wire format's own translations are tested in `test_openai_wire.py`."""

from __future__ import annotations

import json

import pytest
from server_support import scraped

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
    ok = {"name": "cheap", "route": "cheap", "model": "tiny"}
    assert scraped(text, "shoal_requests_total", **ok, status="ok") == 1
    assert scraped(text, "shoal_tokens_total", route="cheap", model="tiny", kind="output") == 4
    weird = {"name": 'we"ird', "route": "", "model": "", "status": "model_not_found"}
    assert scraped(text, "shoal_requests_total", **weird) == 1
    latency = "shoal_request_latency_seconds_bucket"
    assert scraped(text, latency, name="cheap", route="cheap", le="0.025") == 1
    assert scraped(text, latency, name="cheap", route="cheap", le="0.01") == 0
    decided = {"route": "cheap", "model": "tiny", "target_met": "true"}
    assert scraped(text, "shoal_route_decisions_total", **decided) == 1
    # The same registry answers in OpenMetrics when a scraper asks for it.
    body, content_type = metrics.exposition("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_metrics_are_per_app_and_include_the_process() -> None:
    first, second = Metrics(), Metrics()
    first.error(status=404, code="model_not_found")
    first.in_flight += 2
    first.overrun_usd = 0.25
    text = first.render()
    assert scraped(text, "shoal_http_errors_total", status="404", code="model_not_found") == 1
    assert scraped(text, "shoal_requests_in_flight") == 2
    assert scraped(text, "shoal_key_overrun_usd_total") == 0.25
    assert (scraped(text, "process_resident_memory_bytes") or 0) > 0
    assert (
        scraped(second.render(), "shoal_http_errors_total", status="404", code="model_not_found")
        is None
    )
