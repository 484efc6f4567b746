"""The command line, run in process."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from shoal.cards import Measured
from shoal.cli.main import app
from shoal.cli.run import cost_on
from shoal.fleet import Fleet
from shoal.measure import STEPS, best_of, should_record
from shoal.settings import parse_fleet
from shoal.traces.store import CallRecord, TraceStore

runner = CliRunner()


@pytest.fixture
def tiny_fleet(tmp_path: Path, tiny_path: Path) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(
        f"include_default: false\ncache_dir: {tmp_path}/cache\n"
        f'models:\n  - {{id: tiny, kind: gguf, tier: tiny, path: "{tiny_path}", context: 2048}}\n',
        "utf-8",
    )
    return path


def test_models_list_shows_the_default_tiers() -> None:
    result = runner.invoke(app, ["models", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["id"], r["tier"], r["installed"]) for r in rows] == [
        ("smollm2-135m", "tiny", True),
        ("qwen2.5-coder-0.5b", "small", True),
        ("qwen2.5-coder-1.5b", "large", True),
    ]
    table = runner.invoke(app, ["models", "list"], env={"COLUMNS": "160"})
    assert "smollm2-135m" in table.stdout
    assert "$0.09/h host" in table.stdout


def test_version_prints_the_installed_package_version() -> None:
    from importlib.metadata import version

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"shoal {version('shoal')}\n"


def test_ask_streams_the_answer_then_its_figures() -> None:
    result = runner.invoke(app, ["ask", "What colour is the sky?", "--max-tokens", "12"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()
    assert "model smollm2-135m" in result.stderr
    assert " in / " in result.stderr
    assert "$0.0" in result.stderr


def test_ask_with_a_json_schema(tmp_path: Path) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string"}},
        "required": ["answer"],
    }
    (tmp_path / "schema.json").write_text(json.dumps(schema), "utf-8")
    result = runner.invoke(
        app, ["ask", "Capital of Italy?", "--json-schema", str(tmp_path / "schema.json")]
    )
    assert result.exit_code == 0, result.output
    assert "answer" in json.loads(result.stdout)


def test_ask_reads_the_prompt_from_standard_input() -> None:
    result = runner.invoke(
        app, ["ask", "-", "--max-tokens", "4"], input="What colour is the sky?\n"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip()
    assert "model smollm2-135m" in result.stderr
    empty = runner.invoke(app, ["ask", "-"], input="  \n")
    assert empty.exit_code == 2
    assert "standard input" in empty.stderr


@pytest.mark.parametrize(
    ("text", "problem"),
    [("[1, 2]", "a JSON object"), ('{"type": 5}', "not a valid JSON schema"), ("{", "not JSON")],
)
def test_ask_with_a_bad_json_schema_is_a_clean_error(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "schema.json"
    path.write_text(text, "utf-8")
    result = runner.invoke(app, ["ask", "hi", "--json-schema", str(path)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert str(path) in result.stderr
    assert problem in result.stderr


def test_unknown_model_is_a_clean_error() -> None:
    result = runner.invoke(app, ["ask", "hi", "--model", "gpt-9"])
    assert result.exit_code == 2
    assert "UnknownModelError" in result.stderr
    assert "smollm2-135m" in result.stderr
    assert "Traceback" not in result.output


def test_invalid_fleet_file_is_a_clean_error(tmp_path: Path) -> None:
    bad = tmp_path / "fleet.yaml"
    bad.write_text("models:\n  - id: x\n    kind: gguf\n    path: a.gguf\n    colour: red\n")
    result = runner.invoke(app, ["models", "list", "--fleet", str(bad)])
    assert result.exit_code == 2
    assert "colour" in result.stderr


def test_prompt_over_the_context_window_is_a_clean_error(tiny_fleet: Path) -> None:
    result = runner.invoke(
        app, ["ask", "word " * 3000, "--model", "tiny", "--fleet", str(tiny_fleet)]
    )
    assert result.exit_code == 2
    assert "ContextWindowExceededError" in result.stderr


def test_config_show_prints_what_will_run_and_round_trips(tiny_fleet: Path) -> None:
    result = runner.invoke(app, ["config", "show", "--fleet", str(tiny_fleet)])
    assert result.exit_code == 0, result.output
    shown = parse_fleet(result.stdout, source="shown")
    assert [m.id for m in shown.models] == ["tiny"]
    assert yaml.safe_load(result.stdout)["cache_dir"].endswith("cache")
    # The default fleet shown is a fleet file that runs the same models.
    default = runner.invoke(app, ["config", "show"])
    assert default.exit_code == 0, default.output
    assert Fleet(parse_fleet(default.stdout, source="shown")).ids == Fleet().ids


def test_demo_answers_every_question_with_every_tier(tiny_fleet: Path) -> None:
    result = runner.invoke(app, ["demo", "--fleet", str(tiny_fleet), "--max-tokens", "8", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["rows"]) == 5
    assert all(row["model"] == "tiny" and row["latency_s"] > 0 for row in report["rows"])
    (total,) = report["totals"]
    assert total["questions"] == 5
    assert total["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in report["rows"]))


def test_models_bench_measures_and_records(tiny_fleet: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        ["models", "bench", "tiny", "--fleet", str(tiny_fleet), "--rounds", "1", "--repeat", "1"],
    )
    assert result.exit_code == 0, result.output
    recorded = json.loads((tmp_path / "cache" / "measurements.json").read_text())
    figures = recorded["tiny"]
    assert figures["runs"] == 1
    assert figures["gen_tok_s"] > 0
    assert figures["prompt_tok_s"] > 0
    assert figures["peak_rss_mb"] > 100
    listed = json.loads(
        runner.invoke(app, ["models", "list", "--json", "--fleet", str(tiny_fleet)]).stdout
    )
    assert listed[0]["measured"]["gen_tok_s"] == figures["gen_tok_s"]


def _measured(gen_tok_s: float, prompt_tok_s: float = 500.0) -> Measured:
    return Measured(
        load_s=0.5,
        prompt_tok_s=prompt_tok_s,
        gen_tok_s=gen_tok_s,
        peak_rss_mb=200.0,
        measured_at="2025-01-01T00:00:00+00:00",
    )


def test_best_of_several_runs_keeps_the_fastest_and_flags_a_wide_spread() -> None:
    steady = best_of([_measured(10.0), _measured(11.0), _measured(10.5, 520.0)])
    assert (steady.gen_tok_s, steady.prompt_tok_s, steady.runs) == (11.0, 520.0, 3)
    assert not steady.noisy
    busy = best_of([_measured(4.0), _measured(8.0), _measured(7.0)])
    assert busy.noisy
    assert busy.spread == 0.5
    assert should_record(None, busy)
    assert not should_record(steady, busy)  # noisy and clearly slower: the steady one stays
    assert should_record(steady, best_of([_measured(8.0), _measured(12.0)]))  # noisy, faster
    assert should_record(busy, _measured(5.0))  # steady: trusted even when slower


def test_models_bench_repeats_and_does_not_let_a_noisy_run_replace_a_better_one(
    tiny_fleet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shoal.cli.main as cli

    scripted: list[Measured] = []

    def measure_once(
        model_id: str, fleet_file: Path | None, rounds: int, on_step: Callable[[str], None]
    ) -> Measured:
        for step in STEPS:
            on_step(step)
        return scripted.pop(0)

    monkeypatch.setattr(cli, "_measure_once", measure_once)
    recorded = tmp_path / "cache" / "measurements.json"

    def bench(*runs: Measured, repeat: str = "3") -> str:
        scripted[:] = runs
        result = runner.invoke(
            app,
            ["models", "bench", "tiny", "--fleet", str(tiny_fleet), "--repeat", repeat],
            env={"COLUMNS": "200"},
        )
        assert result.exit_code == 0, result.output
        assert not scripted
        return result.output

    bench(_measured(10.0), _measured(12.0), _measured(11.0))
    first = json.loads(recorded.read_text())["tiny"]
    assert (first["gen_tok_s"], first["runs"], first["noisy"]) == (12.0, 3, False)

    output = bench(_measured(3.0), _measured(6.0), _measured(8.0))  # a busy machine
    assert "noisy" in output
    assert "kept" in output
    assert json.loads(recorded.read_text())["tiny"] == first

    output = bench(_measured(15.0), repeat="1")  # steady and faster: recorded
    assert "noisy" not in output
    assert json.loads(recorded.read_text())["tiny"]["gen_tok_s"] == 15.0


def _record_run(path: Path) -> tuple[str, list[CallRecord]]:
    """A finished rental run of three calls in a trace store at `path`."""
    store = TraceStore(path)
    run_id = store.start_run("rental", budget_usd=0.01)
    calls = [
        CallRecord(
            model="qwen2.5-coder-1.5b",
            route="rental-criteria",
            run_id=run_id,
            step="read",
            input_tokens=221,
            output_tokens=48,
            latency_s=8.1,
            compute_s=6.8,
            cost_usd=0.00017,
        ),
        *(
            CallRecord(
                model="qwen2.5-coder-0.5b",
                route="rental-score",
                run_id=run_id,
                step="scores",
                item=str(i),
                input_tokens=300,
                output_tokens=50,
                latency_s=4.0 * (i + 1),  # the second waited for the first
                compute_s=4.0,
                cost_usd=0.0001,
            )
            for i in range(2)
        ),
    ]
    store.record_calls(calls)
    steps = {"read": {"status": "ok", "wall_s": 8.1}, "scores": {"status": "ok", "wall_s": 8.0}}
    store.finish_run(run_id, "ok", {"steps": steps})
    store.close()
    return run_id, calls


def test_runs_show_says_where_each_cent_and_second_went(tmp_path: Path) -> None:
    path = tmp_path / "traces.sqlite"
    run_id, calls = _record_run(path)
    result = runner.invoke(
        app, ["runs", "show", run_id, "--traces", str(path)], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert f"rental {run_id} · ok" in lines[0]
    assert any("read · ok · 8.10 s · $0.000170 · 1 call(s)" in line for line in lines)
    assert any(
        "item 1: qwen2.5-coder-0.5b via rental-score · 300+50 tok · 4.00 s (+4.00 s waiting)"
        in line
        for line in lines
    )
    by_model = next(line for line in lines if line.startswith("│ qwen2.5-coder-0.5b"))
    assert "600+100" in by_model
    assert "54%" in by_model  # $0.0002 of $0.00037
    fleet = Fleet()
    counterfactual = sum(cost_on(fleet, "qwen2.5-coder-1.5b", c) for c in calls)
    assert f"would have cost ${counterfactual:.6f}" in result.stdout
    assert f"{0.00037 / counterfactual:.0%} of it" in result.stdout


def test_runs_list_and_show_as_json(tmp_path: Path) -> None:
    path = tmp_path / "traces.sqlite"
    run_id, calls = _record_run(path)
    listed = runner.invoke(app, ["runs", "list", "--json", "--traces", str(path)])
    assert listed.exit_code == 0, listed.output
    (run,) = json.loads(listed.stdout)
    assert set(run) == {
        "id",
        "pipeline",
        "status",
        "stop_reason",
        "started_at",
        "finished_at",
        "wall_s",
        "cost_usd",
        "budget_usd",
        "deadline_s",
    }
    assert (run["id"], run["pipeline"], run["status"]) == (run_id, "rental", "ok")
    assert run["budget_usd"] == 0.01
    assert run["cost_usd"] == pytest.approx(0.00037)
    datetime.fromisoformat(run["started_at"])

    shown = runner.invoke(app, ["runs", "show", run_id, "--json", "--traces", str(path)])
    assert shown.exit_code == 0, shown.output
    detail = json.loads(shown.stdout)
    assert {k: detail[k] for k in run} == run
    assert [s["name"] for s in detail["steps"]] == ["read", "scores"]
    scores = detail["steps"][1]
    assert scores["cost_usd"] == pytest.approx(0.0002)
    assert [c["item"] for c in scores["calls"]] == ["0", "1"]
    assert scores["calls"][1]["latency_s"] == 8.0
    models = {m["model"]: m for m in detail["models"]}
    assert models["qwen2.5-coder-0.5b"]["input_tokens"] == 600
    assert models["qwen2.5-coder-0.5b"]["share"] == pytest.approx(0.0002 / 0.00037)
    large = detail["on_large_model"]
    assert large["model"] == "qwen2.5-coder-1.5b"
    assert large["cost_usd"] == pytest.approx(
        sum(cost_on(Fleet(), "qwen2.5-coder-1.5b", c) for c in calls)
    )
    assert large["paid_usd"] == pytest.approx(0.00037)


TRIAGE_STEPS = """\
from pydantic import BaseModel


