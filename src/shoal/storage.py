"""SQLite files as shoal keeps them: WAL (readers never block the writer), no fsync per commit
(`synchronous=NORMAL`: a crash loses at most the last commits, never the file), a writer waits
up to five seconds for a lock instead of failing, and autocommit unless a transaction is begun."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_sqlite(path: str | Path, schema: str) -> sqlite3.Connection:
    """Open (creating folders and tables as needed) a connection shareable across threads;
    callers serialise its use with a lock of their own."""
    if str(path) != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=5000")
    db.executescript(schema)
    return db
