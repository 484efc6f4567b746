"""The cluster router, the scorer that reads the answer, and route experiments over splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shoal.errors import ConfigError
from shoal.models.embedder import HashEmbedder
from shoal.routing import evaluate as ev
from shoal.routing.calibrate import Target, calibrate_cascade, calibrate_predictive
from shoal.routing.cluster import ClusterPredictor, kmeans
from shoal.routing.experiment import Experiment, split_indices, summarise
from shoal.routing.outcomes import OutcomeTable
from shoal.routing.predictive import Featurizer, PredictiveRouter
from shoal.routing.scorer import answer_features, answer_key, scored_tables

TOPICS = ("add the numbers", "which emperor ruled rome", "translate into french")


def topics_table(n: int = 600, seed: int = 0) -> tuple[OutcomeTable, np.ndarray]:
    """Three topics; the cheap model is right on the first only, the strong one on all."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 32))
    topic = rng.integers(0, 3, n)
    x = centres[topic] + 0.3 * rng.normal(size=(n, 32))
    cheap = np.where(topic == 0, rng.random(n) < 0.95, rng.random(n) < 0.2).astype(float)
    table = OutcomeTable(
        query_ids=[f"q{i}" for i in range(n)],
        prompts=[f"{TOPICS[t]} {i}" for i, t in enumerate(topic)],
        models=["cheap", "strong"],
        scores=np.stack([cheap, np.ones(n)], axis=1),
        costs=np.tile([1.0, 10.0], (n, 1)),
        latencies=np.zeros((n, 2)),
    )
    return table, x


def test_kmeans_finds_separated_clusters() -> None:
    rng = np.random.default_rng(1)
    centres = np.eye(4)[:3] * 5
    x = np.repeat(centres, 50, axis=0) + 0.1 * rng.normal(size=(150, 4))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    found = kmeans(x, 3, seed=0)
    label = np.argmax(x @ found.T, axis=1)
    assert sorted(np.bincount(label).tolist()) == [50, 50, 50]


def test_cluster_predictor_learns_each_models_quality_per_cluster(tmp_path: Path) -> None:
    table, x = topics_table()
    predictor = ClusterPredictor(k=6, min_per_cluster=20).fit(x[:400], table.scores[:400])
    got = predictor.predict(x[400:])
    topic0 = np.array([p.startswith(TOPICS[0]) for p in table.prompts[400:]])
    assert got[topic0, 0].mean() > 0.8
    assert got[~topic0, 0].mean() < 0.35
    assert np.allclose(got[:, 1], 1.0, atol=0.05)
    # As a predictive route's predictor: calibrated, saved and loaded like any other.
    fit = calibrate_predictive(
        table, x, Target(quality_ratio=0.95), kind="cluster", cost_mode="known"
    )
    assert fit.calibration.met
    assert fit.calibration.calib_cost_ratio < 0.75  # the easy third goes to the cheap model
    feat = Featurizer(HashEmbedder(32))
    router = PredictiveRouter(
        ["cheap", "strong"], feat, fit.predictor, lam=fit.lam, cost_mode="known"
    )
    router.save(tmp_path / "r.npz")
    back = PredictiveRouter.load(tmp_path / "r.npz", feat)
    assert isinstance(back.predictor, ClusterPredictor)
    np.testing.assert_allclose(back.predictor.predict(x[:50]), fit.predictor.predict(x[:50]))


def test_answer_keys_and_features() -> None:
    assert answer_key("B) wet palms") == "B"
    assert answer_key("A rainy day is wet because water falls from clouds.") != "A"
    assert answer_key("so 4 * 6 = 24, answer 1,024") == "1024"
    feats = answer_features(
        np.zeros((2, 8)),
        np.eye(2, 8),
        ["C", "I'm sorry, I cannot answer that."],
        None,
        [["C", "D"]],
        [np.eye(2, 8)],
    )
    assert feats.shape == (2, 8 + 8 + 14)
    scalars = feats[:, 16:]
    assert scalars[:, 8].tolist() == [1.0, 0.0]  # agrees with the earlier stage's key
    assert scalars[:, 10].tolist() == [1.0, 0.0]  # a lone option letter
    assert scalars[:, 13].tolist() == [0.0, 1.0]  # a refusal


