"""The dashboard over HTTP (a real server on a real socket, real SQLite): who may see it, CSRF,
escaping, the overview's totals (and time to first token) against the traces, the request log's
pages and filters, one request's decision and its recorded prompt in the playground, the
playground's answers and their errors, keys, sessions that outlast a restart, runs, and the
routes' calibration reports and shadows. The same pages in a real browser are in
test_ui_browser.py."""

from __future__ import annotations

import asyncio
import hashlib
import html
import json
import math
import random
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from server_support import serving
from typer.testing import CliRunner
from ui_support import (
    ROUTES_FLEET,
    Client,
    Site,
    csrf_of,
    make_admin_key,
    make_engine,
    routes_site,
    sign_in,
    site,
)

from shoal.cli.main import app as cli
from shoal.compare import Comparison, pairs_from_table
from shoal.engine import Engine
from shoal.errors import ConfigError
from shoal.fleet import Fleet
from shoal.routing.config import route_state_path
from shoal.routing.report import read_report, report_path
from shoal.server import create_app
from shoal.server.keys import KeyStore
from shoal.server.sessions import Sessions
from shoal.server.ui import route_info
from shoal.server.ui.web import PAGE_SIZE
from shoal.settings import PredictiveRouteSpec, ServerSettings
from shoal.traces import rollups
from shoal.traces.store import CallRecord

