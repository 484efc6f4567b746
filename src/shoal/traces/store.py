"""The trace store: every model call and every run, in one SQLite file (WAL).

A record is committed as soon as its call ends, so a process killed mid-run leaves every
finished call readable. Writes are short and synchronous (WAL with `synchronous=NORMAL` does not
fsync per commit); readers never block the writer.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from shoal.storage import open_sqlite
from shoal.traces import rollups
from shoal.traces.recordings import SCHEMA as _RECORDINGS_SCHEMA
from shoal.traces.recordings import RecordedTarget, Recording, add_missing_columns

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    budget_usd REAL,
    deadline_s REAL,
    cost_usd REAL NOT NULL DEFAULT 0,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE IF NOT EXISTS calls (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT,
    step TEXT,
    item TEXT,
    route TEXT,
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    latency_s REAL NOT NULL DEFAULT 0,
    compute_s REAL NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    cached INTEGER NOT NULL DEFAULT 0,
    decision TEXT,
    started_at REAL NOT NULL,
    finished_at REAL NOT NULL,
    key TEXT,
    ttft_s REAL,
    recording_id INTEGER
);
CREATE INDEX IF NOT EXISTS calls_run ON calls (run_id, id);
CREATE INDEX IF NOT EXISTS calls_model ON calls (model, finished_at);
"""
# The request log's filters (an index on one column also orders its rows by id). Created after
# older files gain the columns.
_INDEXES = (
    "CREATE INDEX IF NOT EXISTS calls_model_id ON calls (model, id)",
    "CREATE INDEX IF NOT EXISTS calls_key ON calls (key)",
    "CREATE INDEX IF NOT EXISTS calls_route ON calls (route)",
    "CREATE INDEX IF NOT EXISTS calls_status ON calls (status)",
    "CREATE INDEX IF NOT EXISTS calls_finished ON calls (finished_at)",
)


class CallRecord(BaseModel):
    """One model call: who asked (run, step, item), what answered, what it cost."""

    model_config = ConfigDict(frozen=True)

    model: str
    status: str = "ok"
    run_id: str | None = None
    step: str | None = None
    item: str | None = None
    route: str | None = None
    error: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    latency_s: float = 0.0
    compute_s: float = 0.0
    cost_usd: float = 0.0
    cached: bool = False
    decision: dict[str, Any] | None = None
    started_at: float = 0.0
    finished_at: float = 0.0
    key: str | None = None
    ttft_s: float | None = None
    # The recording of the request (`recordings.id`), where the route or step records them.
    recording_id: int | None = None
    id: int | None = None


