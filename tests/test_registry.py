"""Pipelines that apps register (entry-point group `shoal.pipelines`), found as installed."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from shoal.cli.main import app
from shoal.engine import Engine
from shoal.errors import PipelineError, UnknownPipelineError
from shoal.pipeline import registry
from shoal.pipeline.graph import Pipeline, PythonStep

runner = CliRunner()


def echo(text: str) -> str:
    return f"echo: {text}"


def build(engine: Engine) -> Pipeline:
    """A registered pipeline: takes the engine, gives a pipeline."""
    assert isinstance(engine, Engine)
    return Pipeline("echo", inputs=["text"], output="said", steps=[PythonStep("said", echo)])


def not_a_pipeline(engine: Engine) -> str:
    return "nope"


def fails_to_build(engine: Engine) -> Pipeline:
    raise KeyError("routes")


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An installed distribution that registers three pipelines: one that works, one whose
    module does not exist, one that gives something else."""
    info = tmp_path / "site" / "echo_app-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-app\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[shoal.pipelines]\n"
        "echo = test_registry:build\n"
        "broken = echo_app.missing:build\n"
        "odd = test_registry:not_a_pipeline\n"
        "failing = test_registry:fails_to_build\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = Engine(trace_path=tmp_path / "traces.sqlite")
    yield engine
    asyncio.run(engine.aclose())


def test_a_registered_pipeline_is_found_and_built(installed: None, engine: Engine) -> None:
    found = {p.name: p.source for p in registry.registered()}
    assert found["echo"] == "test_registry:build"
    assert found["rental"] == "shoal_examples.rental.pipeline:pipeline"  # pyproject.toml
    pipeline = registry.load("echo", engine)
    assert pipeline.name == "echo"


def test_a_broken_entry_point_is_an_error_naming_it(installed: None, engine: Engine) -> None:
    with pytest.raises(PipelineError, match=r"pipeline 'broken' \(entry point 'echo_app.missing"):
        registry.load("broken", engine)
    with pytest.raises(PipelineError, match=r"pipeline 'odd'.* gave str, not a Pipeline"):
        registry.load("odd", engine)
    with pytest.raises(PipelineError, match=r"pipeline 'failing'.*KeyError: 'routes'"):
        registry.load("failing", engine)
    with pytest.raises(UnknownPipelineError, match=r"valid pipelines: .*echo"):
        registry.load("nope", engine)


def test_a_yaml_file_is_loaded_with_its_steps_beside_it(tmp_path: Path, engine: Engine) -> None:
    (tmp_path / "beside_steps.py").write_text("def twice(n: int) -> int:\n    return 2 * n\n")
    path = tmp_path / "twice.yaml"
    path.write_text(
        "name: twice\ninputs: [n]\noutput: doubled\nsteps:\n"
        "  - {name: doubled, kind: python, fn: 'beside_steps:twice', inputs: [n]}\n"
    )
    try:
        assert registry.load(str(path), engine).name == "twice"
    finally:
        sys.path.remove(str(tmp_path.resolve()))
        sys.modules.pop("beside_steps", None)
    with pytest.raises(PipelineError, match="cannot read pipeline"):
        registry.load(str(tmp_path / "absent.yaml"), engine)


def test_pipelines_list_shows_what_is_registered(installed: None) -> None:
    result = runner.invoke(app, ["pipelines", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["echo"] == {"name": "echo", "source": "test_registry:build", "kind": "entry point"}
    assert "rental" in rows
    table = runner.invoke(app, ["pipelines", "list"], env={"COLUMNS": "160"})
    assert "entry point test_registry:build" in table.stdout


def test_shoal_run_runs_a_registered_pipeline_by_name(installed: None, tmp_path: Path) -> None:
    env = {"SHOAL_CACHE_DIR": str(tmp_path / "cache")}
    result = runner.invoke(app, ["run", "echo", "--input", "text=hi", "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert '"output": "echo: hi"' in result.stdout
    broken = runner.invoke(app, ["run", "broken", "--input", "text=hi"], env=env)
    assert broken.exit_code == 2
    assert "pipeline 'broken'" in broken.stderr
    failing = runner.invoke(app, ["run", "failing", "--input", "text=hi"], env=env)
    assert failing.exit_code == 2, failing.output
    assert "pipeline 'failing'" in failing.stderr


def test_an_app_command_keeps_its_name_under_shoal_run() -> None:
    """`shoal run rental "request" --city ...` is the rental app's own command."""
    result = runner.invoke(app, ["run", "rental", "--help"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "--all-large" in result.stdout
    assert "--city" in result.stdout


def test_serve_refuses_a_pipeline_it_cannot_load(tmp_path: Path) -> None:
    env = {"SHOAL_CACHE_DIR": str(tmp_path / "cache")}
    result = runner.invoke(app, ["serve", "--no-auth", "--pipeline", "nope"], env=env)
    assert result.exit_code == 2
    assert "unknown pipeline 'nope'" in result.stderr


def test_a_yaml_file_whose_steps_module_breaks_is_an_error(tmp_path: Path) -> None:
    """A steps module that fails to import (not only one that is missing) is a clear error."""
    (tmp_path / "broken_steps.py").write_text("def twice(n):\n    return 2 *\n")
    path = tmp_path / "broken.yaml"
    path.write_text(
        "name: broken\ninputs: [n]\noutput: doubled\nsteps:\n"
        "  - {name: doubled, kind: python, fn: 'broken_steps:twice', inputs: [n]}\n"
    )
    env = {"SHOAL_CACHE_DIR": str(tmp_path / "cache")}
    try:
        result = runner.invoke(app, ["run", str(path), "--input", "n=2"], env=env)
    finally:
        if str(tmp_path.resolve()) in sys.path:
            sys.path.remove(str(tmp_path.resolve()))
        sys.modules.pop("broken_steps", None)
    assert result.exit_code == 2, result.output
    assert "cannot import 'broken_steps:twice'" in result.stderr


def test_two_yaml_files_cannot_share_a_steps_module_name(tmp_path: Path, engine: Engine) -> None:
    paths = []
    for folder, value in (("a", "one"), ("b", "two")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "clash_steps.py").write_text(
            f"def out() -> str:\n    return {value!r}\n"
        )
        path = tmp_path / folder / "p.yaml"
        path.write_text(
            "name: p\ninputs: []\noutput: out\nsteps:\n"
            "  - {name: out, kind: python, fn: 'clash_steps:out'}\n"
        )
        paths.append(path)
    try:
        assert registry.load(str(paths[0]), engine).name == "p"
        assert registry.load(str(paths[0]), engine).name == "p"  # the same file again: fine
        with pytest.raises(PipelineError, match="has the name of another module"):
            registry.load(str(paths[1]), engine)  # would silently run a's code
    finally:
        for path in paths:
            folder = str(path.parent.resolve())
            if folder in sys.path:
                sys.path.remove(folder)
        sys.modules.pop("clash_steps", None)
