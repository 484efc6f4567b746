"""Shadow routes: a candidate asked a share of a route's live requests, off the request path."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shoal import ChatRequest, Fleet, FunctionModel, TokenPrice
from shoal.cli.main import app
from shoal.compare import pairs_from_table
from shoal.engine import Engine
from shoal.settings import ShadowSpec, parse_fleet
from shoal.shadow import Shadow

PRICE = TokenPrice(input_per_mtok=1.0, output_per_mtok=2.0)


def engine_with(tmp_path: Path, *, candidate_delay_s: float = 0.0) -> Engine:
    fleet = Fleet(parse_fleet(f"cache_dir: {tmp_path}\n", source="fleet.yaml"))
    engine = Engine(fleet)
    engine.add_route("main", FunctionModel(lambda r: "Positive.", model_id="big", price=PRICE))
    small = FunctionModel(
        lambda r: "negative" if "bad" in r.messages[-1].content else "positive",
        model_id="small",
        price=PRICE,
        delay_s=candidate_delay_s,
    )
    engine.add_route("small", small)
    return engine


async def settled(engine: Engine) -> None:
    while engine._shadow_tasks:
        await asyncio.gather(*engine._shadow_tasks, return_exceptions=True)


async def test_the_candidate_answers_after_the_served_call_and_is_compared(tmp_path: Path) -> None:
    engine = engine_with(tmp_path, candidate_delay_s=0.05)
    shadow = engine.shadow("main", ShadowSpec(candidate="small", share=1.0, budget_usd_per_hour=1))
    first = await engine.generate("main", ChatRequest.of("a good film"))
    assert first.text == "Positive."
    assert engine._shadow_tasks  # the served answer did not wait for the candidate
    await settled(engine)
    await engine.generate("main", ChatRequest.of("a bad film"))
    await settled(engine)
    pairs = pairs_from_table(shadow.table, "small")
    assert [p.agreement for p in pairs] == [1.0, 0.0]  # 'Positive.' is 'positive'
    assert shadow.compared == 2
    steps = [c.step for c in engine.traces.calls()]
    assert steps == [None, "shadow of main", None, "shadow of main"]
    assert shadow.account.spent_usd > 0  # the candidate is paid from the shadow's own budget
    await engine.aclose()


async def test_a_served_call_on_the_candidates_model_cancels_the_shadow(tmp_path: Path) -> None:
    engine = engine_with(tmp_path, candidate_delay_s=2.0)
    shadow = engine.shadow("main", ShadowSpec(candidate="small", share=1.0, budget_usd_per_hour=1))
    await engine.generate("main", ChatRequest.of("a good film"))
    while not any(engine._shadow_tasks.values()):  # noqa: ASYNC110 (until it runs on `small`)
        await asyncio.sleep(0.01)
    served = asyncio.create_task(engine.generate("small", ChatRequest.of("served")))
    await settled(engine)
    assert (await served).text == "positive"
    assert shadow.dropped == 1
    assert shadow.compared == 0
    statuses = [(c.step, c.status) for c in engine.traces.calls()]
    assert ("shadow of main", "cancelled") in statuses
    await engine.aclose()


async def test_no_shadow_while_served_calls_hold_the_model_or_the_money_is_spent(
    tmp_path: Path,
) -> None:
    engine = engine_with(tmp_path, candidate_delay_s=0.3)
    shadow = engine.shadow("main", ShadowSpec(candidate="small", share=1.0, budget_usd_per_hour=1))
    busy = asyncio.create_task(engine.generate("small", ChatRequest.of("served")))
    await asyncio.sleep(0.05)
    await engine.generate("main", ChatRequest.of("a good film"))
    await settled(engine)
    await busy
    assert (shadow.dropped, shadow.compared) == (1, 0)
    broke = engine.shadow("main", ShadowSpec(candidate="small", share=1.0, budget_usd_per_hour=0))
    await engine.generate("main", ChatRequest.of("a good film"))
    assert not engine._shadow_tasks
    assert broke.dropped == 1
    await engine.aclose()


def test_a_share_of_calls_is_sampled(tmp_path: Path) -> None:
    spec = ShadowSpec(candidate="small", share=0.1, max_in_flight=10_000)
    shadow = Shadow("main", spec, tmp_path / "t.csv", rng=random.Random(7))
    taken = sum(shadow.wants() for _ in range(2000))
    assert 140 < taken < 260


FLEET = """
cache_dir: {cache}
models:
  - {{id: tiny, kind: gguf, path: {path}, context: 2048}}
routes:
  - name: labels
    kind: fixed
    model: tiny
    shadow: {{candidate: tiny, share: 1.0, budget_usd_per_hour: 1.0}}
  - {{name: plain, kind: fixed, model: tiny}}
"""


async def test_a_shadow_from_the_fleet_file_and_its_report(
    tmp_path: Path, smollm2_gguf: Path
) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(FLEET.format(cache=tmp_path / "cache", path=smollm2_gguf))
    engine = Engine(Fleet.from_file(path))
    for prompt in ("Say yes.", "Say no."):
        await engine.generate("labels", ChatRequest.of(prompt, max_tokens=4))
        await settled(engine)
    await engine.aclose()
    cli = CliRunner()
    shown = cli.invoke(app, ["route", "report", "labels", "--json", "--fleet", str(path)])
    assert shown.exit_code == 0, shown.output
    summary = json.loads(shown.output)
    assert summary["compared"] == 2
    assert summary["agreement"] == 1.0  # the same greedy model
    none = cli.invoke(app, ["route", "report", "plain", "--fleet", str(path)])
    assert none.exit_code == 2
    assert "has no shadow" in none.output
    unknown = cli.invoke(app, ["route", "report", "nope", "--fleet", str(path)])
    assert unknown.exit_code == 2
    assert "no route 'nope'" in unknown.output


def test_a_shadow_spec_is_checked() -> None:
    with pytest.raises(ValueError, match="share"):
        ShadowSpec(candidate="small", share=0.0)
