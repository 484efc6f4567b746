"""`shoal route ...` and `shoal outcomes ...`, run in process; the MiniLM embedder once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from shoal.cli.main import app
from shoal.models.embedder import (
    GGUF_NAME,
    GGUFMiniLM,
    HashEmbedder,
    TorchMiniLM,
    ensure_gguf,
    minilm,
)
from shoal.routing import predictive
from shoal.routing.outcomes import OutcomeRow, OutcomeTable, write_table
from shoal.settings import default_cache_dir

runner = CliRunner()


@pytest.fixture
def fleet_file(tmp_path: Path, smollm2_gguf: Path) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(
        f"include_default: false\ncache_dir: {tmp_path}/cache\n"
        f'models:\n  - {{id: tiny, kind: gguf, path: "{smollm2_gguf}", context: 2048}}\n'
        "  - {id: api, kind: openai, base_url: 'http://127.0.0.1:9/v1', model: gpt-4o-mini}\n"
        "routes:\n"
        "  - {name: pinned, kind: fixed, model: tiny}\n"
        "  - {name: chain, kind: fallback, models: [api, tiny]}\n"
        "  - {name: smart, kind: predictive, models: [tiny, api], predictor: logistic,\n"
        "     target: {quality_ratio: 0.9}}\n",
        "utf-8",
    )
    return path


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Routes embed with the hashing fake instead of MiniLM (no weights, no conversion)."""
    monkeypatch.setattr(
        predictive,
        "minilm_featurizer",
        lambda cache_dir, **kw: predictive.Featurizer(HashEmbedder()),
    )


def two_topics(tmp_path: Path, models: tuple[str, str] = ("tiny", "api")) -> Path:
    """Arithmetic goes well on the cheap model; history only on the expensive one."""
    rng = np.random.default_rng(0)
    prompts, scores = [], []
    for i in range(120):
        if i % 2:
            prompts.append(f"add {i} and {i + 1} please compute the sum")
            scores.append([1.0, 1.0])
        else:
            prompts.append(f"which emperor ruled rome in year {i} history")
            scores.append([float(rng.random() < 0.2), 1.0])
    table = OutcomeTable(
        query_ids=[f"q{i}" for i in range(120)],
        prompts=prompts,
        models=list(models),
        scores=np.array(scores),
        costs=np.tile([1e-5, 1e-3], (120, 1)),
        latencies=np.tile([0.1, 1.0], (120, 1)),
    )
    path = tmp_path / "topics.csv"
    write_table(table, path)
    return path


def test_unknown_route_lists_the_valid_ones(fleet_file: Path) -> None:
    result = runner.invoke(
        app, ["route", "explain", "hi", "--route", "nope", "--fleet", str(fleet_file)]
    )
    assert result.exit_code == 2
    assert "valid routes: chain, pinned, smart" in result.output
    result = runner.invoke(app, ["route", "calibrate", "nope", "--fleet", str(fleet_file)])
    assert result.exit_code == 2
    assert "valid routes: chain, cluster, ensemble, knn, logistic, mf, mlp, pinned, smart" in (
        result.output
    )


def test_explain_a_fixed_and_a_fallback_route(fleet_file: Path) -> None:
    result = runner.invoke(
        app,
        ["route", "explain", "What is 2+2?", "--route", "chain", "--fleet", str(fleet_file)],
        env={"COLUMNS": "160"},
    )
    assert result.exit_code == 0, result.output
    assert "chose: api -> tiny" in result.output
    assert "fallback chain: api, then tiny on retryable errors" in result.output
    result = runner.invoke(
        app, ["route", "explain", "x", "--route", "pinned", "--json", "--fleet", str(fleet_file)]
    )
    data = json.loads(result.stdout)
    assert data["models"] == ["tiny"]
    assert data["target_met"] is True


