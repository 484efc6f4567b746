"""Rollups: every call counted, per minute, hour and day, in the transaction that records it.

The dashboard reads these, never a scan of `calls`: a page over a million calls sums a few
thousand rollup rows. Two tables, so that neither multiplies the other's groups: a row of
`call_rollups` is one (span, bucket, model, route, status), a row of `key_rollups` one (span,
bucket, key, status). Each row holds its calls, tokens, cost, summed latency and time to first
token, a latency histogram (`h0`..`h11`, upper bounds `LATENCY_BOUNDS_S`, the last open) and a
time-to-first-token histogram of the calls that streamed (`t0`..`t11`, upper bounds
`TTFT_BOUNDS_S`), from which percentiles are estimated.

`baseline_usd` is what the route's best model (the candidate its decision expected the highest
quality of) was expected to cost, counted once per routed call (on the row of the call's first
model); `baselined_cost_usd` is what those calls cost, every model a cascade tried included.
Their difference is what routing saved.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

SPANS_S = (60, 3600, 86400)
LATENCY_BOUNDS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
HISTOGRAM = tuple(f"h{i}" for i in range(len(LATENCY_BOUNDS_S) + 1))
# Finer at the low end: a first token comes sooner than a whole answer.
TTFT_BOUNDS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
TTFT_HISTOGRAM = tuple(f"t{i}" for i in range(len(TTFT_BOUNDS_S) + 1))
# Each table and the columns of a call it groups by (after span and bucket).
TABLES = {"call_rollups": ("model", "route", "status"), "key_rollups": ("key", "status")}
SUMS = (
    "calls",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "latency_s",
    "ttft_s",
    "ttft_calls",
    "baseline_usd",
    "baselined_cost_usd",
    *HISTOGRAM,
    *TTFT_HISTOGRAM,
)

SCHEMA = "".join(
    f"""
