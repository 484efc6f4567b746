"""The deferred trace store the server records calls with: records are written in batches a
moment later, in order, and every read sees every record kept before it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from shoal.traces.background import FLUSH_AFTER_S, DeferredTraceStore
from shoal.traces.store import CallRecord, TraceStore


async def test_records_are_written_after_the_step_in_order(tmp_path: Path) -> None:
    store = DeferredTraceStore(tmp_path / "traces.sqlite")
    run_id = store.start_run("job", budget_usd=1.0)
    plain = TraceStore(tmp_path / "traces.sqlite")
    for i in range(200):
        assert store.record_call(CallRecord(model=f"m{i}", run_id=run_id, cost_usd=0.001)) == 0
    assert plain.calls() == []  # nothing written yet
    await asyncio.sleep(FLUSH_AFTER_S * 2)
    assert [c.model for c in plain.calls()] == [f"m{i}" for i in range(200)]
    store.record_call(CallRecord(model="read-your-writes", run_id=run_id, cost_usd=0.001))
    assert store.calls()[-1].model == "read-your-writes"
    store.finish_run(run_id, "done")
    run = store.run(run_id)
    assert run is not None
    assert run.cost_usd == pytest.approx(0.201)
    store.record_call(CallRecord(model="last"))
    store.close()
    assert plain.calls()[-1].model == "last"
    plain.close()


def test_outside_a_loop_records_are_written_at_once(tmp_path: Path) -> None:
    store = DeferredTraceStore(tmp_path / "traces.sqlite")
    assert store.record_call(CallRecord(model="now")) > 0
    store.close()


async def test_a_bad_record_does_not_lose_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = DeferredTraceStore(tmp_path / "traces.sqlite")
    store.record_call(CallRecord(model="before"))
    store.record_call(CallRecord(model="bad", decision={"not json": {1, 2}}))
    store.record_call(CallRecord(model="after"))
    await asyncio.sleep(FLUSH_AFTER_S * 2)
    assert [c.model for c in store.calls()] == ["before", "after"]
    assert "could not record a call of bad" in caplog.text
    store.close()
