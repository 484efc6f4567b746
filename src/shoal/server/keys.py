"""API keys with budgets and rate limits, and the ledger that keeps every key within its budget.

A key is shown once, when it is created; the store keeps only its sha256 (and its first few
characters, to recognise it in a list), in its own SQLite file.

Each key's budget is a ledger `Account` (`shoal.ledger`: integer picodollars, so sums are exact).
Before a call starts, the server holds the call's worst-case cost (its plan's `worst_usd`) on the
key's account; a call is admitted only when the key's settled spend plus every hold in flight
plus this one fits the budget, checked and taken in one step on the event loop, so any number of
concurrent calls on one key can never reserve past its budget. The engine caps the call at what
is held and settles the hold to what the call cost however it ends (answered, failed, cut
short), the same figure its trace records; a call is never charged less than it cost.

Settled charges reach the file in batches, `FLUSH_AFTER_S` after they settle (reads through
the store write them first); a killed server loses at most that last moment of charges, never
a reservation's protection (budgets are enforced in memory, as calls settle).

Since budgets live in memory, one server process owns a keys file: a store opened to serve
(`KeyStore(path, serving=True)`) takes an exclusive lock on `<keys file>.lock` for its life,
and a second server on the same file fails at startup with `KeysInUseError` naming the process
that holds it. The lock is the operating system's (`flock`): it dies with its process, however
that process ends. The command line's `shoal keys ...` opens the file without the lock, so keys
can be created, revoked and re-budgeted while the server runs; the server sees any change on its
next request (SQLite's `data_version` tells it, for a few microseconds, that another
connection committed) and reloads the keys it holds, keeping the money their calls in flight
hold.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import sqlite3
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import EllipsisType

from pydantic import BaseModel, ConfigDict

from shoal.errors import AuthenticationError, ConfigError, KeysInUseError, RateLimitedError
from shoal.ledger import Account, Hold, to_pico, to_usd
from shoal.storage import open_sqlite

if sys.platform == "win32":
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except PermissionError:
            return False
        return True

else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


log = logging.getLogger(__name__)

KEY_PREFIX = "sk-shoal-"
FLUSH_AFTER_S = 0.05
LOCK_SUFFIX = ".lock"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    hash TEXT NOT NULL UNIQUE,
    hint TEXT NOT NULL,
    budget_pusd INTEGER,
    spent_pusd INTEGER NOT NULL DEFAULT 0,
    requests INTEGER NOT NULL DEFAULT 0,
    rpm INTEGER,
    revoked INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    admin INTEGER NOT NULL DEFAULT 0
);
"""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyRecord(BaseModel):
    """A key as the store lists it (never the key itself)."""

    model_config = ConfigDict(frozen=True)

    id: str
    name: str
    hint: str
    budget_usd: float | None
    spent_usd: float
    requests: int
    rpm: int | None
    revoked: bool
    created_at: float
    admin: bool = False


@dataclass
class KeyState:
    """A key's live state in the server: its ledger account (budget, settled spend, holds of
    calls in flight) and its rate-limit bucket. `version` is the store's count of changes to
    the keys file when the state was read from it."""

    id: str
    name: str
    account: Account
    rpm: int | None
    revoked: bool
    version: int
    admin: bool = False
    tokens: float = 0.0
    tokens_at: float = field(default_factory=time.monotonic)


