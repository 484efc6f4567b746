"""Outcome tables, metrics on hand-computed tables, and calibration on held-out data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shoal.routing import evaluate as ev
from shoal.routing.calibrate import Target, calibrate_cascade, calibrate_predictive
from shoal.routing.outcomes import (
    OutcomeRow,
    OutcomeTable,
    OutcomeTableError,
    read_table,
    write_table,
)


def tiny() -> OutcomeTable:
    """cheap: right on q0 and q3, cost 1; strong: right on q0, q1, q3, cost 10."""
    return OutcomeTable(
        query_ids=["q0", "q1", "q2", "q3"],
        prompts=["a", "b", "c", "d"],
        models=["cheap", "strong"],
        scores=np.array([[1, 1], [0, 1], [0, 0], [1, 1]], dtype=float),
        costs=np.array([[1, 10]] * 4, dtype=float),
        latencies=np.zeros((4, 2)),
    )


def test_metrics_on_a_hand_computed_table() -> None:
    table = tiny()
    ref = ev.Reference.of(table)
    assert (ref.q_cheap, ref.q_best, ref.c_cheap, ref.c_best) == (0.5, 0.75, 1.0, 10.0)
    oracle = ev.oracle_point(table)
    assert oracle.cost[0] == pytest.approx(3.25)  # q1 to strong, the rest to cheap
    assert oracle.quality[0] == 0.75
    assert oracle.best_share[0] == 0.25
    # A route with three settings: all cheap, the oracle's choice, all strong.
    choices = [np.array([0, 0, 0, 0]), np.array([0, 1, 0, 0]), np.array([1, 1, 1, 1])]
    curve = ev.curve_from_choices(table, choices, "route")
    m = ev.metrics(curve, ref)
    # Mixing the first two settings reaches every point between them (the hull, as plotted):
    # PGR rises linearly from cost 1 to 3.25, then stays 1.
    assert m["apgr"] == pytest.approx((2.25 / 2 + 6.75) / 9, abs=0.002)
    assert m["cost_at_95"] == pytest.approx((1 + 0.85 * 2.25) / 10)  # 0.7125 = 85% of the way
    assert m["cpt50"] == pytest.approx(0.125)
    assert m["cpt80"] == pytest.approx(0.2)
    # Hull (1, .5) - (3.25, .75) - (10, .75) over [1, 10].
    assert m["aiq"] == pytest.approx((1.25 / 2 * 2.25 + 0.75 * 6.75) / 9, abs=1e-3)
    zero = ev.baseline_curves(table)["zero router"]
    assert ev.aiq(zero, ref) == pytest.approx(0.625, abs=1e-3)
    random = ev.baseline_curves(table)["random"]
    assert ev.apgr(random, ref) == pytest.approx(0.5, abs=0.03)


def test_upper_hull_drops_dominated_and_concave_points() -> None:
    c = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    q = np.array([0.5, 0.55, 0.9, 0.8, 0.95])
    hc, hq = ev.upper_hull(c, q)
    assert hc.tolist() == [1.0, 3.0, 5.0]
    assert hq.tolist() == [0.5, 0.9, 0.95]


def test_cascade_simulation_pays_every_stage() -> None:
    table = tiny()
    table.confidence = np.array([[0.9, 1], [0.2, 1], [0.9, 1], [0.1, 1]])
    cost, score, final = ev.cascade_choices(table, [0, 1], 0.5)
    assert cost.tolist() == [1, 11, 1, 11]
    assert score.tolist() == [1, 1, 0, 1]
    assert final.tolist() == [0, 1, 0, 1]


def test_empty_and_degenerate_tables_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(OutcomeTableError, match="no queries"):
        OutcomeTable([], [], ["a", "b"], np.zeros((0, 2)), np.zeros((0, 2)), np.zeros((0, 2)))
    with pytest.raises(OutcomeTableError, match="at least two"):
        OutcomeTable(["q"], ["p"], ["a"], np.ones((1, 1)), np.ones((1, 1)), np.ones((1, 1)))
    same = tiny()
    same.scores = np.ones((4, 2))
    with pytest.raises(OutcomeTableError, match="degenerate"):
        same.check_routable()
    with pytest.raises(OutcomeTableError, match="degenerate"):
        calibrate_predictive(same, np.zeros((4, 3)), Target(quality_ratio=0.95))
    empty = tmp_path / "empty.csv"
    empty.write_text("query_id,prompt,model,score,cost_usd,latency_s\n", "utf-8")
    with pytest.raises(OutcomeTableError, match="no rows"):
        read_table(empty)
    bad = tmp_path / "bad.csv"
    bad.write_text("query_id,prompt,model,score\nq,p,m,1\n", "utf-8")
    with pytest.raises(OutcomeTableError, match="missing column"):
        read_table(bad)
    with pytest.raises(OutcomeTableError, match="no outcome table"):
        read_table(tmp_path / "absent.csv")
    with pytest.raises(OutcomeTableError, match=r"\[0, 1\]"):
        OutcomeTable(
            ["q"], ["p"], ["a", "b"], np.full((1, 2), 2.0), np.ones((1, 2)), np.ones((1, 2))
        )


def test_table_round_trips_through_csv_and_drops_incomplete_queries(tmp_path: Path) -> None:
    table = tiny()
    table.splits = ["train", "train", "test", "test"]
    path = tmp_path / "t.csv.gz"
    write_table(table, path)
    back = read_table(path)
    assert back.query_ids == table.query_ids
    assert back.splits == table.splits
    np.testing.assert_array_equal(back.scores, table.scores)
    rows = [*table.rows(), OutcomeRow("q9", "x", "cheap", 1.0, 1.0, 0.0)]
    assert len(OutcomeTable.from_rows(rows)) == 4  # q9 lacks the strong model
    with pytest.raises(OutcomeTableError, match="lack an outcome"):
        OutcomeTable.from_rows(rows, drop_incomplete=False)


def synthetic(n: int, seed: int) -> tuple[OutcomeTable, np.ndarray]:
    """A weak model right when x0 is high, a strong model right 90% of the time."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8))
    weak = (rng.random(n) < 1 / (1 + np.exp(-3 * x[:, 0]))).astype(float)
    strong = (rng.random(n) < 0.9).astype(float)
    table = OutcomeTable(
        query_ids=[f"q{i}" for i in range(n)],
        prompts=[""] * n,
        models=["weak", "strong"],
        scores=np.stack([weak, strong], axis=1),
        costs=np.tile([1.0, 10.0], (n, 1)),
        latencies=np.zeros((n, 2)),
    )
    return table, x