PAGES = ["/ui/", "/ui/requests", "/ui/requests/1", "/ui/keys", "/ui/routes", "/ui/runs"]
PAGES += ["/ui/playground", "/ui/runs/x"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    with site(tmp_path_factory.mktemp("ui")) as running:
        client = openai.OpenAI(
            base_url=running.root + "/v1", api_key=running.user_key, max_retries=0
        )
        for prompt in ("hi", "a much longer prompt, which the route sends to the dear model"):
            client.chat.completions.create(
                model="short-first", messages=[{"role": "user", "content": prompt}]
            )
        yield running


@pytest.fixture
def admin(server: Site) -> Client:
    client = Client(server.root)
    assert sign_in(client, server.admin_key).status == 303
    return client


# -- who may see it ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PAGES)
def test_every_page_without_the_cookie_redirects_to_sign_in(server: Site, path: str) -> None:
    reply = Client(server.root).get(path)
    assert reply.status == 303
    assert reply.headers["location"].startswith("/ui/login?next=")
    assert "short-first" not in reply.text


def test_a_fragment_without_the_cookie_is_a_401_that_tells_htmx_to_sign_in(server: Site) -> None:
    reply = Client(server.root).get(
        "/ui/requests", headers={"hx-request": "true", "hx-target": "log"}
    )
    assert reply.status == 401
    assert reply.headers["hx-redirect"] == "/ui/login"
    assert reply.text == ""


def test_the_playground_answers_no_one_without_a_session(server: Site) -> None:
    reply = Client(server.root).post(
        "/ui/playground/answer", body={"target": "cheap", "prompt": "hi"}
    )
    assert reply.status == 303
    assert "data:" not in reply.text


def test_sign_in_sets_an_httponly_samesite_cookie_and_returns_where_asked(server: Site) -> None:
    client = Client(server.root)
    page = client.get("/ui/login?next=%2Fui%2Fkeys")
    token = re.search(r'name="login_token" value="([^"]+)"', page.text)
    assert token is not None
    reply = client.post(
        "/ui/login",
        form={"login_token": token.group(1), "key": server.admin_key, "next": "/ui/keys"},
    )
    assert reply.status == 303
    assert reply.headers["location"] == "/ui/keys"
    cookie = next(c for c in reply.set_cookies if c.startswith("shoal_ui="))
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert "Path=/ui" in cookie
    assert server.admin_key not in cookie  # the browser holds a session id, never the key
    assert client.get("/ui/keys").status == 200


def test_sign_in_never_sends_anyone_to_another_site(server: Site) -> None:
    client = Client(server.root)
    page = client.get("/ui/login")
    token = re.search(r'name="login_token" value="([^"]+)"', page.text)
    assert token is not None
    reply = client.post(
        "/ui/login",
        form={"login_token": token.group(1), "key": server.admin_key, "next": "//evil.test/"},
    )
    assert reply.headers["location"] == "/ui/"


@pytest.mark.parametrize(
    ("which", "status", "message"),
    [
        ("wrong", 401, "not valid"),
        ("user", 403, "is not an admin key"),
        ("empty", 400, "Paste an admin key"),
    ],
)
def test_sign_in_refuses_keys_that_are_not_admin_keys(
    server: Site, which: str, status: int, message: str
) -> None:
    key = {"wrong": "sk-shoal-nope", "user": server.user_key, "empty": ""}[which]
    client = Client(server.root)
    reply = sign_in(client, key)
    assert reply.status == status
    assert message in reply.text
    assert "shoal_ui" not in client.cookies
    assert client.get("/ui/").status == 303


def test_sign_in_without_its_form_token_is_refused(server: Site) -> None:
    client = Client(server.root)
    reply = client.post("/ui/login", form={"key": server.admin_key})
    assert reply.status == 403
    assert "expired" in reply.text
    assert "shoal_ui" not in client.cookies


def test_sign_out_ends_the_session(server: Site, admin: Client) -> None:
    page = admin.get("/ui/")
    session = admin.cookies["shoal_ui"]
    reply = admin.post("/ui/logout", form={"csrf": csrf_of(page.text)})
    assert reply.status == 303
    again = Client(server.root, cookies={"shoal_ui": session})  # the old cookie, replayed
    assert again.get("/ui/").status == 303


# -- CSRF and escaping ---------------------------------------------------------------------------


def test_a_form_without_its_csrf_token_changes_nothing(server: Site, admin: Client) -> None:
    for form in ({"name": "sneaky"}, {"name": "sneaky", "csrf": "forged"}):
        reply = admin.post("/ui/keys", form=form)
        assert reply.status == 403
        assert "CSRF" in reply.text
    assert admin.post("/ui/keys/app/revoke", form={"csrf": "forged"}).status == 403
    store = KeyStore(server.keys_path)
    try:
        assert store.record("sneaky") is None
        record = store.record("app")
        assert record is not None
        assert not record.revoked
    finally:
        store.close()


def test_the_playground_needs_the_csrf_header(server: Site, admin: Client) -> None:
    reply = admin.post("/ui/playground/answer", body={"target": "cheap", "prompt": "hi"})
    assert reply.status == 403


def test_text_from_the_traffic_is_escaped(server: Site, admin: Client) -> None:
    csrf = csrf_of(admin.get("/ui/keys").text)
    name = "<script>alert(1)</script>"
    reply = admin.post("/ui/keys", form={"csrf": csrf, "name": name})
    assert reply.status == 200
    assert name not in reply.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in reply.text


# -- the overview --------------------------------------------------------------------------------


def figures(page: str) -> dict[str, str]:
    found = re.findall(r'data-figure="(\w+)"(?: data-value="([^"]*)")?>([^<]*)<', page)
    return {name: value or text for name, value, text in found}


def test_the_overview_totals_equal_what_the_traces_hold(server: Site, admin: Client) -> None:
    page = admin.get("/ui/?window=all")
    assert page.status == 200
    calls = server.engine.traces.calls()
    shown = figures(page.text)
    assert int(shown["calls"]) == len(calls)
    assert int(shown["tokens"]) == sum(c.input_tokens + c.output_tokens for c in calls)
    assert float(shown["cost"]) == pytest.approx(sum(c.cost_usd for c in calls), abs=1e-12)
    assert int(shown["errors"]) == sum(c.status != "ok" for c in calls)
    # The route's calls: one to each model, against the dear model's expected cost twice.
    assert "short-first" in page.text
    assert re.search(r"cheap \d+%", page.text)


def test_the_overview_refuses_an_unknown_window(admin: Client) -> None:
    reply = admin.get("/ui/?window=fortnight")
    assert reply.status == 400
    assert "unknown window 'fortnight'" in html.unescape(reply.text)


# -- requests ------------------------------------------------------------------------------------


def test_the_log_is_paginated_and_filtered_on_the_server(server: Site, admin: Client) -> None:
    now = time.time()
    server.engine.traces.record_calls(
        [
            CallRecord(
                model="paged", status="ok" if i % 3 else "error", latency_s=0.01, finished_at=now
            )
            for i in range(PAGE_SIZE + 10)
        ]
    )
    first = admin.get("/ui/requests?model=paged")
    assert first.status == 200
    assert first.text.count("<td>paged</td>") == PAGE_SIZE
    assert f"{PAGE_SIZE + 10} matching requests" in first.text
    older = re.search(r'rel="next" href="([^"]+)"', first.text)
    assert older is not None
    second = admin.get(older.group(1).replace("&amp;", "&"))
    assert second.text.count("<td>paged</td>") == 10
    assert 'rel="next"' not in second.text
    errors = admin.get("/ui/requests?model=paged&status=error")
    assert errors.text.count("<td>paged</td>") == (PAGE_SIZE + 10 + 2) // 3
    assert f"{(PAGE_SIZE + 10 + 2) // 3} matching requests" in errors.text
    recent = admin.get("/ui/requests?model=paged&window=1h")
    assert recent.text.count("<td>paged</td>") == PAGE_SIZE
    assert "matching requests" not in recent.text  # no rollup counts a moving window
    assert admin.get("/ui/requests?window=fortnight").status == 400
    fragment = admin.get(
        "/ui/requests?model=paged", headers={"hx-request": "true", "hx-target": "log"}
    )
    assert "<html" not in fragment.text
    assert fragment.text.count("<td>paged</td>") == PAGE_SIZE


def test_the_log_refuses_a_cursor_that_is_not_an_id(admin: Client) -> None:
    reply = admin.get("/ui/requests?before=abc")
    assert reply.status == 400
    assert "'before' must be a call id" in html.unescape(reply.text)


def test_one_request_shows_its_decision(server: Site, admin: Client) -> None:
    routed = [c for c in server.engine.traces.calls() if c.route == "short-first"]
    dear = next(c for c in routed if c.model == "dear")
    page = admin.get(f"/ui/requests/{dear.id}")
    assert page.status == 200
    assert "long prompt: dear is expected to do" in page.text
    assert re.search(r'<tr class="chosen"><td>dear ✓</td><td class="n">0.900</td>', page.text)
    assert "<td>cheap</td>" in page.text  # the candidate that lost, with its estimates
    assert "/ui/playground?target=short-first" in page.text
    assert admin.get("/ui/requests/999999").status == 404


# -- the playground ------------------------------------------------------------------------------


def answer_events(text: str) -> list[dict[str, object]]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


def test_the_playground_streams_an_answer_charged_to_the_admin_key(
    server: Site, admin: Client
) -> None:
    csrf = csrf_of(admin.get("/ui/playground").text)
    before = _spent(server, "ops")
    reply = admin.post(
        "/ui/playground/answer",
        body={"target": "short-first", "prompt": "hi there"},
        headers={"x-csrf-token": csrf},
    )
    assert reply.status == 200
    events = answer_events(reply.text)
    assert "".join(str(e["delta"]) for e in events if e["delta"]) == "cheap answer"
    done = events[-1]["done"]
    assert isinstance(done, dict)
    assert done["model"] == "cheap"
    assert done["decision"]["models"] == ["cheap"]  # type: ignore[index]
    charged = before + float(done["cost_usd"])
    deadline = time.monotonic() + 5  # the server writes settled charges a moment later
    while _spent(server, "ops") != pytest.approx(charged, abs=1e-12):
        assert time.monotonic() < deadline, (_spent(server, "ops"), charged)
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"target": "nope", "prompt": "hi"}, 404, "nope"),
        ({"target": "cheap", "prompt": ""}, 400, "prompt"),
        ({"target": "cheap", "prompt": "hi", "json_schema": "{not json"}, 400, "not valid JSON"),
        ({"target": "cheap", "prompt": "hi", "json_schema": "[1]"}, 400, "must be an object"),
        ({"target": "cheap", "prompt": "hi", "temperature": 9}, 400, "temperature"),
        ({"target": "cheap", "prompt": "hi", "top_k": 3}, 400, "top_k"),
    ],
)
def test_the_playground_names_what_is_wrong_with_a_request(
    admin: Client, body: dict[str, object], status: int, message: str
) -> None:
    csrf = csrf_of(admin.get("/ui/playground").text)
    reply = admin.post("/ui/playground/answer", body=body, headers={"x-csrf-token": csrf})
    assert reply.status == status
    assert message in json.loads(reply.text)["error"]["message"]


