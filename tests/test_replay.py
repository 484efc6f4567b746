"""Replay: recorded requests asked again of a candidate, compared with what was served."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shoal import Fleet, FunctionModel, TokenPrice
from shoal.cli.main import app
from shoal.compare import Agreement, token_f1
from shoal.engine import Engine
from shoal.errors import ConfigError, UnknownModelError
from shoal.replay import read_recordings, replay
from shoal.routing.outcomes import read_table
from shoal.traces.recordings import Recording

PRICE = TokenPrice(input_per_mtok=1.0, output_per_mtok=2.0)
LABELS = ["positive", "negative", "positive", "positive", "negative", "negative"]


def recorded(answers: list[str], *, cost: float = 1e-3) -> list[tuple[Recording, str | None]]:
    return [
        (
            Recording(
                target="sentiment",
                model="big",
                messages=[{"role": "user", "content": f"Review {i}: it was {a}"}],
                answer=a.capitalize() + ".",
                params={"max_tokens": 3},
                cost_usd=cost,
                latency_s=0.5,
                id=i,
            ),
            None,
        )
        for i, a in enumerate(answers)
    ]


def engine_with(tmp_path: Path, **models: FunctionModel) -> Engine:
    engine = Engine(Fleet(), trace_path=tmp_path / "traces.sqlite")
    for name, model in models.items():
        engine.add_route(name, model)
    return engine


def says_positive() -> FunctionModel:
    return FunctionModel(lambda r: "positive", model_id="small", price=PRICE)


async def test_agreement_cost_and_a_table_route_calibrate_can_read(tmp_path: Path) -> None:
    engine = engine_with(tmp_path, small=says_positive())
    table = tmp_path / "replay.csv"
    report = await replay(
        engine, recorded(LABELS), "small", agreement=Agreement.parse("auto"), table=table
    )
    summary = report.summary()
    assert summary["compared"] == 6
    assert summary["agreement"] == pytest.approx(0.5)  # 'Positive.' agrees with 'positive'
    assert summary["cost_ratio"] < 0.1
    assert summary["served"]["p50_latency_s"] == pytest.approx(0.5)
    outcomes = read_table(table)
    assert sorted(outcomes.models) == ["big", "small"]
    assert outcomes.mean_scores() == pytest.approx({"big": 1.0, "small": 0.5})
    # The candidate's calls are traced like any other.
    assert len(engine.traces.calls()) == 6
    await engine.aclose()


async def test_a_second_replay_reads_its_pairs_back_instead_of_asking(tmp_path: Path) -> None:
    model = says_positive()
    engine = engine_with(tmp_path, small=model)
    table = tmp_path / "replay.csv"
    how = Agreement.parse("exact")
    await replay(engine, recorded(LABELS[:3]), "small", agreement=how, table=table)
    again = await replay(engine, recorded(LABELS), "small", agreement=how, table=table)
    assert again.resumed == 3
    assert len(model.calls) == 6  # three, then only the three new ones
    assert again.summary()["agreement"] == pytest.approx(0.5)
    await engine.aclose()


async def test_a_budget_stops_the_replay_and_says_where(tmp_path: Path) -> None:
    slow = FunctionModel(lambda r: "positive " * 50, model_id="wordy", price=PRICE)
    engine = engine_with(tmp_path, wordy=slow)
    plan = await engine.plan("wordy", recorded(LABELS)[0][0].request())
    report = await replay(
        engine,
        recorded(LABELS),
        "wordy",
        agreement=Agreement.parse("auto"),
        budget_usd=plan.worst_usd * 1.05,  # the first call's worst case, not a second one
    )
    assert len(report.pairs) == 1
    assert report.stopped is not None
    assert "too little for recording 2 of 6" in report.stopped
    await engine.aclose()


async def test_a_judge_decides_for_free_text_and_is_paid_for(tmp_path: Path) -> None:
    judge = FunctionModel(
        lambda r: "yes" if "B: positive" in r.messages[-1].content else "no",
        model_id="judge",
        price=PRICE,
    )
    engine = engine_with(tmp_path, small=says_positive(), judge=judge)
    rows = recorded(LABELS)
    rows = [(r, None) for r, _ in rows]
    report = await replay(engine, rows, "small", agreement=Agreement.parse("judge:judge"))
    assert report.summary()["agreement"] == 1.0
    assert report.judge_usd > 0
    assert len(judge.calls) == 6
    await engine.aclose()


async def test_gold_answers_from_a_file_give_accuracy_on_both_sides(tmp_path: Path) -> None:
    path = tmp_path / "sentiment.jsonl"
    lines = [
        {"input": "great film", "answer": "positive", "gold": "positive"},
        {"input": "dull film", "answer": "positive", "gold": "negative"},
        {"input": "bad film", "answer": "negative", "gold": "negative"},
    ]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    engine = engine_with(tmp_path, small=says_positive())
    report = await replay(engine, read_recordings(path), "small", agreement=Agreement("auto"))
    summary = report.summary()
    assert summary["served"]["gold_accuracy"] == pytest.approx(2 / 3)
    assert summary["candidate_side"]["gold_accuracy"] == pytest.approx(1 / 3)
    await engine.aclose()


async def test_bad_input_is_refused_with_a_reason(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="auto, exact, f1 or judge:MODEL"):
        Agreement.parse("vibes")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"input": "x", "answer": "y"}\n{"input": "no answer"}\n')
    with pytest.raises(ConfigError, match=r"broken.jsonl:2: not a recording"):
        read_recordings(broken)
    engine = engine_with(tmp_path)
    with pytest.raises(ConfigError, match="nothing to replay"):
        await replay(engine, [], "smollm2-135m", agreement=Agreement("auto"))
    with pytest.raises(UnknownModelError):
        await replay(engine, recorded(LABELS), "nobody", agreement=Agreement("auto"))
    await engine.aclose()


def test_token_f1() -> None:
    assert token_f1("the cat sat", "the cat sat") == 1.0
    assert token_f1("the cat sat", "a dog ran") == 0.0
    assert token_f1("the cat sat down", "the cat") == pytest.approx(2 * 1 * 0.5 / 1.5)


FLEET = """
cache_dir: {cache}
models:
  - {{id: tiny, kind: gguf, path: {path}, context: 2048}}
routes:
  - {{name: labels, kind: fixed, model: tiny, record: true}}
"""


def test_replay_from_the_command_line_on_a_real_model(tmp_path: Path, smollm2_gguf: Path) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(FLEET.format(cache=tmp_path / "cache", path=smollm2_gguf))
    cli = CliRunner()
    for prompt in ("Say yes.", "Say no.", "Name a colour."):
        asked = cli.invoke(
            app, ["ask", prompt, "-m", "labels", "--max-tokens", "4", "--fleet", str(fleet)]
        )
        assert asked.exit_code == 0, asked.output
    table = tmp_path / "out.csv"
    args = ["replay", "labels", "--candidate", "tiny", "--out", str(table), "--fleet", str(fleet)]
    done = cli.invoke(app, [*args, "--json"])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.output)
    assert summary["compared"] == 3
    assert summary["agreement"] == 1.0  # the same model, greedy: the same answers
    assert summary["table"] == str(table)
    shown = " ".join(cli.invoke(app, args).output.split())  # as read, however it wrapped
    assert "agreement 100.0% over 3 requests" in shown
    assert "3 read back from the table" in shown
    missing = cli.invoke(app, ["replay", "nothing", "--candidate", "tiny", "--fleet", str(fleet)])
    assert missing.exit_code == 2
    assert "no recordings of 'nothing'" in missing.output
