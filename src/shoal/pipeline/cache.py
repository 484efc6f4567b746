"""A content-addressed cache of model answers, on disk (SQLite).

The key is a hash of the model name and the full request, so only identical calls hit. A hit
costs nothing and is traced as cached.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

from shoal.messages import ChatRequest, ChatResponse
from shoal.storage import open_sqlite


def cache_key(model: str, request: ChatRequest) -> str:
    # The cost cap is how much this call may spend, not what it asks: it is not part of the key.
    payload = model + "\0" + request.model_dump_json(exclude={"max_cost_usd"})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class ResponseCache:
    def __init__(self, path: str | Path) -> None:
        self._lock = threading.Lock()
        self._db = open_sqlite(
            path,
            "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, response TEXT NOT NULL);",
        )

    def get(self, model: str, request: ChatRequest) -> ChatResponse | None:
        with self._lock:
            row = self._db.execute(
                "SELECT response FROM answers WHERE key = ?", (cache_key(model, request),)
            ).fetchone()
        return ChatResponse.model_validate_json(row[0]) if row else None

    def put(self, model: str, request: ChatRequest, response: ChatResponse) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO answers (key, response) VALUES (?, ?)",
                (cache_key(model, request), response.model_dump_json()),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()