def _spent(server: Site, name: str) -> float:
    store = KeyStore(server.keys_path)
    try:
        record = store.record(name)
        assert record is not None
        return record.spent_usd
    finally:
        store.close()


# -- keys ----------------------------------------------------------------------------------------


def test_a_key_created_is_shown_once_and_works_until_revoked(server: Site, admin: Client) -> None:
    csrf = csrf_of(admin.get("/ui/keys").text)
    reply = admin.post(
        "/ui/keys", form={"csrf": csrf, "name": "mobile", "budget": "0.5", "rpm": "30"}
    )
    assert reply.status == 200
    secret = re.search(r"<code class=\"secret\" data-secret>([^<]+)</code>", reply.text)
    assert secret is not None
    key = secret.group(1)
    assert key not in admin.get("/ui/keys").text  # never shown again
    models = openai.OpenAI(base_url=server.root + "/v1", api_key=key, max_retries=0)
    assert models.models.list().data
    assert admin.post("/ui/keys/mobile/revoke", form={"csrf": csrf}).status == 303
    with pytest.raises(openai.AuthenticationError):
        models.models.list()
    assert 'data-key="mobile" class="revoked"' in admin.get("/ui/keys").text


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"name": ""}, "a key needs a name"),
        ({"name": "app"}, "already exists"),
        ({"name": "x1", "budget": "lots"}, "budget must be a number"),
        ({"name": "x2", "budget": "-1"}, "cannot be negative"),
        ({"name": "x3", "rpm": "1.5"}, "rpm must be a whole number"),
    ],
)
def test_creating_a_key_names_what_is_wrong(
    admin: Client, form: dict[str, str], message: str
) -> None:
    csrf = csrf_of(admin.get("/ui/keys").text)
    reply = admin.post("/ui/keys", form={"csrf": csrf, **form})
    assert reply.status == 400
    assert message in html.unescape(reply.text)


