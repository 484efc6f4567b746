"""Recorded examples for distillation: what a route or a pipeline step was asked, and what its
model answered.

Recording is opt-in per route (`record: true` in the fleet file) or per pipeline step
(`record=True`); nothing else is ever written here. A recording keeps the request as the model
saw it (its messages and schema), the answer's text and, when the request asked for JSON, the
parsed value. They live in the trace store's SQLite file, in their own table.
"""

from __future__ import annotations

import json
import re
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from shoal.messages import ChatRequest, ChatResponse

SCHEMA = """
CREATE TABLE IF NOT EXISTS recordings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    target TEXT NOT NULL,
    model TEXT NOT NULL,
    messages TEXT NOT NULL,
    schema TEXT,
    answer TEXT NOT NULL,
    parsed TEXT,
    params TEXT NOT NULL DEFAULT '{}',
    cost_usd REAL NOT NULL DEFAULT 0,
    latency_s REAL NOT NULL DEFAULT 0,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS recordings_target ON recordings (target, created_at);
"""


@dataclass(frozen=True)
class Recording:
    """One answered call of `target` (a route name, a model id, or `PIPELINE/STEP`): the
    request's `messages` (role, content), JSON `schema` and other `params` (max_tokens,
    temperature, ...), the `answer` text of `model`, `parsed`, the answer as JSON when the
    request asked for JSON and the answer parses, and what the answer cost (every attempt of a
    cascade included) and how long it took."""

    target: str
    model: str
    messages: list[dict[str, str]]
    answer: str
    schema: dict[str, Any] | None = None
    parsed: Any | None = None
    params: dict[str, Any] = field(default_factory=dict)
    cost_usd: float = 0.0
    latency_s: float = 0.0
    created_at: float = 0.0
    id: int | None = field(default=None, compare=False)

    @property
    def input(self) -> str:
        """The last user message: the part of the request that changes from call to call."""
        users = [m["content"] for m in self.messages if m["role"] == "user"]
        return users[-1] if users else ""

    def request(self) -> ChatRequest:
        """The request again, as the model got it."""
        return ChatRequest.model_validate(
            {"messages": self.messages, "json_schema": self.schema, **self.params}
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "model": self.model,
            "messages": self.messages,
            "schema": self.schema,
            "answer": self.answer,
            "parsed": self.parsed,
            "params": self.params,
            "cost_usd": self.cost_usd,
            "latency_s": self.latency_s,
            "created_at": self.created_at,
        }


def recording(target: str, request: ChatRequest, response: ChatResponse, at: float) -> Recording:
    """The recording of `response` to `request`, made for `target`."""
    parsed = None
    if request.wants_json:
        try:
            parsed = json.loads(response.text)
        except ValueError:
            parsed = None
    return Recording(
        target=target,
        model=response.model,
        messages=[{"role": m.role, "content": m.content} for m in request.messages],
        answer=response.text,
        schema=request.json_schema,
        parsed=parsed,
        params=request.model_dump(
            mode="json", exclude={"messages", "json_schema", "max_cost_usd"}, exclude_defaults=True
        ),
        cost_usd=response.total_cost_usd,
        latency_s=response.latency_s,
        created_at=at,
    )


@dataclass(frozen=True)
class RecordedTarget:
    """What is recorded for one target: how many answers, by which models, over what time."""

    target: str
    count: int
    models: dict[str, int]
    first_at: float
    last_at: float


def add_missing_columns(db: sqlite3.Connection, table: str, schema: str) -> None:
    """Add the columns `schema` gives `table` that a file written by an older version lacks
    (each with its default)."""
    body = re.search(rf"CREATE TABLE IF NOT EXISTS {table} \((.*?)\n\);", schema, re.S)
    if body is None:
        return
    have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
    for line in body.group(1).splitlines():
        column = line.strip().rstrip(",")
        name = column.split(" ", 1)[0]
        if column and name not in have and "PRIMARY KEY" not in column:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
