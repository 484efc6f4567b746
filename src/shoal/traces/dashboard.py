"""The dashboard's reads of a trace store: one query per page fragment, over the rollups where
the page sums, and over the indexed `calls` table where it lists.

    overview(store, since=time.time() - 86400)    totals, a series, breakdowns, route shares
    requests(store, Filters(model="tiny"), before=None, limit=50)   a page of the log, newest first
    attempts(store, call)                         the records of one call (a cascade's stages)
    recording(store, call.recording_id)           the request a call was asked, where recorded
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from shoal.traces import rollups
from shoal.traces.recordings import Recording
from shoal.traces.rollups import SUM_COLUMNS, Totals, totals
from shoal.traces.store import CallRecord, TraceStore

FILTERS = ("model", "route", "key", "status", "run_id")
# Columns a log row shows (the decision is read only for one request).
_ROW = (
    "id, finished_at, key, model, route, status, run_id, step, input_tokens, output_tokens, "
    "latency_s, cost_usd"
)


@dataclass(frozen=True)
class Breakdown:
    name: str
    totals: Totals


@dataclass(frozen=True)
class Overview:
    totals: Totals
    span_s: int
    # (bucket start, totals of the bucket), oldest first
    series: list[tuple[int, Totals]]
    models: list[Breakdown]
    routes: list[Breakdown]
    keys: list[Breakdown]
    # route -> [(model, calls)]
    shares: dict[str, list[tuple[str, int]]]


def span_for(window_s: float | None) -> int:
    """The rollups a window reads: minutes up to six hours, hours up to two days, days beyond
    (and for all time), so a page sums at most a few thousand buckets' rows."""
    if window_s is not None and window_s <= 6 * 3600:
        return 60
    if window_s is not None and window_s <= 2 * 86400:
        return 3600
    return 86400