class KeyStore:
    """A keys file. Opened with `serving`, it is the one server's: it holds the file's lock (or
    raises `KeysInUseError`) until `close()`."""

    def __init__(self, path: str | Path, *, serving: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._owner = _take_lock(self.path) if serving and str(path) != ":memory:" else None
        try:
            self._db = open_sqlite(path, _SCHEMA)
            _add_admin_column(self._db)
        except BaseException:
            self._release()
            raise
        self._live: dict[str, KeyState] = {}
        # Changes other connections (the command line) committed to the file, as far as the
        # server has seen them: key states read before the last change are read again.
        self._data_version = self._read_data_version()
        self._version = 0
        # Settled charges are written in one transaction FLUSH_AFTER_S after the first of them,
        # never on a request's path (a commit is 30-150 µs, and now and then a checkpoint much
        # more). Reads write them first.
        self._charges: dict[str, list[int]] = {}
        self._flushing = threading.Lock()
        self._scheduled = False

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._db.close()
        self._release()

    def _release(self) -> None:
        if self._owner is not None:
            os.close(self._owner)  # closing the descriptor releases its lock
            self._owner = None

    def flush(self) -> None:
        """Write every settled charge not written yet."""
        with self._flushing:
            charges, self._charges = self._charges, {}
            self._scheduled = False
            if not charges:
                return
            try:
                with self._lock:
                    self._db.execute("BEGIN IMMEDIATE")
                    self._db.executemany(
                        "UPDATE keys SET spent_pusd = spent_pusd + ?, requests = requests + ? "
                        "WHERE id = ?",
                        [(charged, count, key_id) for key_id, (charged, count) in charges.items()],
                    )
                    self._db.execute("COMMIT")
            except sqlite3.Error as exc:  # kept, to be written with the next ones
                log.error("could not record key charges (kept for the next write): %s", exc)
                with self._lock:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                for key_id, (charged, count) in charges.items():
                    total = self._charges.setdefault(key_id, [0, 0])
                    total[0] += charged
                    total[1] += count

    def _charge(self, key_id: str, charged: int) -> None:
        with self._flushing:
            total = self._charges.setdefault(key_id, [0, 0])
            total[0] += charged
            total[1] += 1
            if self._scheduled:
                return
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            if loop is not None:
                self._scheduled = True
                loop.call_later(FLUSH_AFTER_S, self.flush)
        if loop is None:
            self.flush()

    # -- administration (the command line) -----------------------------------------------------

    def create(
        self, name: str, *, budget_usd: float | None, rpm: int | None, admin: bool = False
    ) -> tuple[str, KeyRecord]:
        """A new key: returns the key (shown once, stored only hashed) and its record. An
        `admin` key also signs in to the dashboard (`/ui`)."""
        if not name.strip():
            raise ValueError("a key needs a name")
        if budget_usd is not None and budget_usd < 0:
            raise ValueError("a budget cannot be negative")
        if rpm is not None and rpm < 1:
            raise ValueError("rpm must be at least 1")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        key_id = "key_" + uuid.uuid4().hex[:12]
        budget = to_pico(budget_usd) if budget_usd is not None else None
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO keys (id, name, hash, hint, budget_pusd, rpm, created_at, admin) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        key_id,
                        name,
                        hash_key(key),
                        key[: len(KEY_PREFIX) + 4],
                        budget,
                        rpm,
                        time.time(),
                        int(admin),
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise ValueError(f"a key named {name!r} already exists") from exc
        record = self.record(name)
        assert record is not None
        return key, record

    def revoke(self, name: str) -> bool:
        """Revoke the key `name`, and end its dashboard sessions (`shoal.server.sessions`)."""
        with self._lock:
            cursor = self._db.execute("UPDATE keys SET revoked = 1 WHERE name = ?", (name,))
            self._version += 1  # this connection's own change: the states held are read again
            sessions = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sessions'"
            if self._db.execute(sessions).fetchone() is not None:
                self._db.execute(
                    "DELETE FROM sessions WHERE key_hash IN (SELECT hash FROM keys WHERE name = ?)",
                    (name,),
                )
        return cursor.rowcount > 0

    def update(
        self,
        name: str,
        *,
        budget_usd: float | EllipsisType | None = ...,
        rpm: int | EllipsisType | None = ...,
        reset_spend: bool = False,
    ) -> KeyRecord | None:
        """Change a key's budget or rate limit (`None`: none; `...`: unchanged), and with
        `reset_spend` start its spend from zero. Returns the key's record, or None when no key
        has that name. A running server sees the change on the key's next request."""
        if isinstance(budget_usd, float | int) and budget_usd < 0:
            raise ValueError("a budget cannot be negative")
        if isinstance(rpm, int) and rpm < 1:
            raise ValueError("rpm must be at least 1")
        changes: list[tuple[str, object]] = []
        if not isinstance(budget_usd, EllipsisType):
            changes.append(("budget_pusd", None if budget_usd is None else to_pico(budget_usd)))
        if not isinstance(rpm, EllipsisType):
            changes.append(("rpm", rpm))
        if reset_spend:
            changes.append(("spent_pusd", 0))
        self.flush()  # charges settled here are counted before a reset
        with self._lock:
            if changes:
                columns = ", ".join(f"{column} = ?" for column, _ in changes)
                self._db.execute(
                    f"UPDATE keys SET {columns} WHERE name = ?",
                    (*(value for _, value in changes), name),
                )
        return self.record(name)

    def records(self) -> list[KeyRecord]:
        self.flush()
        with self._lock:
            rows = self._db.execute(
                "SELECT id, name, hint, budget_pusd, spent_pusd, requests, rpm, revoked, "
                "created_at, admin FROM keys ORDER BY created_at"
            ).fetchall()
        return [_record(row) for row in rows]

    def record(self, name: str) -> KeyRecord | None:
        self.flush()
        with self._lock:
            row = self._db.execute(
                "SELECT id, name, hint, budget_pusd, spent_pusd, requests, rpm, revoked, "
                "created_at, admin FROM keys WHERE name = ?",
                (name,),
            ).fetchone()
        return _record(row) if row else None

    # -- the server's side ---------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> KeyState:
        """The key in an `Authorization: Bearer ...` header, or `AuthenticationError`."""
        if not authorization:
            raise AuthenticationError("no API key: send it as 'Authorization: Bearer <key>'")
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise AuthenticationError("the Authorization header must be 'Bearer <key>'")
        return self.authenticate_hash(hash_key(key))

    def authenticate_hash(self, digest: str) -> KeyState:
        """The key whose sha256 is `digest` (a dashboard session holds it), or
        `AuthenticationError`."""
        data_version = self._read_data_version()
        if data_version != self._data_version:  # the file changed: states held are read again
            self._data_version = data_version
            self._version += 1
        state = self._live.get(digest)
        if state is None or state.version != self._version:
            state = self._load(digest, state)
        if state is None or state.revoked:
            raise AuthenticationError("invalid API key")
        return state

    def _read_data_version(self) -> int:
        with self._lock:
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
        assert isinstance(version, int)
        return version

    def _load(self, digest: str, known: KeyState | None) -> KeyState | None:
        self.flush()  # the spend read back must include every charge settled here
        with self._lock:
            row = self._db.execute(
                "SELECT id, name, budget_pusd, spent_pusd, rpm, revoked, admin FROM keys "
                "WHERE hash = ?",
                (digest,),
            ).fetchone()
        if row is None:
            self._live.pop(digest, None)
            return None
        key_id, name, budget, spent, rpm, revoked, admin = row
        with self._flushing:  # charges the file does not have yet (a write that failed)
            spent += self._charges.get(key_id, [0, 0])[0]
        now = time.monotonic()
        if known is None:
            account = Account(f"key {name!r}", budget, spent, owner=name)
            account.on_charge = lambda pusd: self._charge(key_id, pusd)
            known = KeyState(
                id=key_id,
                name=name,
                account=account,
                rpm=rpm,
                revoked=bool(revoked),
                version=self._version,
                admin=bool(admin),
                tokens=float(rpm or 0),
                tokens_at=now,
            )
            self._live[digest] = known
        else:
            # The account object stays: the money its calls in flight hold stays held.
            known.account.limit_pusd, known.account.spent_pusd = budget, spent
            if rpm is not None and known.rpm is None:  # a new rate limit starts with a full bucket
                known.tokens, known.tokens_at = float(rpm), now
            known.rpm, known.revoked, known.version = rpm, bool(revoked), self._version
            known.admin = bool(admin)
        return known

    def admit(self, key: KeyState) -> None:
        """Take one request from the key's rate limit (a bucket of `rpm` refilled each minute)."""
        if key.rpm is None:
            return
        now = time.monotonic()
        rate = key.rpm / 60.0
        key.tokens = min(float(key.rpm), key.tokens + (now - key.tokens_at) * rate)
        key.tokens_at = now
        if key.tokens < 1.0:
            wait = (1.0 - key.tokens) / rate
            raise RateLimitedError(
                f"key {key.name!r} is limited to {key.rpm} requests per minute",
                retry_after_s=wait,
            )
        key.tokens -= 1.0

    def reserve(self, key: KeyState, worst_usd: float) -> Hold:
        """Hold `worst_usd` of the key's budget for one call (or one pipeline run), or refuse
        it: 402 when the budget cannot cover it, 429 while calls in flight hold the rest."""
        return key.account.reserve(worst_usd)

    async def admit_async(self, key: KeyState) -> None:
        """`admit`, for a caller on an event loop (a store whose ledger is in another process
        waits for it there without blocking the loop)."""
        self.admit(key)

    async def reserve_async(self, key: KeyState, worst_usd: float) -> Hold:
        """`reserve`, for a caller on an event loop (see `admit_async`)."""
        return self.reserve(key, worst_usd)

    @property
    def overrun_pusd(self) -> int:
        """What calls cost past their holds, over every key seen (charged all the same)."""
        return sum(state.account.overrun_pusd for state in self._live.values())


def _take_lock(path: Path) -> int:
    """Lock `path`'s lock file for this process (its pid written in it), or raise
    `KeysInUseError` naming the process that holds it. Returns the descriptor to close."""
    lock_path = path.with_name(path.name + LOCK_SUFFIX)
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot open the lock of the keys file {path}: {exc}") from exc
    try:
        locked = _try_lock(fd)
        if locked:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
            return fd
        holder = _read_pid(fd)
    except OSError as exc:
        os.close(fd)
        raise ConfigError(f"cannot lock the keys file {path} ({lock_path}): {exc}") from exc
    os.close(fd)
    who = f"another server (pid {holder})" if holder else "another server"
    raise KeysInUseError(
        f"the keys file {path} is already served by {who}, which holds {lock_path}; "
        "one server per keys file: stop that one, or serve another file (--keys)"
    )


def _read_pid(fd: int) -> str:
    """The pid the lock's holder wrote, or "" when it cannot be read (not written yet)."""
    try:
        text = os.read(fd, 32).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return text if text.isdigit() else ""


def _add_admin_column(db: sqlite3.Connection) -> None:
    """Keys files written before admin keys existed gain the column (no key is an admin)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(keys)")}
    if "admin" not in columns:
        db.execute("ALTER TABLE keys ADD COLUMN admin INTEGER NOT NULL DEFAULT 0")


def _record(row: tuple[object, ...]) -> KeyRecord:
    key_id, name, hint, budget, spent, requests, rpm, revoked, created, admin = row
    assert isinstance(spent, int)
    assert isinstance(requests, int)
    return KeyRecord(
        id=str(key_id),
        name=str(name),
        hint=str(hint),
        budget_usd=to_usd(budget) if isinstance(budget, int) else None,
        spent_usd=to_usd(spent),
        requests=requests,
        rpm=rpm if isinstance(rpm, int) else None,
        revoked=bool(revoked),
        created_at=float(created),  # type: ignore[arg-type]
        admin=bool(admin),
    )
