"""A server for the dashboard's tests: the default fleet (the tiny real model answers), two
priced fakes and a route over them whose decision carries estimates (and which records its
requests), a served pipeline, and an admin key; and a server whose fleet has a calibrated
route, one not calibrated and one with a shadow. Shared by the HTTP tests (test_ui.py) and the
browser tests (test_ui_browser.py)."""

from __future__ import annotations

import asyncio
import http.client
import http.cookies
import json
import re
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from server_support import make_key, serving, shout, shout_pipeline

from shoal import FunctionModel, TokenPrice
from shoal.cards import ModelCard
from shoal.engine import Engine
from shoal.fleet import Fleet
from shoal.messages import ChatRequest, Estimate, RouteDecision
from shoal.models.embedder import HashEmbedder
from shoal.models.fake import FakeModel
from shoal.routing.base import RoutedModel, Router, RouteStats
from shoal.routing.config import calibrate_route
from shoal.routing.outcomes import OutcomeTable, write_table
from shoal.routing.predictive import Featurizer
from shoal.server import create_app
from shoal.server.keys import KeyStore
from shoal.settings import PredictiveRouteSpec, ServerSettings

CHEAP = TokenPrice(input_per_mtok=1.0, output_per_mtok=1.0)
DEAR = TokenPrice(input_per_mtok=50.0, output_per_mtok=50.0)


class ShortFirst(Router):
    """Short prompts to the cheap model, long ones to the dear one; estimates for both."""

    def choose(
        self, request: ChatRequest, candidates: Sequence[ModelCard], stats: RouteStats
    ) -> RouteDecision:
        short = len(request.messages[-1].content) < 40
        chosen = "cheap" if short else "dear"
        return RouteDecision(
            route=self.name,
            models=(chosen,),
            reason=f"{'short' if short else 'long'} prompt: {chosen} is expected to do",
            estimates=(
                Estimate(model="cheap", quality=0.7 if short else 0.3, cost_usd=3e-6),
                Estimate(model="dear", quality=0.9, cost_usd=7e-4),
            ),
        )


def make_engine(traces: Path) -> Engine:
    engine = Engine(Fleet(), trace_path=traces)
    engine.add_route("shouter", FunctionModel(shout, model_id="shouter", price=CHEAP, delay_s=0.4))
    cheap = FakeModel(["cheap answer"], model_id="cheap", price=CHEAP)
    dear = FakeModel(["dear answer"], model_id="dear", price=DEAR)
    route = RoutedModel("short-first", ShortFirst(), [cheap, dear])
    engine.add_route("short-first", route, record=True)  # its requests open in the playground
    return engine


@dataclass
class Site:
    """A running server: its address, engine, keys file and an admin key."""

    root: str
    engine: Engine
    keys_path: Path
    admin_key: str
    user_key: str


@contextmanager
def site(tmp: Path) -> Iterator[Site]:
    keys_path = tmp / "keys.sqlite"
    admin_key = make_admin_key(keys_path, "ops")
    user_key = make_key(keys_path, "app", budget=1.0)
    engine = make_engine(tmp / "traces.sqlite")
    app = create_app(
        engine, ServerSettings(keys_path=keys_path), pipelines={"shout": shout_pipeline()}
    )
    try:
        with serving(app) as url:
            yield Site(url.removesuffix("/v1"), engine, keys_path, admin_key, user_key)
    finally:
        # On a thread of its own: a browser test's thread runs Playwright's event loop.
        closing = threading.Thread(target=asyncio.run, args=(engine.aclose(),))
        closing.start()
        closing.join()


def make_admin_key(path: Path, name: str) -> str:
    store = KeyStore(path)
    try:
        return store.create(name, budget_usd=1.0, rpm=None, admin=True)[0]
    finally:
        store.close()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    text: str
    set_cookies: list[str]