class Topic(BaseModel):
    topic: str


def count(labels: list[Topic | None]) -> int:
    return sum(label is not None for label in labels)
"""

TRIAGE_YAML = """\
name: triage
inputs: [tickets]
output: counted
steps:
  - name: labels
    kind: model
    model: tiny
    prompt: "Which topic is this support ticket about? {item}"
    output: triage_steps:Topic
    inputs: [tickets]
    map_over: tickets
    max_tokens: 24
    optional: true
  - name: counted
    kind: python
    fn: triage_steps:count
    inputs: [labels]
"""


def test_run_a_yaml_pipeline_file_end_to_end(tiny_fleet: Path, tmp_path: Path) -> None:
    """`shoal run FILE.yaml --input`, from another folder: its steps module sits beside it, the
    input parses as JSON, and the run is recorded."""
    import subprocess
    import sys

    folder = tmp_path / "app"
    folder.mkdir()
    (folder / "triage_steps.py").write_text(TRIAGE_STEPS, "utf-8")
    (folder / "triage.yaml").write_text(TRIAGE_YAML, "utf-8")
    command = [sys.executable, "-m", "shoal.cli.main", "run", str(folder / "triage.yaml")]
    command += ["--input", 'tickets=["I was charged twice.", "The app crashes."]']
    command += ["--budget", "0.05", "--deadline", "120", "--fleet", str(tiny_fleet), "--json"]
    done = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["pipeline"] == "triage"
    assert result["status"] in ("ok", "partial"), result
    assert result["steps"]["labels"]["items"] == 2
    assert result["output"] == 2 - result["steps"]["labels"]["items_failed"], result
    assert result["budget_usd"] == 0.05
    listed = runner.invoke(app, ["runs", "list", "--json", "--fleet", str(tiny_fleet)])
    assert [run["id"] for run in json.loads(listed.stdout)] == [result["run_id"]]


def test_run_a_yaml_pipeline_prints_its_output_and_status(tmp_path: Path) -> None:
    (tmp_path / "shout.yaml").write_text(
        "name: shout\ninputs: [text, times]\noutput: loud\nsteps:\n"
        "  - {name: loud, kind: python, fn: 'test_cli:shout', inputs: [text, times]}\n",
        "utf-8",
    )
    env = {"SHOAL_CACHE_DIR": str(tmp_path / "cache")}
    path = str(tmp_path / "shout.yaml")
    result = runner.invoke(app, ["run", path, "-i", "text=hi", "-i", "times=2"], env=env)
    assert result.exit_code == 0, result.output
    assert result.stdout == "HI!HI!\n"
    assert result.stderr.splitlines()[-1].startswith("ok · $0.000000 · ")
    bad = runner.invoke(app, ["run", path, "--input", "text"], env=env)
    assert bad.exit_code == 2
    assert "--input 'text': write it as key=value" in bad.stderr
    missing = runner.invoke(app, ["run", str(tmp_path / "absent.yaml")], env=env)
    assert missing.exit_code == 2
    assert "cannot read pipeline" in missing.stderr


def shout(text: str, times: int) -> str:
    return (text.upper() + "!") * times


def test_a_partial_run_shows_what_finished_and_what_was_cut(tmp_path: Path) -> None:
    """A run stopped by its deadline: every step that finished, by name, then each step that
    did not and why, then the status."""
    (tmp_path / "late.yaml").write_text(
        "name: late\ninputs: [text]\noutput: polished\nsteps:\n"
        "  - {name: drafted, kind: python, fn: 'test_cli:draft', inputs: [text]}\n"
        "  - {name: counted, kind: python, fn: 'test_cli:count_words', inputs: [drafted]}\n"
        "  - {name: polished, kind: python, fn: 'test_cli:polish', inputs: [drafted]}\n",
        "utf-8",
    )
    env = {"SHOAL_CACHE_DIR": str(tmp_path / "cache")}
    command = ["run", str(tmp_path / "late.yaml"), "-i", "text=hello world", "--deadline", "1"]
    result = runner.invoke(app, command, env=env)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "drafted (complete):",
        "a draft: hello world",
        "counted (complete):",
        "4",
    ]
    said = result.stderr.splitlines()
    assert "cut: polished (cancelled at the deadline)" in said
    assert said[-1].startswith("partial — deadline of 1 s reached · ")
    as_json = json.loads(runner.invoke(app, [*command, "--json"], env=env).stdout)
    assert as_json["values"] == {"drafted": "a draft: hello world", "counted": 4}


def draft(text: str) -> str:
    return f"a draft: {text}"


def count_words(drafted: str) -> int:
    return len(drafted.split())


async def polish(drafted: str) -> str:
    import asyncio

    await asyncio.sleep(30)
    return drafted.upper()
