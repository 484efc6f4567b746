"""A trace store that commits call records in small batches, a moment after their calls end.

An SQLite commit costs 30-150 µs on a small machine, and now and then a checkpoint costs much
more: on a server's request path that is a large share of the latency it adds. Called from an
event loop, `DeferredTraceStore.record_call` only keeps the record; the loop writes everything
pending `FLUSH_AFTER_S` later, in one transaction. Under load that is one commit for dozens of
calls, and a response never waits for one. (A writer thread would keep the loop free too, but
fights it for the GIL: a waiting thread costs the loop up to its 5 ms switch interval, which
shows as tail latency.)

Every read, and every other write, writes what is pending first, so a reader sees every call
recorded before it asked. A killed process loses at most the last `FLUSH_AFTER_S` of records.
Outside an event loop, a record is written at once, as by `TraceStore`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shoal.traces.store import CallRecord, RunRecord, TraceStore

log = logging.getLogger(__name__)

FLUSH_AFTER_S = 0.05


class DeferredTraceStore(TraceStore):
    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self._pending: list[CallRecord] = []
        self._flushing = threading.Lock()
        self._scheduled = False

    def record_call(self, call: CallRecord) -> int:
        """Keep the record for the loop to write; returns 0 (its row id is not known yet)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return super().record_call(call)
        with self._flushing:
            self._pending.append(call)
            if not self._scheduled:
                self._scheduled = True
                loop.call_later(FLUSH_AFTER_S, self.flush)
        return 0

    def flush(self) -> None:
        """Write every pending record, in the order they came."""
        with self._flushing:
            pending, self._pending = self._pending, []
            self._scheduled = False
            if not pending:
                return
            try:
                self.record_calls(pending)
            except Exception as exc:  # one bad record must not lose the others
                log.error(
                    "writing %d call records at once failed (%s); one by one", len(pending), exc
                )
                for call in pending:
                    try:
                        super().record_call(call)
                    except Exception as one:
                        log.error("could not record a call of %s: %s", call.model, one)

    def close(self) -> None:
        self.flush()
        super().close()

    # -- everything else sees every record kept before it --------------------------------------

    def calls(self, run_id: str | None = None, *, limit: int = 10_000) -> list[CallRecord]:
        self.flush()
        return super().calls(run_id, limit=limit)

    def read(self, query: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self.flush()
        return super().read(query, args)

    def start_run(
        self,
        name: str,
        *,
        budget_usd: float | None = None,
        deadline_s: float | None = None,
        detail: dict[str, Any] | None = None,
    ) -> str:
        self.flush()
        return super().start_run(name, budget_usd=budget_usd, deadline_s=deadline_s, detail=detail)

    def finish_run(self, run_id: str, status: str, detail: dict[str, Any] | None = None) -> None:
        self.flush()
        super().finish_run(run_id, status, detail)

    def run(self, run_id: str) -> RunRecord | None:
        self.flush()
        return super().run(run_id)

    def runs(self, *, limit: int = 50) -> list[RunRecord]:
        self.flush()
        return super().runs(limit=limit)