def answers_table(n: int = 800, seed: int = 0) -> tuple[OutcomeTable, np.ndarray]:
    """The query says nothing about the cheap model's mistakes; its answer does (it hedges)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 16))
    right = rng.random(n) < 0.7
    letters = rng.choice(list("ABCD"), n)
    cheap = [
        str(c) if ok else f"It could be {c}, or maybe another option; I am not certain of it."
        for c, ok in zip(letters, right, strict=True)
    ]
    table = OutcomeTable(
        query_ids=[f"q{i}" for i in range(n)],
        prompts=[f"question {i}" for i in range(n)],
        models=["cheap", "strong"],
        scores=np.stack([right.astype(float), np.ones(n)], axis=1),
        costs=np.tile([1.0, 20.0], (n, 1)),
        latencies=np.zeros((n, 2)),
        answers=[[a, "A"] for a in cheap],
    )
    return table, x


def test_a_cascade_that_reads_the_answer_beats_one_that_reads_the_query() -> None:
    table, x = answers_table()
    train, test = table.subset(np.arange(400)), table.subset(np.arange(400, 800))
    embed = HashEmbedder(32)

    def vecs(t: OutcomeTable) -> dict[int, np.ndarray]:
        assert t.answers is not None
        return {0: embed.embed([a[0] for a in t.answers]).astype(float)}

    s_train, s_test = scored_tables(
        train, test, x[:400], x[400:], vecs(train), vecs(test), [(0, [])]
    )
    assert s_test.confidence is not None
    assert np.isnan(s_test.confidence[:, 1]).all()
    target = Target(quality_ratio=0.95)
    cal = calibrate_cascade(s_train, [0, 1], target, test=s_test, confidence_z=1.0)
    assert cal.met
    assert cal.heldout is not None
    assert cal.heldout.quality_ratio >= 0.95
    assert cal.heldout.cost_ratio < 0.45  # cheap call always, strong one for the hedged third
    query_only = calibrate_predictive(
        train, x[:400], target, kind="logistic", cost_mode="known", test=test, x_test=x[400:]
    )
    assert query_only.calibration.heldout is not None
    assert query_only.calibration.heldout.cost_ratio > 0.8  # the query carries no signal


def test_an_experiment_runs_every_route_over_several_splits() -> None:
    table, x = answers_table(600, seed=1)
    rows = {p: i for i, p in enumerate(table.prompts)}
    embed = HashEmbedder(32)
    exp = Experiment(
        table,
        lambda texts: x[[rows[t] for t in texts]],
        routes=["logistic", "cluster", "cascade", "logistic+cascade"],
        target=Target(quality_ratio=0.95),
        cost_mode="known",
        embed_answers=lambda texts: embed.embed(texts).astype(float),
    )
    splits = split_indices(table, [0, 1, 2])
    assert all(len(tr) == len(te) == 300 for _, tr, te in splits)
    assert not set(splits[0][1]) & set(splits[0][2])
    summary = summarise([exp.run(*s) for s in splits], "answers")
    assert summary["splits"] == 3
    assert len(summary["each_split"]) == 3
    cal = summary["calibrated"]
    assert set(cal) == {"logistic", "cluster", "cascade", "logistic+cascade"}
    assert cal["cascade"]["met_on_test"] >= 2
    assert cal["cascade"]["cost_ratio_median"] < 0.5 < cal["logistic"]["cost_ratio_median"]
    assert cal["logistic+cascade"]["cost_ratio_median"] < 0.5
    frontier = summary["frontier"]
    assert frontier["cascade"]["aiq"] > frontier["zero router"]["aiq"] + 0.02
    with pytest.raises(ConfigError, match="valid: knn"):
        Experiment(table, lambda t: x, routes=["nope"], target=Target(quality_ratio=0.9))
    bare = table.subset(np.arange(600))
    bare.answers = None
    with pytest.raises(ConfigError, match="has no answers"):
        Experiment(bare, lambda t: x, routes=["cascade"], target=Target(quality_ratio=0.9))


def test_preroute_cascade_curve_spans_pure_routes() -> None:
    """λ = ∞ with threshold 0 is 'always the cheap model'; threshold > 1 'cheap, then strong'."""
    table, _ = answers_table(100)
    table.confidence = np.full((100, 2), 0.5)
    cheap = np.zeros(100, dtype=np.intp)
    cost, score, final = ev.preroute_cascade_choices(table, cheap, 0.0, 1)
    assert cost.tolist() == [1.0] * 100
    assert final.tolist() == [0] * 100
    cost, score, final = ev.preroute_cascade_choices(table, cheap, 1.1, 1)
    assert cost.tolist() == [21.0] * 100
    assert score.tolist() == [1.0] * 100


async def test_a_live_cascade_escalates_the_answers_its_scorer_distrusts() -> None:
    from shoal.messages import ChatRequest
    from shoal.models.fake import FunctionModel
    from shoal.routing.base import RoutedModel
    from shoal.routing.cascade import CascadeRouter
    from shoal.routing.scorer import AnswerScorer, AnswerSignal

    table, _ = answers_table(400)
    feat = Featurizer(HashEmbedder(32))
    assert table.answers is not None
    answers = [row[0] for row in table.answers]
    features = answer_features(
        feat(table.prompts), feat.embedder.embed(answers).astype(float), answers
    )
    scorer = AnswerScorer().fit(features, table.scores[:, 0])
    signal = AnswerSignal(feat, {"small": scorer})
    assert not signal.needs_logprobs

    def small_answer(request: ChatRequest) -> str:
        hedge = "7" in request.messages[-1].content
        return "It could be C, or maybe another option; I am not certain of it." if hedge else "C"

    small = FunctionModel(small_answer, model_id="small")
    large = FunctionModel(lambda r: "C", model_id="large")
    routed = RoutedModel("reads", CascadeRouter(["small", "large"], signal, 0.5), [small, large])
    sure = await routed.generate(ChatRequest.of("question 12"))
    assert sure.model == "small"
    assert sure.attempts == ()
    unsure = await routed.generate(ChatRequest.of("question 17"))
    assert unsure.model == "large"
    assert [a.model for a in unsure.attempts] == ["small"]
    with pytest.raises(ConfigError, match="no answer scorer for model 'large'"):
        signal.confidence(ChatRequest.of("q"), unsure, [])
