"""The dashboard at `/ui`: server-rendered pages (Jinja2, htmx, uPlot; vendored, no build step,
nothing loaded from elsewhere) on the server's own port, for admin keys only.

    /ui/login                  sign in with an admin key (`shoal keys create NAME --admin`)
    /ui/                       overview: totals, a chart over time, per model, route and key
    /ui/requests[/{id}]        the request log (paginated, filtered) and one request's decision
    /ui/playground             chat with one to three models or routes side by side, streamed
                               (`?recording=ID`: opened on a recorded request's messages)
    /ui/runs[/{id}[/events]]   pipeline runs: start one, its waterfall, its live progress
    /ui/keys                   keys: create (shown once), revoke
    /ui/routes                 each route's candidates, what it served, its calibration
                               report and cost-quality curve, and its shadow's results
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from shoal.server.ui import live, pages

STATIC = Path(__file__).parent / "static"


async def _to_overview(request: Request) -> Response:
    return RedirectResponse("/ui/", status_code=307)


def ui_routes() -> list[BaseRoute]:
    return [
        Route("/ui", _to_overview, methods=["GET"]),
        Mount(
            "/ui",
            routes=[
                Route("/", pages.overview, methods=["GET"]),
                Route("/login", pages.login, methods=["GET"]),
                Route("/login", pages.login_post, methods=["POST"]),
                Route("/logout", pages.logout, methods=["POST"]),
                Route("/requests", pages.requests, methods=["GET"]),
                Route("/requests/{call_id}", pages.request_detail, methods=["GET"]),
                Route("/keys", pages.keys, methods=["GET"]),
                Route("/keys", pages.key_create, methods=["POST"]),
                Route("/keys/{name}/revoke", pages.key_revoke, methods=["POST"]),
                Route("/routes", pages.routes, methods=["GET"]),
                Route("/playground", live.playground, methods=["GET"]),
                Route("/playground/answer", live.answer, methods=["POST"]),
                Route("/runs", live.runs, methods=["GET"]),
                Route("/runs", live.run_start, methods=["POST"]),
                Route("/runs/{run_id}", live.run_detail, methods=["GET"]),
                Route("/runs/{run_id}/events", live.run_events, methods=["GET"]),
                Mount("/static", StaticFiles(directory=STATIC), name="ui-static"),
            ],
        ),
    ]