def test_calibration_holds_on_held_out_data() -> None:
    table, x = synthetic(3000, seed=0)
    train_idx, test_idx = np.arange(1500), np.arange(1500, 3000)
    fit = calibrate_predictive(
        table.subset(train_idx),
        x[train_idx],
        Target(quality_ratio=0.95),
        kind="logistic",
        cost_mode="known",
        test=table.subset(test_idx),
        x_test=x[test_idx],
    )
    cal = fit.calibration
    held = cal.heldout
    assert held is not None
    assert cal.met
    lo, hi = cal.calib_quality_ci
    assert lo <= held.quality <= hi, (cal.calib_quality_ci, held.quality)
    assert held.quality_ci[0] <= cal.calib_quality <= held.quality_ci[1]
    assert held.quality_ratio > 0.93
    assert held.cost_ratio < 0.8  # routing saved money: the weak model takes the easy half


def test_a_target_no_model_can_meet_is_flagged_not_swapped() -> None:
    table, x = synthetic(400, seed=1)
    fit = calibrate_predictive(
        table, x, Target(min_quality=0.99), kind="logistic", cost_mode="known"
    )
    assert not fit.calibration.met
    # Every query goes to the best single model (not to the per-query predicted best), flagged.
    assert fit.fallback == 1
    assert fit.calibration.fallback == "strong"
    assert fit.calibration.calib_quality == table.scores[:, 1].mean()
    assert fit.calibration.calib_cost_ratio == 1.0
    cascade = tiny()
    cascade.confidence = np.full((4, 2), 0.5)
    cal = calibrate_cascade(cascade, [0, 1], Target(min_quality=0.99), test=cascade)
    assert not cal.met
    assert cal.fallback == "strong"
    assert cal.heldout is not None
    assert cal.heldout.best_share == 1.0