def test_a_revoked_admin_key_ends_its_sessions(server: Site) -> None:
    client = Client(server.root)
    page = sign_in(client, server.admin_key)
    assert page.status == 303
    csrf = csrf_of(client.get("/ui/keys").text)
    reply = client.post("/ui/keys", form={"csrf": csrf, "name": "second-admin", "admin": "on"})
    secret = re.search(r"data-secret>([^<]+)<", reply.text)
    assert secret is not None
    other = Client(server.root)
    assert sign_in(other, secret.group(1)).status == 303
    assert other.get("/ui/").status == 200
    assert client.post("/ui/keys/second-admin/revoke", form={"csrf": csrf}).status == 303
    assert other.get("/ui/").status == 303


def test_keys_files_from_before_admin_keys_open_with_no_admin(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE keys (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, hash TEXT NOT NULL "
        "UNIQUE, hint TEXT NOT NULL, budget_pusd INTEGER, spent_pusd INTEGER NOT NULL DEFAULT 0,"
        " requests INTEGER NOT NULL DEFAULT 0, rpm INTEGER, revoked INTEGER NOT NULL DEFAULT 0,"
        " created_at REAL NOT NULL)"
    )
    db.execute(
        "INSERT INTO keys (id, name, hash, hint, created_at) VALUES ('k', 'old', 'h', 'x', 0)"
    )
    db.commit()
    db.close()
    store = KeyStore(path)
    try:
        old = store.record("old")
        assert old is not None
        assert not old.admin
    finally:
        store.close()


def test_the_command_line_creates_an_admin_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.sqlite"
    result = CliRunner().invoke(cli, ["keys", "create", "ops", "--admin", "--keys", str(path)])
    assert result.exit_code == 0, result.output
    assert "admin (signs in to /ui)" in result.output
    store = KeyStore(path)
    try:
        record = store.record("ops")
        assert record is not None
        assert record.admin
    finally:
        store.close()


# -- runs and routes -----------------------------------------------------------------------------


def test_a_run_started_from_the_form_shows_its_waterfall(server: Site, admin: Client) -> None:
    csrf = csrf_of(admin.get("/ui/runs").text)
    reply = admin.post(
        "/ui/runs",
        form={"csrf": csrf, "pipeline": "shout", "input.text": "hello big world"},
    )
    assert reply.status == 303
    location = reply.headers["location"]
    deadline = time.monotonic() + 30
    while 'id="run-status" class="status-ok"' not in (page := admin.get(location)).text:
        assert time.monotonic() < deadline, page.text
        time.sleep(0.1)
    assert page.text.count('class="bar-row"') == 4  # loud, then each of three words
    assert "each[" in page.text
    steps = page.text.split('id="steps"', 1)[1]
    assert re.search(r"<td>each</td><td class=\"status-ok\">ok</td><td class=\"n\">3</td>", steps)


@pytest.mark.parametrize(
    ("form", "status", "message"),
    [
        ({"pipeline": "nope"}, 404, "nope"),
        ({"pipeline": "shout", "input.text": "x", "budget_usd": "free"}, 400, "a number"),
        ({"pipeline": "shout", "input.text": "x", "deadline_s": "-3"}, 400, "positive"),
    ],
)
def test_starting_a_run_names_what_is_wrong(
    admin: Client, form: dict[str, str], status: int, message: str
) -> None:
    csrf = csrf_of(admin.get("/ui/runs").text)
    reply = admin.post("/ui/runs", form={"csrf": csrf, **form})
    assert reply.status == status
    assert message in html.unescape(reply.text)


def test_the_routes_page_lists_each_route_and_its_candidates(admin: Client) -> None:
    page = admin.get("/ui/routes")
    assert page.status == 200
    assert "short-first" in page.text
    assert "ShortFirst" in page.text
    assert "<td>dear</td>" in page.text


def test_a_server_without_keys_has_no_one_to_sign_in(tmp_path: Path) -> None:
    engine = Engine(trace_path=tmp_path / "traces.sqlite")
    app = create_app(engine, ServerSettings(auth=False, keys_path=tmp_path / "keys.sqlite"))
    try:
        with serving(app) as url:
            client = Client(url.removesuffix("/v1"))
            assert client.get("/ui/").status == 303
            page = client.get("/ui/login")
            assert page.status == 503
            assert "--no-auth" in page.text
            assert sign_in(client, "sk-shoal-anything").status == 503
            assert client.get("/ui/").status == 303
    finally:
        asyncio.run(engine.aclose())


# -- time to first token -------------------------------------------------------------------------


def exact_quantile(values: list[float], q: float) -> float:
    """The ceil(q * n)-th smallest value: the one the histogram's bucket must hold."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def same_bucket(estimate: float, exact: float) -> bool:
    slot = rollups.histogram_slot(exact, rollups.TTFT_BOUNDS_S)
    low = 0.0 if slot == 0 else rollups.TTFT_BOUNDS_S[slot - 1]
    high = rollups.TTFT_BOUNDS_S[slot] if slot < len(rollups.TTFT_BOUNDS_S) else low * 2
    return low <= estimate <= high


def test_the_overview_shows_time_to_first_token_p50_and_p95_of_the_calls(
    server: Site, admin: Client
) -> None:
    rng = random.Random(5)
    now = time.time()
    server.engine.traces.record_calls(
        [
            CallRecord(model="streamer", ttft_s=rng.lognormvariate(-3, 1), finished_at=now)
            for _ in range(300)
        ]
    )
    page = admin.get("/ui/?window=all")
    found = re.search(r'data-figure="ttft" data-p50="([^"]+)" data-p95="([^"]+)"', page.text)
    assert found is not None
    streamed = [c.ttft_s for c in server.engine.traces.calls() if c.ttft_s is not None]
    assert len(streamed) >= 300
    for shown, q in ((found.group(1), 0.5), (found.group(2), 0.95)):
        assert same_bucket(float(shown), exact_quantile(streamed, q)), (shown, q)
    assert "Time to first token p50 / p95" in page.text
    assert f"of {len(streamed)} streamed calls" in page.text


# -- "open in playground" with the recorded prompt -----------------------------------------------


def test_a_recorded_request_opens_in_the_playground_with_its_messages(
    server: Site, admin: Client
) -> None:
    client = openai.OpenAI(base_url=server.root + "/v1", api_key=server.user_key, max_retries=0)
    prompt = "Is <b>this</b> short?"
    client.chat.completions.create(
        model="short-first",
        messages=[
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": prompt},
        ],
        max_tokens=12,
        temperature=0.5,
    )
    call = [c for c in server.engine.traces.calls() if c.route == "short-first"][-1]
    assert call.recording_id is not None
    (recorded,) = [
        r for r in server.engine.traces.recordings("short-first") if r.id == call.recording_id
    ]
    assert recorded.input == prompt
    page = admin.get(f"/ui/requests/{call.id}")
    link = f"/ui/playground?target=short-first&amp;recording={call.recording_id}"
    assert link in page.text
    playground = admin.get(html.unescape(link))
    assert playground.status == 200
    assert f'<textarea name="prompt" rows="4" required>{html.escape(prompt)}</textarea>' in (
        playground.text.replace("&#34;", '"').replace("&#39;", "'")
    )
    assert prompt not in playground.text  # escaped, never markup
    assert 'value="0.5"' in playground.text
    assert 'value="12"' in playground.text
    history = re.search(
        r'<script type="application/json" id="history">(.*?)</script>', playground.text
    )
    assert history is not None
    assert json.loads(history.group(1)) == [{"role": "system", "content": "Answer in one word."}]
    assert re.search(r'<option value="short-first" selected>', playground.text)
    # Sent back with the prompt, the history reaches the model as the recorded request did.
    reply = admin.post(
        "/ui/playground/answer",
        body={"target": "short-first", "prompt": prompt, "history": json.loads(history.group(1))},
        headers={"x-csrf-token": csrf_of(playground.text)},
    )
    assert reply.status == 200
    assert answer_events(reply.text)[-1]["done"]


def test_a_request_of_a_route_that_does_not_record_says_how_to_turn_it_on(
    server: Site, admin: Client
) -> None:
    client = openai.OpenAI(base_url=server.root + "/v1", api_key=server.user_key, max_retries=0)
    client.chat.completions.create(model="shouter", messages=[{"role": "user", "content": "hey"}])
    call = [c for c in server.engine.traces.calls() if c.route == "shouter"][-1]
    assert call.recording_id is None
    page = html.unescape(admin.get(f"/ui/requests/{call.id}").text)
    assert "shouter does not record prompts" in page
    assert "record: true" in page
    assert "recording=" not in page
    assert admin.get("/ui/playground?recording=999999").status == 404
    assert admin.get("/ui/playground?recording=abc").status == 404


def test_the_playground_refuses_a_history_that_is_not_messages(admin: Client) -> None:
    csrf = csrf_of(admin.get("/ui/playground").text)
    reply = admin.post(
        "/ui/playground/answer",
        body={"target": "cheap", "prompt": "hi", "history": [{"role": "wizard", "content": "x"}]},
        headers={"x-csrf-token": csrf},
    )
    assert reply.status == 400
    assert "history" in json.loads(reply.text)["error"]["message"]


# -- sessions outlast a restart ------------------------------------------------------------------


def test_a_restarted_server_keeps_its_signed_in_users_until_the_key_is_revoked(
    tmp_path: Path,
) -> None:
    keys_path = tmp_path / "keys.sqlite"
    admin_key = make_admin_key(keys_path, "ops")
    engine = make_engine(tmp_path / "traces.sqlite")
    try:
        with serving(create_app(engine, ServerSettings(keys_path=keys_path))) as url:
            first = Client(url.removesuffix("/v1"))
            assert sign_in(first, admin_key).status == 303
            csrf = csrf_of(first.get("/ui/keys").text)
        token = first.cookies["shoal_ui"]
        raw = b"".join(f.read_bytes() for f in tmp_path.glob("keys.sqlite*"))
        assert token.encode() not in raw  # only its hash is kept
        db = sqlite3.connect(keys_path)
        stored = db.execute("SELECT token_hash, key_name FROM sessions").fetchall()
        db.close()
        assert stored == [(hashlib.sha256(token.encode()).hexdigest(), "ops")]
        with serving(create_app(engine, ServerSettings(keys_path=keys_path))) as url:
            again = Client(url.removesuffix("/v1"), cookies={"shoal_ui": token})
            page = again.get("/ui/keys")
            assert page.status == 200  # still signed in, with the same CSRF token
            assert csrf_of(page.text) == csrf
            made = again.post("/ui/keys", form={"csrf": csrf, "name": "after-restart"})
            assert made.status == 200
            revoked = CliRunner().invoke(cli, ["keys", "revoke", "ops", "--keys", str(keys_path)])
            assert revoked.exit_code == 0, revoked.output
            assert again.get("/ui/keys").status == 303  # revoking ends the session at once
        db = sqlite3.connect(keys_path)
        assert db.execute("SELECT COUNT(*) FROM sessions").fetchone() == (0,)
        db.close()
    finally:
        asyncio.run(engine.aclose())


def test_a_forged_or_expired_session_token_signs_no_one_in(tmp_path: Path) -> None:
    sessions = Sessions(tmp_path / "keys.sqlite")
    try:
        opened = sessions.open("hash", "ops")
        assert sessions.get(opened.id) == opened
        assert sessions.get("forged") is None
        assert sessions.get(hashlib.sha256(opened.id.encode()).hexdigest()) is None
        db = sqlite3.connect(tmp_path / "keys.sqlite")
        db.execute("UPDATE sessions SET expires_at = 0")
        db.commit()
        db.close()
        assert sessions.get(opened.id) is None
        assert sessions.count() == 0  # an expired session is deleted when seen
    finally:
        sessions.close()


# -- shoal keys list -----------------------------------------------------------------------------


@pytest.mark.parametrize("columns", ["200", "40"])
def test_keys_list_shows_which_keys_are_admin_keys(tmp_path: Path, columns: str) -> None:
    path = tmp_path / "keys.sqlite"
    runner = CliRunner()
    for args in (["ops", "--admin"], ["app"]):
        made = runner.invoke(cli, ["keys", "create", *args, "--keys", str(path)])
        assert made.exit_code == 0, made.output
    listed = runner.invoke(cli, ["keys", "list", "--keys", str(path)], env={"COLUMNS": columns})
    assert listed.exit_code == 0, listed.output
    if columns == "200":
        header = next(line for line in listed.stdout.splitlines() if "name" in line)
        assert "admin" in header
        rows = {
            line.split()[1]: line
            for line in listed.stdout.splitlines()
            if line.split()[1:2] in (["ops"], ["app"])
        }
        assert re.search(r"\byes\b", rows["ops"])
        assert not re.search(r"\byes\b", rows["app"])
    else:  # one block per key, a field a line
        blocks = listed.stdout.strip().split("\n\n")
        assert re.search(r"^admin\s+yes\s*$", blocks[0], re.M)
        assert re.search(r"^admin\s+-\s*$", blocks[1], re.M)


# -- routes: calibration and shadows -------------------------------------------------------------


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Iterator[Site]:
    with routes_site(tmp_path_factory.mktemp("ui-routes"), smollm2_gguf) as running:
        yield running


def route_section(page: str, name: str) -> str:
    part = page.split(f'data-route="{name}"', 1)[1]
    return html.unescape(part.split("</section>", 1)[0])


def test_the_routes_page_shows_a_calibrated_routes_report_and_curve(routed: Site) -> None:
    client = Client(routed.root)
    assert sign_in(client, routed.admin_key).status == 303
    page = client.get("/ui/routes")
    assert page.status == 200
    fleet = routed.engine.fleet
    spec = next(s for s in fleet.settings.routes if s.name == "smart")
    assert isinstance(spec, PredictiveRouteSpec)
    saved = report_path(route_state_path(spec, fleet.cache_dir))
    report = json.loads(saved.read_text())  # written by the calibration, next to the route
    summary = report["summary"]
    smart = route_section(page.text, "smart")
    assert f'<dd data-fact="target">{summary["target"]}</dd>' in smart
    met = re.search(r'<dd data-fact="met">(.*?)</dd>', smart)
    assert met is not None
    assert ("yes" if summary["met_on_calibration"] else "no") in met.group(1)
    assert f"cost weight {summary['setting']:.4g}" in smart
    held = summary["heldout"]
    assert f"quality {held['quality']:.3f}" in smart
    data = re.search(r'<script type="application/json" id="curve-\d+">(.*?)</script>', smart)
    assert data is not None
    chart = json.loads(data.group(1))
    points = {
        (round(c, 9), q)
        for c, q in zip(report["curve"]["cost_ratio"], report["curve"]["quality"], strict=True)
    }
    drawn = [(x, q) for x, q in zip(chart["x"], chart["curve"], strict=True) if q is not None]
    assert drawn
    assert set(drawn) <= points
    assert chart["x"] == sorted(chart["x"])
    chosen = [(x, q) for x, q in zip(chart["x"], chart["chosen"], strict=True) if q is not None]
    assert chosen == [(round(held["cost_ratio"], 9), held["quality"])]
    assert sum(q is not None for q in chart["models"]) == 2
    assert "<td>tiny</td>" in smart
    assert "<td>api</td>" in smart


def test_the_routes_page_says_how_to_calibrate_a_route_that_is_not(routed: Site) -> None:
    client = Client(routed.root)
    assert sign_in(client, routed.admin_key).status == 303
    page = client.get("/ui/routes").text
    fresh = route_section(page, "fresh")
    assert "Not calibrated for its current settings" in fresh
    assert "<code>shoal route calibrate fresh</code>" in fresh
    assert 'data-chart="route"' not in fresh
    labels = route_section(page, "labels")
    assert "Not calibrated: a fixed route runs as the fleet file sets it" in labels


def test_the_routes_page_shows_a_shadows_results(routed: Site) -> None:
    client = Client(routed.root)
    assert sign_in(client, routed.admin_key).status == 303
    labels = route_section(client.get("/ui/routes").text, "labels")
    fleet = routed.engine.fleet
    table = Engine.shadow_table(fleet, "labels", "tiny")
    summary = Comparison("labels", "tiny", pairs_from_table(table, "tiny")).summary()
    assert summary["compared"] == 2
    shown = re.search(r'<p data-fact="shadow">(.*?)</p>', labels, re.S)
    assert shown is not None
    assert shown.group(1).startswith(
        f"2 requests compared: agreement <b>{100 * summary['agreement']:.0f}%</b>"
    )
    assert "Shadow: tiny" in labels
    assert "shadow" not in route_section(client.get("/ui/routes").text, "fresh").lower()


def test_a_calibration_report_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    path = tmp_path / "r.report.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot be read"):
        read_report(path)
    path.write_text("[]")
    with pytest.raises(ConfigError, match="holds no summary"):
        read_report(path)
    assert read_report(tmp_path / "none.report.json") is None


def test_a_shadow_table_that_cannot_be_read_is_named(tmp_path: Path, smollm2_gguf: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(ROUTES_FLEET.format(cache=tmp_path / "cache", gguf=smollm2_gguf))
    engine = Engine(Fleet.from_file(path), trace_path=tmp_path / "traces.sqlite")
    try:
        table = Engine.shadow_table(engine.fleet, "labels", "tiny")
        table.parent.mkdir(parents=True, exist_ok=True)
        table.write_text("a,b\n1,2\n")
        shadowed = route_info.shadow(engine, "labels")
        assert shadowed is not None
        assert shadowed.summary is None
        assert shadowed.error is not None
        assert "missing column" in shadowed.error
        assert route_info.shadow(engine, "smart") is None  # no shadow: nothing to show
    finally:
        asyncio.run(engine.aclose())
