"""Dashboard sessions: an admin key signs in once; the browser then holds only a random session
token, in an HttpOnly, SameSite=Strict cookie scoped to `/ui`.

Sessions are kept in the keys file's SQLite (table `sessions`), so a restarted server keeps its
signed-in users: a row holds the token's sha256 (never the token), the key's sha256 (never the
key) and when the session expires. A key revoked or stripped of its admin right ends its
sessions at their next request (and revoking it deletes their rows). Each session has its own
CSRF token, derived from the session token: every state-changing form and fetch carries it (a
hidden field, or the `x-csrf-token` header) and a request without the session's token is
refused. A server without a keys file keeps its sessions in memory.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from shoal.storage import open_sqlite

COOKIE = "shoal_ui"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
SESSION_S = 12 * 3600
MAX_SESSIONS = 1024

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    token_hash TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL,
    key_name TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sessions_key ON sessions (key_hash);
CREATE INDEX IF NOT EXISTS sessions_expiry ON sessions (expires_at);
"""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def csrf_of(token: str) -> str:
    """The CSRF token of the session whose token is `token` (no one without it can make it)."""
    return hmac.new(token.encode("utf-8"), b"shoal-ui-csrf", hashlib.sha256).hexdigest()[:32]


@dataclass
class Session:
    id: str  # the session token (the cookie's value)
    key_hash: str
    key_name: str
    csrf: str
    expires_at: float

    def csrf_ok(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token, self.csrf)


class Sessions:
    """The signed-in browsers of a keys file (bounded: the oldest go first), in its SQLite;
    `Sessions()` keeps them in memory."""

    def __init__(self, path: str | Path = ":memory:") -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = open_sqlite(path, SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def open(self, key_hash: str, key_name: str) -> Session:
        now = time.time()
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))
                self._db.execute(
                    "DELETE FROM sessions WHERE token_hash IN (SELECT token_hash FROM sessions "
                    "ORDER BY created_at DESC LIMIT -1 OFFSET ?)",
                    (MAX_SESSIONS - 1,),
                )
                self._db.execute(
                    "INSERT INTO sessions (token_hash, key_hash, key_name, created_at, "
                    "expires_at) VALUES (?, ?, ?, ?, ?)",
                    (token_hash(token), key_hash, key_name, now, now + SESSION_S),
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return Session(token, key_hash, key_name, csrf_of(token), now + SESSION_S)

    def get(self, token: str | None) -> Session | None:
        """The live session whose token is `token` (None when unknown or expired)."""
        if not token:
            return None
        with self._lock:
            row = self._db.execute(
                "SELECT key_hash, key_name, expires_at FROM sessions WHERE token_hash = ?",
                (token_hash(token),),
            ).fetchone()
        if row is None:
            return None
        key_hash, key_name, expires_at = row
        if expires_at <= time.time():
            self.end(token)
            return None
        return Session(token, key_hash, key_name, csrf_of(token), expires_at)

    def end(self, token: str) -> None:
        """End the session whose token is `token` (signing out)."""
        with self._lock:
            self._db.execute("DELETE FROM sessions WHERE token_hash = ?", (token_hash(token),))

    def end_key(self, key_hash: str) -> None:
        """End every session of the key whose sha256 is `key_hash`."""
        with self._lock:
            self._db.execute("DELETE FROM sessions WHERE key_hash = ?", (key_hash,))

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0])
