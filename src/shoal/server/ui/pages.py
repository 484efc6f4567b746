"""The dashboard's pages that read: sign-in, the overview, the request log and one request, keys
(with creating and revoking one) and routes (with their calibration and shadows)."""

from __future__ import annotations

import hmac
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from shoal.errors import AuthenticationError
from shoal.routing.base import RoutedModel
from shoal.server.keys import KeyState, hash_key
from shoal.server.sessions import COOKIE, SESSION_S, Session
from shoal.server.ui.route_info import calibration, shadow, spec_of
from shoal.server.ui.web import (
    PAGE_SIZE,
    CsrfRefused,
    SignInNeeded,
    checked_form,
    read_form,
    render,
    safe_next,
    session_of,
    state_of,
    to_sign_in,
)
from shoal.traces import dashboard

LOGIN_COOKIE = "shoal_ui_login"
WINDOWS = {"1h": 3600.0, "24h": 86400.0, "7d": 7 * 86400.0, "all": None}

Page = Callable[[Request, Session, KeyState], Awaitable[Response]]


def page(handler: Page) -> Callable[[Request], Awaitable[Response]]:
    """A handler that needs a signed-in admin (and, for a POST, the session's CSRF token)."""

    async def endpoint(request: Request) -> Response:
        try:
            session, key = session_of(request)
            return await handler(request, session, key)
        except SignInNeeded:
            return to_sign_in(request)
        except CsrfRefused:
            return render(
                request,
                "error.html",
                None,
                status=403,
                message="This form is stale or was not sent by the dashboard (CSRF check). "
                "Reload the page and try again.",
            )

    return endpoint