class RunRecord(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    status: str
    started_at: float
    finished_at: float | None = None
    budget_usd: float | None = None
    deadline_s: float | None = None
    cost_usd: float = 0.0
    detail: dict[str, Any] = {}


_CALL_COLUMNS = [f for f in CallRecord.model_fields if f != "id"]


class TraceStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = open_sqlite(path, _SCHEMA + _RECORDINGS_SCHEMA + rollups.SCHEMA)
        add_missing_columns(self._db, "recordings", _RECORDINGS_SCHEMA)
        add_missing_columns(self._db, "calls", _SCHEMA)
        for index in _INDEXES:
            self._db.execute(index)
        rollups.upgrade(self._db)
        self._backfill_rollups()
        self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _backfill_rollups(self) -> None:
        """A file written before the rollups existed has them counted from its calls."""
        db = self._db
        if db.execute("SELECT 1 FROM call_rollups LIMIT 1").fetchone() is not None:
            return
        if db.execute("SELECT 1 FROM calls LIMIT 1").fetchone() is None:
            return
        with self._write():
            rollups.backfill(db)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- calls ---------------------------------------------------------------------------------

    def record_call(self, call: CallRecord) -> int:
        with self._write() as db:
            rollups.add(db, (call,))
            return self._insert(db, call)

    def record_calls(self, calls: Sequence[CallRecord]) -> None:
        """Record several calls in one transaction (one commit instead of one each), with
        their rollups."""
        with self._write() as db:
            for call in calls:
                self._insert(db, call)
            rollups.add(db, calls)

    def read(self, query: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """The rows of one read-only query (the dashboard's, in `shoal.traces.dashboard`)."""
        with self._lock:
            return self._db.execute(query, args).fetchall()

    @staticmethod
    def _insert(db: sqlite3.Connection, call: CallRecord) -> int:
        values = call.model_dump(exclude={"id"})
        values["decision"] = json.dumps(values["decision"]) if values["decision"] else None
        values["cached"] = int(values["cached"])
        cursor = db.execute(
            f"INSERT INTO calls ({', '.join(_CALL_COLUMNS)}) "
            f"VALUES ({', '.join('?' for _ in _CALL_COLUMNS)})",
            [values[c] for c in _CALL_COLUMNS],
        )
        if call.run_id is not None:
            db.execute(
                "UPDATE runs SET cost_usd = cost_usd + ? WHERE id = ?",
                (call.cost_usd, call.run_id),
            )
        return int(cursor.lastrowid or 0)

    def calls(self, run_id: str | None = None, *, limit: int = 10_000) -> list[CallRecord]:
        query = f"SELECT id, {', '.join(_CALL_COLUMNS)} FROM calls"
        args: tuple[Any, ...] = ()
        if run_id is not None:
            query += " WHERE run_id = ?"
            args = (run_id,)
        query += " ORDER BY id LIMIT ?"
        with self._lock:
            rows = self._db.execute(query, (*args, limit)).fetchall()
        return [self._call(row) for row in rows]

    @staticmethod
    def _call(row: tuple[Any, ...]) -> CallRecord:
        data = dict(zip(["id", *_CALL_COLUMNS], row, strict=True))
        data["decision"] = json.loads(data["decision"]) if data["decision"] else None
        data["cached"] = bool(data["cached"])
        return CallRecord.model_validate(data)

    # -- recordings (opt-in, for distillation) --------------------------------------------------

    def record_example(self, example: Recording) -> int:
        with self._write() as db:
            cursor = db.execute(
                "INSERT INTO recordings (target, model, messages, schema, answer, parsed, "
                "params, cost_usd, latency_s, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    example.target,
                    example.model,
                    json.dumps(example.messages),
                    json.dumps(example.schema) if example.schema is not None else None,
                    example.answer,
                    json.dumps(example.parsed) if example.parsed is not None else None,
                    json.dumps(example.params),
                    example.cost_usd,
                    example.latency_s,
                    example.created_at,
                ),
            )
            return int(cursor.lastrowid or 0)

    def recordings(
        self,
        target: str,
        *,
        since: float | None = None,
        model: str | None = None,
        limit: int | None = None,
    ) -> list[Recording]:
        """What was recorded for `target`, oldest first; `since` a Unix time, `model` only the
        answers of that model (a route's teacher, say)."""
        query = (
            "SELECT id, target, model, messages, schema, answer, parsed, params, cost_usd, "
            "latency_s, created_at FROM recordings WHERE target = ?"
        )
        args: list[Any] = [target]
        if since is not None:
            query += " AND created_at >= ?"
            args.append(since)
        if model is not None:
            query += " AND model = ?"
            args.append(model)
        query += " ORDER BY id LIMIT ?"
        args.append(-1 if limit is None else limit)
        with self._lock:
            rows = self._db.execute(query, args).fetchall()
        return [
            Recording(
                id=row[0],
                target=row[1],
                model=row[2],
                messages=json.loads(row[3]),
                schema=json.loads(row[4]) if row[4] is not None else None,
                answer=row[5],
                parsed=json.loads(row[6]) if row[6] is not None else None,
                params=json.loads(row[7]),
                cost_usd=row[8],
                latency_s=row[9],
                created_at=row[10],
            )
            for row in rows
        ]

    def recorded_targets(self) -> list[RecordedTarget]:
        with self._lock:
            rows = self._db.execute(
                "SELECT target, model, COUNT(*), MIN(created_at), MAX(created_at) "
                "FROM recordings GROUP BY target, model ORDER BY target, model"
            ).fetchall()
        targets: dict[str, RecordedTarget] = {}
        for target, model, count, first, last in rows:
            seen = targets.get(target)
            if seen is None:
                targets[target] = RecordedTarget(target, count, {model: count}, first, last)
            else:
                targets[target] = RecordedTarget(
                    target,
                    seen.count + count,
                    {**seen.models, model: count},
                    min(seen.first_at, first),
                    max(seen.last_at, last),
                )
        return list(targets.values())

    def forget_recordings(self, target: str | None = None, *, before: float | None = None) -> int:
        """Delete recordings (of `target`, or all; older than `before`, or all): how many."""
        query, args = "DELETE FROM recordings WHERE 1 = 1", list[Any]()
        if target is not None:
            query += " AND target = ?"
            args.append(target)
        if before is not None:
            query += " AND created_at < ?"
            args.append(before)
        with self._write() as db:
            return db.execute(query, args).rowcount

    # -- runs ----------------------------------------------------------------------------------

    def start_run(
        self,
        name: str,
        *,
        budget_usd: float | None = None,
        deadline_s: float | None = None,
        detail: dict[str, Any] | None = None,
    ) -> str:
        run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        with self._write() as db:
            db.execute(
                "INSERT INTO runs (id, name, status, started_at, budget_usd, deadline_s, detail) "
                "VALUES (?, ?, 'running', ?, ?, ?, ?)",
                (run_id, name, time.time(), budget_usd, deadline_s, json.dumps(detail or {})),
            )
        return run_id

    def finish_run(self, run_id: str, status: str, detail: dict[str, Any] | None = None) -> None:
        with self._write() as db:
            if detail is not None:
                db.execute(
                    "UPDATE runs SET status = ?, finished_at = ?, detail = ? WHERE id = ?",
                    (status, time.time(), json.dumps(detail), run_id),
                )
            else:
                db.execute(
                    "UPDATE runs SET status = ?, finished_at = ? WHERE id = ?",
                    (status, time.time(), run_id),
                )

    def run(self, run_id: str) -> RunRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, name, status, started_at, finished_at, budget_usd, deadline_s, "
                "cost_usd, detail FROM runs WHERE id = ?",
                (run_id,),
            ).fetchone()
        return self._run(row) if row else None

    def runs(self, *, limit: int = 50) -> list[RunRecord]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, name, status, started_at, finished_at, budget_usd, deadline_s, "
                "cost_usd, detail FROM runs ORDER BY started_at DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [self._run(row) for row in rows]

    @staticmethod
    def _run(row: tuple[Any, ...]) -> RunRecord:
        keys = ["id", "name", "status", "started_at", "finished_at"]
        keys += ["budget_usd", "deadline_s", "cost_usd", "detail"]
        data = dict(zip(keys, row, strict=True))
        data["detail"] = json.loads(data["detail"])
        return RunRecord.model_validate(data)
