"""What every dashboard page shares: its templates (Jinja2, every value escaped), the signed-in
session it needs, and the CSRF check of a state-changing request."""

from __future__ import annotations

import functools
import json
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, quote

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from shoal.errors import AuthenticationError, MalformedRequestError
from shoal.server.http import read_body
from shoal.server.keys import KeyState
from shoal.server.sessions import COOKIE, CSRF_FIELD, CSRF_HEADER, Session
from shoal.server.state import ServerState

PAGE_SIZE = 50


class SignInNeeded(Exception):
    """The request has no live admin session: a page redirects to sign-in, a fragment says 401."""


class CsrfRefused(Exception):
    """A state-changing request without its session's CSRF token."""


@functools.cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("shoal.server.ui", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["usd"] = usd
    env.filters["ms"] = ms
    env.filters["when"] = when
    env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, sort_keys=True)
    return env


def usd(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "$0"
    sign, value = ("-", -value) if value < 0 else ("", value)
    return f"{sign}${value:.6f}" if value < 0.01 else f"{sign}${value:,.4f}"


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds * 1000:,.0f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


def state_of(request: Request) -> ServerState:
    state: ServerState = request.app.state.shoal
    return state


def session_of(request: Request) -> tuple[Session, KeyState]:
    """The request's session and its admin key, or `SignInNeeded`."""
    state = state_of(request)
    session = state.sessions.get(request.cookies.get(COOKIE))
    if session is None or state.keys is None:
        raise SignInNeeded
    try:
        key = state.keys.authenticate_hash(session.key_hash)
    except AuthenticationError:
        state.sessions.end(session.id)
        raise SignInNeeded from None
    if not key.admin:
        state.sessions.end(session.id)
        raise SignInNeeded
    return session, key


MAX_FORM_BYTES = 64 * 1024
FORM_TYPE = "application/x-www-form-urlencoded"


async def read_form(request: Request) -> dict[str, str]:
    """A URL-encoded form (the dashboard posts no files), at most `MAX_FORM_BYTES`."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != FORM_TYPE:
        raise MalformedRequestError(f"a dashboard form is sent as {FORM_TYPE}, not {kind!r}")
    body = await read_body(request, MAX_FORM_BYTES)
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=100)
    except (UnicodeDecodeError, ValueError) as exc:
        raise MalformedRequestError(f"the form cannot be read: {exc}") from None
    return dict(pairs)


async def checked_form(request: Request, session: Session) -> dict[str, str]:
    """The form of a state-changing request, once its CSRF token is the session's."""
    values = await read_form(request)
    token = request.headers.get(CSRF_HEADER) or values.get(CSRF_FIELD)
    if not session.csrf_ok(token):
        raise CsrfRefused
    return values


def render(
    request: Request,
    template: str,
    session: Session | None,
    status: int = 200,
    **values: Any,
) -> Response:
    started = time.perf_counter()
    body = (
        environment()
        .get_template(template)
        .render(
            session=session,
            csrf=session.csrf if session else "",
            path=request.url.path,
            **values,
        )
    )
    took = (time.perf_counter() - started) * 1000
    return HTMLResponse(
        body,
        status_code=status,
        headers={
            "cache-control": "no-store",
            "x-frame-options": "DENY",
            "x-content-type-options": "nosniff",
            "content-security-policy": (
                "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                "frame-ancestors 'none'; form-action 'self'"
            ),
            "server-timing": f"render;dur={took:.1f}",
        },
    )


def to_sign_in(request: Request) -> Response:
    if request.headers.get("hx-request"):
        return Response(status_code=401, headers={"hx-redirect": "/ui/login"})
    target = request.url.path
    if request.url.query:
        target += "?" + request.url.query
    return RedirectResponse(f"/ui/login?next={quote(target, safe='')}", status_code=303)


def safe_next(target: str | None) -> str:
    """Where to go after signing in: a dashboard path, never another site."""
    if target and target.startswith("/ui") and not target.startswith("//"):
        return target
    return "/ui/"