def _cookie(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/ui",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


# -- sign-in -------------------------------------------------------------------------------------


async def login(request: Request) -> Response:
    """The sign-in form; it carries a token that must match a cookie set with it (a sign-in
    from another site's form is refused)."""
    state = state_of(request)
    token = secrets.token_urlsafe(24)
    response = render(
        request,
        "login.html",
        None,
        status=200 if state.keys is not None else 503,
        login_token=token,
        next=safe_next(request.query_params.get("next")),
        error=None
        if state.keys is not None
        else "This server runs without API keys "
        "(--no-auth): the dashboard needs an admin key to sign in.",
    )
    _cookie(response, request, LOGIN_COOKIE, token, 600)
    return response


async def login_post(request: Request) -> Response:
    state = state_of(request)
    values = await read_form(request)
    sent, expected = values.get("login_token", ""), request.cookies.get(LOGIN_COOKIE, "")
    target = safe_next(values.get("next"))

    def refuse(message: str, status: int) -> Response:
        token = secrets.token_urlsafe(24)
        response = render(
            request, "login.html", None, status=status, login_token=token, next=target,
            error=message,
        )  # fmt: skip
        _cookie(response, request, LOGIN_COOKIE, token, 600)
        return response

    if not expected or not hmac.compare_digest(sent, expected):
        return refuse("The sign-in form expired: try again.", 403)
    if state.keys is None:
        return refuse("This server runs without API keys: there is no admin to sign in.", 503)
    key = values.get("key", "").strip()
    if not key:
        return refuse("Paste an admin key (shoal keys create NAME --admin).", 400)
    digest = hash_key(key)
    try:
        found = state.keys.authenticate_hash(digest)
    except AuthenticationError:
        return refuse("That key is not valid (unknown or revoked).", 401)
    if not found.admin:
        return refuse(
            f"Key {found.name!r} is not an admin key: create one with "
            "`shoal keys create NAME --admin`.",
            403,
        )
    session = state.sessions.open(digest, found.name)
    response = RedirectResponse(target, status_code=303)
    _cookie(response, request, COOKIE, session.id, SESSION_S)
    response.delete_cookie(LOGIN_COOKIE, path="/ui", httponly=True, samesite="strict")
    return response


@page
async def logout(request: Request, session: Session, key: KeyState) -> Response:
    await checked_form(request, session)
    state_of(request).sessions.end(session.id)
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict")
    return response


# -- the overview --------------------------------------------------------------------------------


@page
async def overview(request: Request, session: Session, key: KeyState) -> Response:
    window = request.query_params.get("window", "24h")
    if window not in WINDOWS:
        return render(
            request,
            "error.html",
            session,
            status=400,
            message=f"unknown window {window!r}: one of {', '.join(WINDOWS)}",
        )
    span = WINDOWS[window]
    since = None if span is None else time.time() - span
    seen = dashboard.overview(state_of(request).engine.traces, since=since)
    chart = {
        "x": [bucket for bucket, _ in seen.series],
        "calls": [t.calls for _, t in seen.series],
        "cost": [t.cost_usd for _, t in seen.series],
        "p50": [_ms(t.percentile(0.5)) for _, t in seen.series],
        "p95": [_ms(t.percentile(0.95)) for _, t in seen.series],
        "ttft_p50": [_ms(t.ttft_percentile(0.5)) for _, t in seen.series],
        "ttft_p95": [_ms(t.ttft_percentile(0.95)) for _, t in seen.series],
        "errors": [t.errors for _, t in seen.series],
        "span": seen.span_s,
    }
    return render(
        request,
        "overview.html",
        session,
        seen=seen,
        window=window,
        windows=list(WINDOWS),
        chart=chart,
    )


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


# -- requests ------------------------------------------------------------------------------------


@page
async def requests(request: Request, session: Session, key: KeyState) -> Response:
    params = request.query_params
    store = state_of(request).engine.traces
    before = params.get("before")
    if before is not None and not before.isdigit():
        return render(
            request, "error.html", session, status=400, message="'before' must be a call id"
        )
    window = params.get("window") or "all"
    if window not in WINDOWS:
        return render(
            request,
            "error.html",
            session,
            status=400,
            message=f"unknown window {window!r}: one of {', '.join(WINDOWS)}",
        )
    span = WINDOWS[window]
    filters = dashboard.Filters(
        model=params.get("model") or None,
        route=params.get("route") or None,
        key=params.get("key") or None,
        status=params.get("status") or None,
        run_id=params.get("run_id") or None,
        since=None if span is None else time.time() - span,
    )
    log = dashboard.requests(
        store, filters, before=int(before) if before else None, limit=PAGE_SIZE
    )
    values: dict[str, Any] = {
        "log": log,
        "total": dashboard.count(store, filters),
        "query": {k: v for k, v in params.items() if k != "before" and v},
    }
    if request.headers.get("hx-request") and request.headers.get("hx-target") == "log":
        return render(request, "requests_rows.html", session, **values)
    values["options"] = {
        column: dashboard.choices(store, column) for column in ("model", "route", "key", "status")
    }
    values["windows"] = list(WINDOWS)
    return render(request, "requests.html", session, **values)


@page
async def request_detail(request: Request, session: Session, key: KeyState) -> Response:
    raw = request.path_params["call_id"]
    store = state_of(request).engine.traces
    record = dashboard.call(store, int(raw)) if raw.isdigit() else None
    if record is None:
        return render(
            request, "error.html", session, status=404, message=f"no request with id {raw!r}"
        )
    attempts = dashboard.attempts(store, record)
    decision = record.decision or {}
    chosen = set(decision.get("models") or ())
    target = record.route or record.model
    recording_id = record.recording_id or next(
        (a.recording_id for a in attempts if a.recording_id), None
    )
    return render(
        request,
        "request.html",
        session,
        call=record,
        attempts=attempts,
        decision=decision,
        chosen=chosen,
        attempts_cost=sum(a.cost_usd for a in attempts),
        target=target,
        recording_id=recording_id,
        records=record.run_id is None and state_of(request).engine.recorded(target),
    )


# -- keys ----------------------------------------------------------------------------------------


@page
async def keys(request: Request, session: Session, key: KeyState) -> Response:
    return _keys_page(request, session)


def _keys_page(
    request: Request,
    session: Session,
    *,
    created: tuple[str, str] | None = None,
    error: str | None = None,
    status: int = 200,
) -> Response:
    store = state_of(request).keys
    assert store is not None  # a session exists only with keys
    return render(
        request,
        "keys.html",
        session,
        status=status,
        records=store.records(),
        created=created,
        error=error,
    )


@page
async def key_create(request: Request, session: Session, key: KeyState) -> Response:
    form = await checked_form(request, session)
    store = state_of(request).keys
    assert store is not None
    name = form.get("name", "").strip()
    try:
        budget = _number(form.get("budget"), "budget", float)
        rpm = _number(form.get("rpm"), "rpm", int)
        if budget is not None and not math.isfinite(budget):
            raise ValueError("budget must be a finite number of USD")
        secret, record = store.create(
            name, budget_usd=budget, rpm=rpm, admin=form.get("admin") == "on"
        )
    except ValueError as exc:
        return _keys_page(request, session, error=str(exc), status=400)
    return _keys_page(request, session, created=(record.name, secret))


def _number(raw: str | None, name: str, kind: type[float] | type[int]) -> Any:
    if raw is None or not raw.strip():
        return None
    try:
        return kind(raw.strip())
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise ValueError(f"{name} must be {what}, not {raw.strip()!r}") from None


@page
async def key_revoke(request: Request, session: Session, key: KeyState) -> Response:
    await checked_form(request, session)
    store = state_of(request).keys
    assert store is not None
    name = request.path_params["name"]
    if not store.revoke(name):
        return _keys_page(request, session, error=f"no key named {name!r}", status=404)
    return RedirectResponse("/ui/keys", status_code=303)


# -- routes --------------------------------------------------------------------------------------


@page
async def routes(request: Request, session: Session, key: KeyState) -> Response:
    state = state_of(request)
    engine = state.engine
    served = dashboard.routes_served(engine.traces)
    items = []
    for name in engine.route_names:
        model = engine.route(name)
        candidates = model.candidates if isinstance(model, RoutedModel) else []
        totals, shares = served.get(name, (None, []))
        spec = spec_of(engine, name)
        items.append(
            {
                "name": name,
                "kind": spec.kind if spec is not None else "",
                "policy": type(model.router).__name__ if isinstance(model, RoutedModel) else "",
                "candidates": candidates,
                "totals": totals,
                "shares": shares,
                "calibration": calibration(engine, name),
                "shadow": shadow(engine, name),
            }
        )
    return render(request, "routes.html", session, routes=items)