def test_a_route_that_missed_its_target_sends_every_query_to_the_fallback() -> None:
    from shoal.messages import ChatRequest
    from shoal.models.embedder import HashEmbedder
    from shoal.models.fake import fake_card
    from shoal.routing.predictive import Featurizer, LogisticPredictor, PredictiveRouter

    feat = Featurizer(HashEmbedder(16))
    table, _ = synthetic(200, seed=3)
    x = feat([f"question {i}" for i in range(200)])
    predictor = LogisticPredictor().fit(x, table.scores)
    cards = [fake_card("weak"), fake_card("strong")]
    router = PredictiveRouter(
        ["weak", "strong"],
        feat,
        predictor,
        lam=1e3,  # left alone, this weight would always pick the cheap model
        cost_mode="known",
        target="quality ≥ 0.99",
        target_met=False,
        fallback="strong",
    )
    decision = router.choose(ChatRequest.of("question 7"), cards, {})
    assert decision.models == ("strong",)
    assert not decision.target_met
    assert "every query goes to strong" in decision.reason


def test_random_and_zero_router_coincide_on_a_two_model_table() -> None:
    table, _ = synthetic(500, seed=4)
    ref = ev.Reference.of(table)
    base = ev.baseline_curves(table)
    random, zero = ev.metrics(base["random"], ref), ev.metrics(base["zero router"], ref)
    assert random.keys() == zero.keys()
    for key, value in random.items():
        assert zero[key] == pytest.approx(value, abs=1e-9), key
    assert random["apgr"] == pytest.approx(0.5, abs=1e-3)


def test_table_figures_read_the_same_hull_as_the_plot() -> None:
    """$@95% and APGR mix neighbouring settings: a curve of only its two end points gives the
    figures of the straight line between them."""
    table, _ = synthetic(500, seed=5)
    ref = ev.Reference.of(table)
    ends = ev.curve_from_choices(table, [np.zeros(500, np.intp), np.ones(500, np.intp)], "ends")
    line = ev.baseline_curves(table)["random"]  # 21 points on the same line
    for key in ("apgr", "cost_at_95", "cpt50", "aiq"):
        assert ev.metrics(ends, ref)[key] == pytest.approx(ev.metrics(line, ref)[key], abs=1e-9)


def test_degenerate_router_input_is_flagged() -> None:
    from shoal.routing.diagnose import embedding_warnings, prediction_warnings

    rng = np.random.default_rng(0)
    varied = rng.normal(size=(300, 32))
    same = np.tile(varied[:1], (300, 1)) + np.hstack([np.zeros((300, 26)), varied[:, :6]])
    assert embedding_warnings(varied) == []
    warned = embedding_warnings(same)  # the 26 embedding columns are one vector
    assert any("300 of 300 queries (100%) have the same embedding" in w for w in warned)
    flat = 0.6 + 0.005 * rng.random((300, 2))
    assert any("hardly varies" in w for w in prediction_warnings(flat, ["a", "b"]))
    assert prediction_warnings(rng.random((300, 2)), ["a", "b"], distinct_routes=20) == []
    # Calibration runs the checks and keeps what they found.
    table, x = synthetic(400, seed=6)
    clean = calibrate_predictive(table, x, Target(quality_ratio=0.95), kind="logistic")
    assert clean.calibration.warnings == []
    blind = calibrate_predictive(
        table, np.tile(x[:1], (400, 1)), Target(quality_ratio=0.95), kind="logistic"
    )
    assert any("same embedding" in w for w in blind.calibration.warnings)
    assert any("hardly varies" in w for w in blind.calibration.warnings)
    assert blind.calibration.summary()["warnings"] == blind.calibration.warnings


def test_cost_cap_target_picks_the_best_quality_within_the_cap() -> None:
    table, x = synthetic(1000, seed=2)
    fit = calibrate_predictive(
        table, x, Target(max_cost_ratio=0.5), kind="logistic", cost_mode="known"
    )
    assert fit.calibration.met
    assert fit.calibration.calib_cost_ratio <= 0.5


def test_bootstrap_interval_contains_the_mean() -> None:
    values = np.random.default_rng(0).random(500)
    lo, hi = ev.bootstrap_ci(values)
    assert lo < values.mean() < hi
    assert hi - lo < 0.1