@dataclass
class Client:
    """A cookie-keeping HTTP client that follows no redirect (so tests see each one)."""

    root: str
    cookies: dict[str, str] = field(default_factory=dict)

    def request(
        self,
        method: str,
        path: str,
        *,
        form: dict[str, str] | None = None,
        body: object = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        address = urllib.parse.urlsplit(self.root)
        connection = http.client.HTTPConnection(address.hostname or "", address.port, timeout=60)
        sent = dict(headers or {})
        data: bytes | None = None
        if form is not None:
            data = urllib.parse.urlencode(form).encode()
            sent["content-type"] = "application/x-www-form-urlencoded"
        elif body is not None:
            data = json.dumps(body).encode()
            sent["content-type"] = "application/json"
        if self.cookies:
            sent["cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        try:
            connection.request(method, path, body=data, headers=sent)
            response = connection.getresponse()
            text = response.read().decode()
        finally:
            connection.close()
        set_cookies = response.headers.get_all("set-cookie") or []
        for raw in set_cookies:
            jar = http.cookies.SimpleCookie(raw)
            for name, morsel in jar.items():
                if morsel["max-age"] == "0" or not morsel.value:
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        headers = {k.lower(): v for k, v in response.getheaders()}
        return Reply(response.status, headers, text, set_cookies)

    def get(self, path: str, headers: dict[str, str] | None = None) -> Reply:
        return self.request("GET", path, headers=headers)

    def post(self, path: str, **options: object) -> Reply:
        return self.request("POST", path, **options)  # type: ignore[arg-type]


def sign_in(client: Client, key: str) -> Reply:
    """Sign in through the form, as a browser does (its token and cookie first)."""
    page = client.get("/ui/login")
    token = re.search(r'name="login_token" value="([^"]+)"', page.text)
    assert token is not None
    return client.post("/ui/login", form={"login_token": token.group(1), "key": key})


def csrf_of(page: str) -> str:
    found = re.search(r'data-csrf="([^"]+)"', page)
    assert found is not None, "the page carries no CSRF token"
    return found.group(1)


# -- a fleet whose routes the routes page describes ------------------------------------------------

ROUTES_FLEET = """include_default: false
cache_dir: {cache}
models:
  - {{id: tiny, kind: gguf, path: "{gguf}", context: 2048}}
  - {{id: api, kind: openai, base_url: "http://127.0.0.1:9/v1", model: gpt-4o-mini}}
routes:
  - {{name: smart, kind: predictive, models: [tiny, api], predictor: logistic,
     target: {{quality_ratio: 0.9}}}}
  - {{name: fresh, kind: predictive, models: [tiny, api], predictor: logistic,
     target: {{min_quality: 0.8}}}}
  - name: labels
    kind: fixed
    model: tiny
    shadow: {{candidate: tiny, share: 1.0, budget_usd_per_hour: 1.0}}
"""


def two_topics(path: Path) -> Path:
    """An outcome table: arithmetic goes well on the cheap model, history only on the dear one."""
    rng = np.random.default_rng(0)
    prompts, scores = [], []
    for i in range(120):
        if i % 2:
            prompts.append(f"add {i} and {i + 1} please compute the sum")
            scores.append([1.0, 1.0])
        else:
            prompts.append(f"which emperor ruled rome in year {i} history")
            scores.append([float(rng.random() < 0.2), 1.0])
    table = OutcomeTable(
        query_ids=[f"q{i}" for i in range(120)],
        prompts=prompts,
        models=["tiny", "api"],
        scores=np.array(scores),
        costs=np.tile([1e-5, 1e-3], (120, 1)),
        latencies=np.tile([0.1, 1.0], (120, 1)),
    )
    write_table(table, path)
    return path


async def _shadowed(fleet: Fleet, prompts: Sequence[str]) -> None:
    """Ask `labels` each prompt, one at a time, each shadow finished before the next call."""
    engine = Engine(fleet)
    try:
        for prompt in prompts:
            await engine.generate("labels", ChatRequest.of(prompt, max_tokens=4))
            while engine._shadow_tasks:
                await asyncio.gather(*engine._shadow_tasks, return_exceptions=True)
    finally:
        await engine.aclose()


@contextmanager
def routes_site(tmp: Path, gguf: Path) -> Iterator[Site]:
    """A server over `ROUTES_FLEET`: `smart` calibrated (with the hashing embedder: no
    weights), `fresh` not, `labels` with two shadowed requests."""
    fleet_path = tmp / "fleet.yaml"
    fleet_path.write_text(ROUTES_FLEET.format(cache=tmp / "cache", gguf=gguf), "utf-8")
    fleet = Fleet.from_file(fleet_path)
    smart = next(s for s in fleet.settings.routes if s.name == "smart")
    assert isinstance(smart, PredictiveRouteSpec)
    calibrate_route(
        smart,
        fleet,
        outcomes=two_topics(tmp / "topics.csv"),
        featurizer=Featurizer(HashEmbedder()),
        cost_mode="known",
    )
    # On a thread of its own: a browser test's thread runs Playwright's event loop.
    asking = threading.Thread(target=asyncio.run, args=(_shadowed(fleet, ["Say yes.", "Say no."]),))
    asking.start()
    asking.join()
    keys_path = tmp / "keys.sqlite"
    admin_key = make_admin_key(keys_path, "ops")
    engine = Engine(Fleet.from_file(fleet_path), trace_path=tmp / "traces.sqlite")
    app = create_app(engine, ServerSettings(keys_path=keys_path))
    try:
        with serving(app) as url:
            yield Site(url.removesuffix("/v1"), engine, keys_path, admin_key, "")
    finally:
        closing = threading.Thread(target=asyncio.run, args=(engine.aclose(),))
        closing.start()
        closing.join()