def overview(store: TraceStore, *, since: float | None) -> Overview:
    """What the rollups hold since `since` (a Unix time; None for all time): one grouped query
    for the series, one for each breakdown and one for the routes' shares."""
    span = span_for(None if since is None else max(0.0, time.time() - since))
    where = "WHERE span = ?"
    args: list[Any] = [span]
    if since is not None:
        where += " AND bucket >= ?"
        args.append(int(since // span) * span)

    def grouped(columns: str, table: str = "call_rollups") -> list[tuple[Any, ...]]:
        return store.read(
            f"SELECT {columns}, {SUM_COLUMNS} FROM {table} {where} GROUP BY {columns}", args
        )

    series = [(row[0], totals(row[1:])) for row in grouped("bucket")]

    def breakdown(column: str) -> list[Breakdown]:
        table = "key_rollups" if column == "key" else "call_rollups"
        items = [
            Breakdown(row[0] or "(none)", totals(row[1:]))
            for row in grouped(column, table)
            if row[0] or column == "key"
        ]
        return sorted(items, key=lambda b: (-b.totals.calls, b.name))

    shares: dict[str, list[tuple[str, int]]] = {}
    for route, model, count in store.read(
        f"SELECT route, model, SUM(calls) FROM call_rollups {where} AND route != '' "
        "GROUP BY route, model ORDER BY route, SUM(calls) DESC",
        args,
    ):
        shares.setdefault(route, []).append((model, int(count)))
    return Overview(
        totals=merge([t for _, t in series]),
        span_s=span,
        series=series,
        models=breakdown("model"),
        routes=breakdown("route"),
        keys=breakdown("key"),
        shares=shares,
    )


def routes_served(store: TraceStore) -> dict[str, tuple[Totals, list[tuple[str, int]]]]:
    """Each route's totals over all time, and the calls it sent to each model (most first)."""
    parts: dict[str, list[tuple[str, Totals]]] = {}
    for route, model, *sums in store.read(
        f"SELECT route, model, {SUM_COLUMNS} FROM call_rollups WHERE span = 86400 "
        "AND route != '' GROUP BY route, model"
    ):
        parts.setdefault(route, []).append((model, totals(sums)))
    return {
        route: (
            merge([t for _, t in models]),
            sorted(((m, t.calls) for m, t in models), key=lambda mc: -mc[1]),
        )
        for route, models in parts.items()
    }


def merge(parts: list[Totals]) -> Totals:
    histogram = [0] * len(rollups.HISTOGRAM)
    ttft = [0] * len(rollups.TTFT_HISTOGRAM)
    for part in parts:
        for i, count in enumerate(part.histogram):
            histogram[i] += count
        for i, count in enumerate(part.ttft_histogram):
            ttft[i] += count
    return Totals(
        calls=sum(p.calls for p in parts),
        errors=sum(p.errors for p in parts),
        input_tokens=sum(p.input_tokens for p in parts),
        output_tokens=sum(p.output_tokens for p in parts),
        cost_usd=sum(p.cost_usd for p in parts),
        latency_sum_s=sum(p.latency_sum_s for p in parts),
        ttft_sum_s=sum(p.ttft_sum_s for p in parts),
        ttft_calls=sum(p.ttft_calls for p in parts),
        baseline_usd=sum(p.baseline_usd for p in parts),
        baselined_cost_usd=sum(p.baselined_cost_usd for p in parts),
        histogram=tuple(histogram),
        ttft_histogram=tuple(ttft),
    )


# -- the log -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Filters:
    """The log's filters; an empty string or None is no filter."""

    model: str | None = None
    route: str | None = None
    key: str | None = None
    status: str | None = None
    run_id: str | None = None
    since: float | None = None

    def active(self) -> dict[str, str]:
        return {name: value for name in FILTERS if (value := getattr(self, name))}


@dataclass(frozen=True)
class LogRow:
    id: int
    finished_at: float
    key: str | None
    model: str
    route: str | None
    status: str
    run_id: str | None
    step: str | None
    input_tokens: int
    output_tokens: int
    latency_s: float
    cost_usd: float


@dataclass(frozen=True)
class LogPage:
    rows: list[LogRow]
    # the cursor of the next (older) page, None at the end
    older: int | None
    # how many calls match, where the rollups can tell (not with a run or time filter)
    total: int | None = None
    filters: dict[str, str] = field(default_factory=dict)


def requests(
    store: TraceStore, filters: Filters, *, before: int | None = None, limit: int = 50
) -> LogPage:
    """Up to `limit` calls matching `filters`, newest first, older than id `before`."""
    clauses, args = [], list[Any]()
    for name, value in filters.active().items():
        clauses.append(f"{name} = ?")
        args.append(value)
    if filters.since is not None:
        # Exact by the time, and quick by the id: no call before the first to finish since
        # then finished since then (the lookup reads the index on finished_at).
        clauses.append(
            "+finished_at >= ? AND id >= "
            "(SELECT MIN(id) FROM calls INDEXED BY calls_finished WHERE finished_at >= ?)"
        )
        args += [filters.since, filters.since]
    if before is not None:
        clauses.append("id < ?")
        args.append(before)
    where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = store.read(
        f"SELECT {_ROW} FROM calls {where} ORDER BY id DESC LIMIT ?", [*args, limit + 1]
    )
    page = [LogRow(*row) for row in rows[:limit]]
    older = page[-1].id if len(rows) > limit else None
    return LogPage(rows=page, older=older, filters=filters.active())


def count(store: TraceStore, filters: Filters) -> int | None:
    """How many calls match, from the daily rollups: None when they cannot tell (a run or a
    time, or a key with a model or route: no rollup groups by both)."""
    active = filters.active()
    if filters.run_id or filters.since is not None:
        return None
    table = "key_rollups" if "key" in active else "call_rollups"
    if set(active) - {"status", *rollups.TABLES[table]}:
        return None
    clauses, args = ["span = 86400"], list[Any]()
    for name, value in active.items():
        clauses.append(f"{name} = ?")
        args.append(value)
    rows = store.read(f"SELECT SUM(calls) FROM {table} WHERE {' AND '.join(clauses)}", args)
    return int(rows[0][0] or 0)


def call(store: TraceStore, call_id: int) -> CallRecord | None:
    rows = store.read(f"SELECT id, {', '.join(_COLUMNS)} FROM calls WHERE id = ?", [call_id])
    return _record(rows[0]) if rows else None


def attempts(store: TraceStore, record: CallRecord) -> list[CallRecord]:
    """Every record of the call `record` belongs to (a cascade's stages, in order): those
    written together with it, for the same route, run and step."""
    rows = store.read(
        f"SELECT id, {', '.join(_COLUMNS)} FROM calls WHERE finished_at = ? AND started_at = ? "
        "AND route IS ? AND run_id IS ? AND step IS ? AND item IS ? ORDER BY id",
        [
            record.finished_at,
            record.started_at,
            record.route,
            record.run_id,
            record.step,
            record.item,
        ],
    )
    return [_record(row) for row in rows]


def choices(store: TraceStore, column: str) -> list[str]:
    """The values a log filter can take (from the daily rollups: a few thousand rows)."""
    assert column in ("model", "route", "key", "status")
    table = "key_rollups" if column == "key" else "call_rollups"
    rows = store.read(
        f"SELECT DISTINCT {column} FROM {table} WHERE span = 86400 AND {column} != '' "
        f"ORDER BY {column}"
    )
    return [row[0] for row in rows]


def recording(store: TraceStore, recording_id: int) -> Recording | None:
    """The recorded request `recording_id` (a call's `recording_id`), or None."""
    rows = store.read(
        "SELECT target, model, messages, schema, answer, params, created_at FROM recordings "
        "WHERE id = ?",
        [recording_id],
    )
    if not rows:
        return None
    target, model, messages, schema, answer, params, created_at = rows[0]
    return Recording(
        target=target,
        model=model,
        messages=json.loads(messages),
        answer=answer,
        schema=json.loads(schema) if schema is not None else None,
        params=json.loads(params),
        created_at=created_at,
        id=recording_id,
    )


_COLUMNS = [f for f in CallRecord.model_fields if f != "id"]


def _record(row: tuple[Any, ...]) -> CallRecord:
    data = dict(zip(["id", *_COLUMNS], row, strict=True))
    data["decision"] = json.loads(data["decision"]) if data["decision"] else None
    data["cached"] = bool(data["cached"])
    return CallRecord.model_validate(data)