CREATE TABLE IF NOT EXISTS {table} (
    span INTEGER NOT NULL,
    bucket INTEGER NOT NULL,
    {" ".join(f"{column} TEXT NOT NULL," for column in columns)}
    {", ".join(f"{name} REAL NOT NULL DEFAULT 0" for name in SUMS)},
    PRIMARY KEY (span, bucket, {", ".join(columns)})
) WITHOUT ROWID;
"""
    for table, columns in TABLES.items()
)


def _upsert(table: str) -> str:
    group = ("span", "bucket", *TABLES[table])
    return (
        f"INSERT INTO {table} ({', '.join(group + SUMS)}) "
        f"VALUES ({', '.join('?' for _ in group + SUMS)}) "
        f"ON CONFLICT ({', '.join(group)}) DO UPDATE SET "
        + ", ".join(f"{name} = {name} + excluded.{name}" for name in SUMS)
    )


_UPSERTS = {table: _upsert(table) for table in TABLES}
_TTFT_AT = SUMS.index(TTFT_HISTOGRAM[0])


def histogram_slot(latency_s: float, bounds: Sequence[float] = LATENCY_BOUNDS_S) -> int:
    for i, bound in enumerate(bounds):
        if latency_s <= bound:
            return i
    return len(bounds)


def baseline(decision: dict[str, Any] | None) -> float | None:
    """The expected cost of the route's best candidate (None when the decision estimated no
    quality or cost)."""
    if not decision or not decision.get("models"):
        return None
    scored = [
        e
        for e in decision.get("estimates") or ()
        if e.get("quality") is not None and e.get("cost_usd") is not None
    ]
    if not scored:
        return None
    best = max(scored, key=lambda e: e["quality"])
    return float(best["cost_usd"])


def add(db: sqlite3.Connection, calls: Iterable[Any]) -> None:
    """Count `calls` (call records) into the rollups; inside the caller's transaction."""
    rows: dict[str, dict[tuple[Any, ...], list[float]]] = {table: {} for table in TABLES}
    for call in calls:
        base = baseline(call.decision)
        first = base is not None and call.decision["models"][0] == call.model
        values = {
            "model": call.model,
            "route": call.route or "",
            "key": call.key or "",
            "status": call.status,
        }
        for span in SPANS_S:
            bucket = int(call.finished_at // span) * span
            for table, columns in TABLES.items():
                group = (span, bucket, *(values[c] for c in columns))
                sums = rows[table].get(group)
                if sums is None:
                    sums = rows[table][group] = [0.0] * len(SUMS)
                sums[0] += 1
                sums[1] += call.input_tokens
                sums[2] += call.output_tokens
                sums[3] += call.cost_usd
                sums[4] += call.latency_s
                if call.ttft_s is not None:
                    sums[5] += call.ttft_s
                    sums[6] += 1
                    sums[_TTFT_AT + histogram_slot(call.ttft_s, TTFT_BOUNDS_S)] += 1
                if base is not None:  # every model of the call costs; the baseline counts once
                    sums[7] += base if first else 0.0
                    sums[8] += call.cost_usd
                sums[9 + histogram_slot(call.latency_s)] += 1
    for table, groups in rows.items():
        db.executemany(_UPSERTS[table], [(*group, *sums) for group, sums in groups.items()])


def _slots(column: str, bounds: Sequence[float], prefix: str) -> list[str]:
    """SQL that counts `column` into each slot of a histogram with upper bounds `bounds`."""
    slots = []
    lower = None
    for i, bound in enumerate((*bounds, None)):
        low = "" if lower is None else f"{column} > {lower}"
        high = "" if bound is None else f"{column} <= {bound}"
        test = " AND ".join(part for part in (low, high, f"{column} IS NOT NULL") if part)
        slots.append(f"SUM(CASE WHEN {test} THEN 1 ELSE 0 END) AS {prefix}{i}")
        lower = bound
    return slots


def backfill(db: sqlite3.Connection) -> None:
    """Count the calls a store held before it kept rollups (savings are not backfilled)."""
    slots = _slots("latency_s", LATENCY_BOUNDS_S, "h") + _slots("ttft_s", TTFT_BOUNDS_S, "t")
    for table, columns in TABLES.items():
        group = ", ".join(f"COALESCE({c}, '')" for c in columns)
        positions = ", ".join(str(2 + i) for i in range(len(columns) + 1))
        for span in SPANS_S:
            db.execute(
                f"INSERT INTO {table} (span, bucket, {', '.join(columns)}, {', '.join(SUMS)}) "
                f"SELECT {span}, CAST(finished_at / {span} AS INTEGER) * {span}, {group}, "
                "COUNT(*), SUM(input_tokens), SUM(output_tokens), SUM(cost_usd), SUM(latency_s), "
                f"SUM(COALESCE(ttft_s, 0)), COUNT(ttft_s), 0, 0, {', '.join(slots)} "
                f"FROM calls GROUP BY {positions}"
            )


def upgrade(db: sqlite3.Connection) -> bool:
    """Rollup tables laid out otherwise than `SCHEMA` (written by an earlier version: fewer
    columns, another key) are dropped and made anew; they hold nothing the calls do not (but
    the savings, which start again from zero). True when they were."""
    stale = False
    for table, columns in TABLES.items():
        info = list(db.execute(f"PRAGMA table_info({table})"))
        names = [row[1] for row in info]
        key = [row[1] for row in sorted(info, key=lambda row: row[5]) if row[5]]
        if names and (set(names) != {"span", "bucket", *columns, *SUMS} or
                      key != ["span", "bucket", *columns]):  # fmt: skip
            stale = True
    if not stale:
        return False
    db.execute("BEGIN IMMEDIATE")
    try:
        for table in TABLES:
            db.execute(f"DROP TABLE IF EXISTS {table}")
        for statement in SCHEMA.split(";"):
            if statement.strip():
                db.execute(statement)
        backfill(db)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return True


@dataclass(frozen=True)
class Totals:
    """Sums over rollup rows, with the percentiles their histogram gives."""

    calls: int
    errors: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    latency_sum_s: float
    ttft_sum_s: float
    ttft_calls: int
    baseline_usd: float
    baselined_cost_usd: float
    histogram: tuple[int, ...]
    ttft_histogram: tuple[int, ...] = (0,) * len(TTFT_HISTOGRAM)

    @property
    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0

    @property
    def mean_ttft_s(self) -> float | None:
        return self.ttft_sum_s / self.ttft_calls if self.ttft_calls else None

    @property
    def saved_usd(self) -> float:
        return self.baseline_usd - self.baselined_cost_usd

    def percentile(self, q: float) -> float | None:
        return percentile(self.histogram, q)

    def ttft_percentile(self, q: float) -> float | None:
        """The `q` quantile of the time to first token of the calls that streamed."""
        return percentile(self.ttft_histogram, q, TTFT_BOUNDS_S)


def percentile(
    histogram: Sequence[int], q: float, bounds: Sequence[float] = LATENCY_BOUNDS_S
) -> float | None:
    """The `q` quantile (0..1) of the values counted in `histogram` (upper bounds `bounds`),
    interpolated within its bucket (the open last bucket reads as twice its lower bound)."""
    total = sum(histogram)
    if total == 0:
        return None
    rank = q * total
    seen = 0.0
    for i, count in enumerate(histogram):
        if count and seen + count >= rank:
            low = 0.0 if i == 0 else bounds[i - 1]
            high = bounds[i] if i < len(bounds) else low * 2
            return low + (high - low) * max(0.0, rank - seen) / count
        seen += count
    return bounds[-1] * 2


SUM_COLUMNS = (
    "SUM(calls), SUM(CASE WHEN status != 'ok' THEN calls ELSE 0 END), SUM(input_tokens), "
    "SUM(output_tokens), SUM(cost_usd), SUM(latency_s), SUM(ttft_s), SUM(ttft_calls), "
    f"SUM(baseline_usd), SUM(baselined_cost_usd), {', '.join(f'SUM({h})' for h in HISTOGRAM)}, "
    f"{', '.join(f'SUM({t})' for t in TTFT_HISTOGRAM)}"
)


def totals(row: Sequence[Any]) -> Totals:
    """The `Totals` of a row selected as `SUM_COLUMNS`."""
    values = [v or 0 for v in row]
    return Totals(
        calls=int(values[0]),
        errors=int(values[1]),
        input_tokens=int(values[2]),
        output_tokens=int(values[3]),
        cost_usd=float(values[4]),
        latency_sum_s=float(values[5]),
        ttft_sum_s=float(values[6]),
        ttft_calls=int(values[7]),
        baseline_usd=float(values[8]),
        baselined_cost_usd=float(values[9]),
        histogram=tuple(int(v) for v in values[10 : 10 + len(HISTOGRAM)]),
        ttft_histogram=tuple(int(v) for v in values[10 + len(HISTOGRAM) :]),
    )
