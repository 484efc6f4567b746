"""Rollups, written with the traces: their sums equal the calls', at every span; a store from
before they existed gains them from its calls; percentiles come from their histograms (latency,
and time to first token, checked against the calls'); what routing saved is counted once per
routed call."""

from __future__ import annotations

import math
import random
import sqlite3
from pathlib import Path

import pytest

from shoal.traces import dashboard, rollups
from shoal.traces.store import CallRecord, TraceStore

DECISION = {
    "route": "r",
    "models": ["small", "large"],
    "reason": "cascade",
    "estimates": [
        {"model": "small", "quality": 0.6, "cost_usd": 1e-6},
        {"model": "large", "quality": 0.9, "cost_usd": 1e-4},
    ],
}


def calls(n: int, seed: int = 3) -> list[CallRecord]:
    rng = random.Random(seed)
    return [
        CallRecord(
            model=rng.choice(["small", "large", "other"]),
            route=rng.choice([None, "r"]),
            key=rng.choice([None, "a", "b"]),
            status=rng.choice(["ok", "ok", "ok", "error"]),
            input_tokens=rng.randrange(100),
            output_tokens=rng.randrange(100),
            latency_s=rng.random() * 3,
            ttft_s=rng.choice([None, 0.1]),
            cost_usd=rng.randrange(1000) * 1e-9,
            finished_at=1_700_000_000 + rng.random() * 3 * 86400,
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize("span", rollups.SPANS_S)
def test_the_rollups_sum_to_what_the_calls_hold(tmp_path: Path, span: int) -> None:
    store = TraceStore(tmp_path / "t.sqlite")
    made = calls(500)
    store.record_calls(made[:300])
    for call in made[300:]:
        store.record_call(call)
    row = store.read(f"SELECT {rollups.SUM_COLUMNS} FROM call_rollups WHERE span = ?", [span])
    total = rollups.totals(row[0])
    assert total.calls == 500
    assert total.errors == sum(c.status != "ok" for c in made)
    assert total.input_tokens == sum(c.input_tokens for c in made)
    assert total.output_tokens == sum(c.output_tokens for c in made)
    assert total.cost_usd == pytest.approx(sum(c.cost_usd for c in made), abs=1e-12)
    assert total.ttft_calls == sum(c.ttft_s is not None for c in made)
    assert sum(total.histogram) == 500
    per_key = dict(
        store.read(f"SELECT key, SUM(calls) FROM key_rollups WHERE span = {span} GROUP BY key")
    )
    keyed = store.read(f"SELECT {rollups.SUM_COLUMNS} FROM key_rollups WHERE span = ?", [span])
    by_key = rollups.totals(keyed[0])
    assert (by_key.calls, by_key.errors, by_key.histogram) == (
        total.calls,
        total.errors,
        total.histogram,
    )
    assert by_key.cost_usd == pytest.approx(total.cost_usd, abs=1e-12)
    assert per_key == {
        k or "": sum((c.key or "") == (k or "") for c in made) for k in (None, "a", "b")
    }
    store.close()


def test_the_overview_reads_the_same_totals_at_every_window(tmp_path: Path) -> None:
    store = TraceStore(tmp_path / "t.sqlite")
    made = calls(200)
    store.record_calls(made)
    seen = dashboard.overview(store, since=None)
    assert seen.totals.calls == 200
    assert sum(b.totals.calls for b in seen.models) == 200
    assert sum(b.totals.calls for b in seen.keys) == 200
    assert {b.name for b in seen.routes} == {"r"}
    assert seen.routes[0].totals.calls == sum(c.route == "r" for c in made)
    store.close()


def test_a_store_from_before_the_rollups_gains_them_from_its_calls(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE calls (
            id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT, step TEXT, item TEXT, route TEXT,
            model TEXT NOT NULL, status TEXT NOT NULL, error TEXT,
            input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0,
            latency_s REAL NOT NULL DEFAULT 0, compute_s REAL NOT NULL DEFAULT 0,
            cost_usd REAL NOT NULL DEFAULT 0, cached INTEGER NOT NULL DEFAULT 0, decision TEXT,
            started_at REAL NOT NULL, finished_at REAL NOT NULL
        );
        INSERT INTO calls (model, status, input_tokens, latency_s, cost_usd, started_at,
                           finished_at)
        VALUES ('m', 'ok', 5, 0.02, 0.5, 100, 100), ('m', 'error', 7, 3.0, 0.25, 200, 200);
        """
    )
    db.commit()
    db.close()
    store = TraceStore(path)
    seen = dashboard.overview(store, since=None)
    assert seen.totals.calls == 2
    assert seen.totals.errors == 1
    assert seen.totals.input_tokens == 12
    assert seen.totals.cost_usd == pytest.approx(0.75)
    assert sum(seen.totals.histogram) == 2
    store.record_call(CallRecord(model="m", key="k", ttft_s=0.1, finished_at=300))
    assert store.calls()[-1].key == "k"
    assert dashboard.overview(store, since=None).totals.calls == 3
    store.close()
    reopened = TraceStore(path)
    assert reopened.read("SELECT SUM(calls) FROM call_rollups WHERE span = 60") == [(3,)]
    assert reopened.read(
        "SELECT key, SUM(calls) FROM key_rollups WHERE span = 60 GROUP BY key"
    ) == [
        ("", 2),
        ("k", 1),
    ]
    reopened.close()


def test_percentiles_come_from_the_histogram_within_a_bucket() -> None:
    histogram = [0] * len(rollups.HISTOGRAM)
    histogram[rollups.histogram_slot(0.3)] = 90  # (0.25, 0.5]
    histogram[rollups.histogram_slot(4.0)] = 10  # (2, 5]
    p50 = rollups.percentile(histogram, 0.5)
    p95 = rollups.percentile(histogram, 0.95)
    assert p50 is not None
    assert 0.25 < p50 <= 0.5
    assert p95 is not None
    assert 2.0 < p95 <= 5.0
    assert rollups.percentile([0] * len(histogram), 0.5) is None


def test_what_routing_saved_is_counted_once_per_routed_call(tmp_path: Path) -> None:
    store = TraceStore(tmp_path / "t.sqlite")
    # One cascade call: the small model answered and escalated, the large one answered.
    store.record_calls(
        [
            CallRecord(model="small", route="r", cost_usd=2e-6, decision=DECISION, finished_at=1),
            CallRecord(model="large", route="r", cost_usd=9e-5, decision=DECISION, finished_at=1),
            # One that stopped at the small model.
            CallRecord(model="small", route="r", cost_usd=1e-6, decision=DECISION, finished_at=2),
        ]
    )
    seen = dashboard.overview(store, since=None)
    assert seen.totals.baseline_usd == pytest.approx(2e-4)  # the large model's, twice
    assert seen.totals.saved_usd == pytest.approx(2e-4 - (2e-6 + 9e-5) - 1e-6)
    store.close()


def exact_quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def bucket_of(value: float) -> tuple[float, float]:
    slot = rollups.histogram_slot(value, rollups.TTFT_BOUNDS_S)
    low = 0.0 if slot == 0 else rollups.TTFT_BOUNDS_S[slot - 1]
    high = rollups.TTFT_BOUNDS_S[slot] if slot < len(rollups.TTFT_BOUNDS_S) else low * 2
    return low, high


def check_ttft(seen: rollups.Totals, made: list[CallRecord]) -> None:
    """The histogram's p50 and p95 lie in the bucket of the calls' own p50 and p95."""
    streamed = [c.ttft_s for c in made if c.ttft_s is not None]
    assert sum(seen.ttft_histogram) == len(streamed) == seen.ttft_calls
    for q in (0.5, 0.95):
        estimate = seen.ttft_percentile(q)
        assert estimate is not None
        low, high = bucket_of(exact_quantile(streamed, q))
        assert low <= estimate <= high, (q, estimate, low, high)


def ttft_calls(n: int, seed: int = 11) -> list[CallRecord]:
    rng = random.Random(seed)
    return [
        CallRecord(
            model=rng.choice(["small", "large"]),
            ttft_s=None if rng.random() < 0.2 else rng.lognormvariate(-2.5, 1.2),
            latency_s=rng.random(),
            finished_at=1_700_000_000 + rng.random() * 2 * 86400,
        )
        for _ in range(n)
    ]


def test_time_to_first_token_percentiles_match_the_calls(tmp_path: Path) -> None:
    store = TraceStore(tmp_path / "t.sqlite")
    made = ttft_calls(2000)
    store.record_calls(made)
    seen = dashboard.overview(store, since=None)
    check_ttft(seen.totals, made)
    for breakdown in seen.models:
        check_ttft(breakdown.totals, [c for c in made if c.model == breakdown.name])
    assert rollups.percentile([0] * len(rollups.TTFT_HISTOGRAM), 0.5) is None
    store.close()


def test_rollups_from_before_the_ttft_histogram_gain_it_from_the_calls(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    made = ttft_calls(500)
    store = TraceStore(path)
    store.record_calls(made)
    store.close()
    db = sqlite3.connect(path)  # as an older shoal left it: rollups without the histogram
    for table in rollups.TABLES:
        for name in rollups.TTFT_HISTOGRAM:
            db.execute(f"ALTER TABLE {table} DROP COLUMN {name}")
    db.commit()
    db.close()
    reopened = TraceStore(path)
    check_ttft(dashboard.overview(reopened, since=None).totals, made)
    for span in rollups.SPANS_S:
        keyed = reopened.read(
            f"SELECT {rollups.SUM_COLUMNS} FROM key_rollups WHERE span = ?", [span]
        )
        check_ttft(rollups.totals(keyed[0]), made)
    later = ttft_calls(50, seed=12)
    reopened.record_calls(later)
    check_ttft(dashboard.overview(reopened, since=None).totals, made + later)
    reopened.close()


def test_rollups_laid_out_otherwise_are_made_anew_from_the_calls(tmp_path: Path) -> None:
    path = tmp_path / "traces.sqlite"
    store = TraceStore(path)
    store.record_calls(
        [CallRecord(model="m", cost_usd=0.5, finished_at=100.0 + i) for i in range(3)]
    )
    store.close()
    db = sqlite3.connect(path)  # an earlier layout: another key, fewer columns
    db.executescript(
        "DROP TABLE key_rollups; CREATE TABLE key_rollups (span INTEGER, bucket INTEGER, "
        "key TEXT, calls REAL, PRIMARY KEY (span, bucket)) WITHOUT ROWID;"
    )
    db.close()
    store = TraceStore(path)
    store.record_call(CallRecord(model="m", cost_usd=0.5, finished_at=200.0))
    db = sqlite3.connect(path)
    ((calls, cost),) = db.execute(
        "SELECT SUM(calls), SUM(cost_usd) FROM key_rollups WHERE span = 3600"
    ).fetchall()
    assert (calls, cost) == (4, 2.0)
    store.close()