def test_calibrate_then_explain_a_predictive_route(
    fleet_file: Path, tmp_path: Path, hashed: None
) -> None:
    table = two_topics(tmp_path)
    result = runner.invoke(
        app, ["route", "explain", "x", "--route", "smart", "--fleet", str(fleet_file)]
    )
    assert result.exit_code == 2
    assert "shoal route calibrate smart" in result.output
    result = runner.invoke(
        app,
        [
            "route",
            "calibrate",
            "smart",
            "--outcomes",
            str(table),
            "--json",
            "--fleet",
            str(fleet_file),
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["met_on_calibration"]
    held = summary["heldout"]
    assert held["quality_ratio"] >= 0.85
    assert held["cost_ratio"] < 0.8
    easy = runner.invoke(
        app,
        [
            "route",
            "explain",
            "add 3 and 4 please compute the sum",
            "--route",
            "smart",
            "--json",
            "--fleet",
            str(fleet_file),
        ],
    )
    assert easy.exit_code == 0, easy.output
    assert json.loads(easy.stdout)["models"] == ["tiny"]
    hard = runner.invoke(
        app,
        [
            "route",
            "explain",
            "which emperor ruled rome in year 12 history",
            "--route",
            "smart",
            "--fleet",
            str(fleet_file),
        ],
        env={"COLUMNS": "200"},
    )
    assert hard.exit_code == 0, hard.output
    assert "chose: api" in hard.output
    assert "predicted quality" in hard.output
    assert "tiny is" not in hard.output or "better" in hard.output


def test_eval_prints_metrics_and_draws_a_plot(
    fleet_file: Path, tmp_path: Path, hashed: None
) -> None:
    table = two_topics(tmp_path)
    png = tmp_path / "eval.png"
    result = runner.invoke(
        app,
        [
            "route",
            "eval",
            "--outcomes",
            str(table),
            "--route",
            "logistic",
            "--png",
            str(png),
            "--json",
            "--fleet",
            str(fleet_file),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    routes = data["frontier"]
    assert set(routes) >= {
        "random",
        "always cheapest",
        "best single",
        "zero router",
        "oracle",
        "logistic",
    }
    assert routes["logistic"]["apgr"] > routes["random"]["apgr"]
    assert routes["logistic"]["cost_at_95"] < 0.9
    assert png.stat().st_size > 10_000
    result = runner.invoke(
        app,
        ["route", "eval", "--outcomes", str(table), "--route", "nope", "--fleet", str(fleet_file)],
    )
    assert result.exit_code == 2
    assert "valid routes: cascade, chain, cluster, cluster+cascade, ensemble," in result.output


def test_empty_outcome_table_is_a_clear_cli_error(fleet_file: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("query_id,prompt,model,score,cost_usd,latency_s\n", "utf-8")
    result = runner.invoke(
        app,
        ["route", "eval", "--outcomes", str(empty), "--route", "knn", "--fleet", str(fleet_file)],
    )
    assert result.exit_code == 2
    assert "has no rows" in result.output


def test_minilm_gguf_gives_the_same_vectors_as_torch() -> None:
    cache = default_cache_dir()
    if not (cache / "embedders" / GGUF_NAME).is_file():
        pytest.skip("the MiniLM GGUF is not converted yet: run `shoal route setup`")
    gguf = minilm(cache, "gguf", threads=1)
    assert isinstance(gguf, GGUFMiniLM)
    assert ensure_gguf(cache).name == GGUF_NAME
    texts = ["Which planet is largest?", "The soup was cold and bland.", "2 + 2 = ?"]
    a, b = gguf.embed(texts), TorchMiniLM(threads=1).embed(texts)
    assert a.shape == (3, 384)
    assert float((a * b).sum(axis=1).min()) > 0.9999
    gguf.close()


def answered(tmp_path: Path) -> Path:
    """The cheap model hedges when it is wrong: its answer, not the query, says so."""
    rng = np.random.default_rng(2)
    n = 240
    right = rng.random(n) < 0.7
    rows = []
    for i in range(n):
        answer = "B" if right[i] else "It might be B, or perhaps C; I am not at all sure here."
        rows += [
            OutcomeRow(
                f"q{i}",
                f"question number {i} about {i % 7}",
                "tiny",
                float(right[i]),
                1e-5,
                0.1,
                answer=answer,
            ),
            OutcomeRow(
                f"q{i}", f"question number {i} about {i % 7}", "api", 1.0, 2e-4, 1.0, answer="B"
            ),
        ]
    path = tmp_path / "answered.csv"
    write_table(OutcomeTable.from_rows(rows), path)
    return path


def test_eval_runs_several_splits_a_target_and_a_cascade_that_reads_answers(
    fleet_file: Path, tmp_path: Path, hashed: None
) -> None:
    table = answered(tmp_path)
    args = ["route", "eval", "--outcomes", str(table), "--fleet", str(fleet_file)]
    args += ["--route", "logistic", "--route", "cascade", "--route", "logistic+cascade"]
    args += ["--seeds", "3", "--target", "0.9", "--cost", "known", "--model", "tiny"]
    args += ["--model", "api", "--png", str(tmp_path / "e.png")]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["splits"] == 3
    assert len(data["each_split"]) == 3
    assert data["target"] == "≥ 90% of the best model's quality"
    cal = data["calibrated"]
    assert cal["cascade"]["met_on_test"] >= 2
    assert cal["cascade"]["cost_ratio_median"] < 0.6 < cal["logistic"]["cost_ratio_median"]
    assert len(cal["logistic+cascade"]["cost_ratio_each"]) == 3
    text = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert text.exit_code == 0, text.output
    assert "medians over the splits" in text.output
    assert "cascade: cost" in text.output
    assert "target met on" in text.output
    wrong = runner.invoke(app, [*args, "--cost", "guessed"])
    assert wrong.exit_code == 2
    assert "valid: known, predicted" in wrong.output


def test_eval_warns_loudly_when_every_query_looks_the_same(
    fleet_file: Path, tmp_path: Path, hashed: None
) -> None:
    shared = "Here are worked examples of the task. " * 40
    rng = np.random.default_rng(3)
    n = 100
    table = OutcomeTable(
        query_ids=[f"q{i}" for i in range(n)],
        prompts=[f"{shared} Now: item {i}" for i in range(n)],
        models=["tiny", "api"],
        scores=np.stack([(rng.random(n) < 0.5).astype(float), np.ones(n)], axis=1),
        costs=np.tile([1e-5, 1e-3], (n, 1)),
        latencies=np.zeros((n, 2)),
    )
    path = tmp_path / "same.csv"
    write_table(table, path)
    result = runner.invoke(
        app,
        [
            "route",
            "eval",
            "--outcomes",
            str(path),
            "--route",
            "logistic",
            "--fleet",
            str(fleet_file),
            "--png",
            str(tmp_path / "s.png"),
        ],
        env={"COLUMNS": "300"},
    )
    assert result.exit_code == 0, result.output
    assert "WARNING" in result.output
    assert "nearly parallel" in result.output


def test_calibrate_takes_a_predictor_kind_and_says_where_it_saved(
    fleet_file: Path, tmp_path: Path, hashed: None
) -> None:
    table = two_topics(tmp_path)
    result = runner.invoke(
        app,
        [
            "route",
            "calibrate",
            "cluster",
            "--outcomes",
            str(table),
            "--target",
            "0.9",
            "--fleet",
            str(fleet_file),
        ],
        env={"COLUMNS": "300"},
    )
    assert result.exit_code == 0, result.output
    saved = result.output.split("saved: ")[1].split()[0]
    assert Path(saved).is_file()
    assert Path(saved).parent == tmp_path / "cache" / "routes"
    wrong = runner.invoke(
        app,
        ["route", "calibrate", "knn", "--outcomes", "routerbench:nope", "--fleet", str(fleet_file)],
    )
    assert wrong.exit_code == 2
    assert "valid: arc_challenge, mbpp" in wrong.output
    fleet_route = runner.invoke(
        app,
        [
            "route",
            "calibrate",
            "smart",
            "--outcomes",
            str(table),
            "--target",
            "0.8",
            "--fleet",
            str(fleet_file),
        ],
    )
    assert fleet_route.exit_code == 2
    assert "states its target and models in the fleet file" in fleet_route.output


def test_first_embedding_of_a_table_shows_progress(
    fleet_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shoal.models.embedder import EmbeddingCache

    cache = default_cache_dir()
    if not (cache / "embedders" / GGUF_NAME).is_file():
        pytest.skip("the MiniLM GGUF is not converted yet: run `shoal route setup`")
    gguf = minilm(cache, "gguf", threads=1)
    monkeypatch.setattr(
        predictive,
        "minilm_featurizer",
        lambda cache_dir, **kw: predictive.Featurizer(
            EmbeddingCache(gguf, tmp_path / "vectors.sqlite")
        ),
    )
    table = two_topics(tmp_path)
    args = ["route", "eval", "--outcomes", str(table), "--route", "knn", "--fleet"]
    args += [str(fleet_file), "--png", str(tmp_path / "p.png")]
    first = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert first.exit_code == 0, first.output
    assert "embedding new texts (once: cached after)" in first.output
    assert "120/120" in first.output
    again = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert again.exit_code == 0, again.output
    assert "embedding new texts" not in again.output
    gguf.close()
