"""Recording for distillation: opt-in per route and per pipeline step, read back, exported."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from shoal import ChatRequest, Fleet
from shoal.cli.main import app
from shoal.engine import Engine
from shoal.pipeline.graph import ModelStep, Pipeline
from shoal.pipeline.run import Runner
from shoal.pipeline.spec import dump_yaml, load_yaml
from shoal.settings import parse_fleet
from shoal.traces.recordings import Recording
from shoal.traces.store import TraceStore

FLEET = """
cache_dir: {cache}
models:
  - {{id: tiny, kind: gguf, path: {path}, context: 2048}}
routes:
  - {{name: labels, kind: fixed, model: tiny, record: true}}
  - {{name: chat, kind: fixed, model: tiny}}
"""


def fleet_file(tmp_path: Path, smollm2_gguf: Path) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(FLEET.format(cache=tmp_path / "cache", path=smollm2_gguf), encoding="utf-8")
    return path


async def test_only_routes_that_ask_are_recorded(tmp_path: Path, smollm2_gguf: Path) -> None:
    fleet = Fleet(parse_fleet(fleet_file(tmp_path, smollm2_gguf).read_text(), source="f.yaml"))
    engine = Engine(fleet)
    request = ChatRequest.of("Say yes.", system="Answer in one word.", max_tokens=3)
    answer = await engine.generate("labels", request)
    await engine.generate("chat", ChatRequest.of("Not recorded.", max_tokens=3))
    await engine.generate("tiny", ChatRequest.of("Nor this.", max_tokens=3))
    (rec,) = engine.traces.recordings("labels")
    assert (rec.model, rec.answer, rec.input) == ("tiny", answer.text, "Say yes.")
    assert rec.messages[0] == {"role": "system", "content": "Answer in one word."}
    assert rec.request() == request  # replayable as it was asked
    assert rec.cost_usd == pytest.approx(answer.total_cost_usd)
    assert rec.schema is None
    assert rec.parsed is None
    assert engine.traces.recordings("chat") == []
    assert engine.traces.recordings("tiny") == []
    # A model id can be recorded too, and recording can be switched off again.
    engine.record("tiny")
    await engine.generate("tiny", ChatRequest.of("Now this.", max_tokens=3))
    engine.record("tiny", False)
    await engine.generate("tiny", ChatRequest.of("Not this.", max_tokens=3))
    assert [r.input for r in engine.traces.recordings("tiny")] == ["Now this."]
    await engine.aclose()


class Tag(BaseModel):
    mood: Literal["happy", "sad"]


async def test_a_step_that_asks_records_its_parsed_output(
    tmp_path: Path, smollm2_gguf: Path
) -> None:
    text = fleet_file(tmp_path, smollm2_gguf).read_text()
    engine = Engine(Fleet(parse_fleet(text, source="f.yaml")))
    tag = ModelStep(
        "tag",
        prompt="Mood of {words}?",
        model="chat",
        inputs=("words",),
        output=Tag,
        max_tokens=12,
        record=True,
    )
    echo = ModelStep("echo", prompt="Repeat {words}", model="chat", inputs=("words",), max_tokens=3)
    pipeline = Pipeline("tagger", inputs=["words"], steps=[tag, echo], output="tag")
    result = await Runner(engine).run(pipeline, {"words": "sunny day"})
    assert result.status == "ok", result.stop_reason
    (rec,) = engine.traces.recordings("tagger/tag")
    assert rec.input == "Mood of sunny day?"
    assert rec.schema is not None
    assert rec.schema["properties"]["mood"]["enum"] == ["happy", "sad"]
    assert rec.parsed == result.output
    assert engine.traces.recordings("tagger/echo") == []
    await engine.aclose()


def test_record_is_a_step_field_in_yaml() -> None:
    pipeline = load_yaml(
        "name: p\ninputs: [x]\noutput: say\nsteps:\n"
        "  - {kind: model, name: say, model: m, prompt: '{x}', inputs: [x], record: true}\n"
    )
    step = pipeline.steps["say"]
    assert isinstance(step, ModelStep)
    assert step.record
    assert "record: true" in dump_yaml(pipeline)


async def test_nothing_is_recorded_by_default(tmp_path: Path, smollm2_gguf: Path) -> None:
    engine = Engine(Fleet(), trace_path=tmp_path / "traces.sqlite")
    step = ModelStep("say", prompt="Say {x}", model="smollm2-135m", inputs=("x",), max_tokens=2)
    pipeline = Pipeline("p", inputs=["x"], steps=[step], output="say")
    await Runner(engine).run(pipeline, {"x": "hi"})
    await engine.generate("smollm2-135m", ChatRequest.of("hi", max_tokens=2))
    assert engine.traces.recorded_targets() == []
    await engine.aclose()


def test_recordings_are_listed_exported_and_cleared(tmp_path: Path, smollm2_gguf: Path) -> None:
    fleet = fleet_file(tmp_path, smollm2_gguf)
    cli = CliRunner()
    ask = cli.invoke(
        app, ["ask", "Say yes.", "-m", "labels", "--max-tokens", "3", "--fleet", str(fleet)]
    )
    assert ask.exit_code == 0, ask.output
    listed = cli.invoke(app, ["recordings", "list", "--json", "--fleet", str(fleet)])
    assert listed.exit_code == 0, listed.output
    (target,) = json.loads(listed.output)
    assert (target["target"], target["count"], target["models"]) == ("labels", 1, {"tiny": 1})
    out = tmp_path / "labels.jsonl"
    exported = cli.invoke(
        app,
        [
            "recordings",
            "export",
            "labels",
            "--out",
            str(out),
            "--since",
            "1h",
            "--fleet",
            str(fleet),
        ],
    )
    assert exported.exit_code == 0, exported.output
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["input"] == "Say yes."
    assert row["label"] == row["answer"]
    bad = cli.invoke(
        app,
        [
            "recordings",
            "export",
            "labels",
            "--out",
            str(out),
            "--since",
            "last week",
            "--fleet",
            str(fleet),
        ],
    )
    assert bad.exit_code == 2
    assert "--since 'last week'" in bad.output
    cleared = cli.invoke(app, ["recordings", "clear", "labels", "--yes", "--fleet", str(fleet)])
    assert cleared.exit_code == 0
    assert "1 recordings of labels deleted" in cleared.output
    again = cli.invoke(app, ["recordings", "list", "--fleet", str(fleet)])
    assert "nothing recorded" in again.output


def test_a_store_from_before_recordings_kept_costs_gains_the_columns(tmp_path: Path) -> None:
    path = tmp_path / "traces.sqlite"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE recordings (id INTEGER PRIMARY KEY AUTOINCREMENT, target TEXT NOT NULL, "
        "model TEXT NOT NULL, messages TEXT NOT NULL, schema TEXT, answer TEXT NOT NULL, "
        "parsed TEXT, created_at REAL NOT NULL);"
        "INSERT INTO recordings (target, model, messages, answer, created_at) "
        "VALUES ('t', 'm', '[{\"role\": \"user\", \"content\": \"hi\"}]', 'yes', 1.0);"
    )
    old.close()
    store = TraceStore(path)
    store.record_example(
        Recording("t", "m", [{"role": "user", "content": "x"}], "no", params={"max_tokens": 3})
    )
    first, second = store.recordings("t")
    assert (first.params, first.cost_usd, first.answer) == ({}, 0.0, "yes")
    assert second.request().max_tokens == 3
    store.close()
